"""Every name through which runs, trials, models and artifacts find each other, written once.

Tags and artifact paths are what a user filters on in the MLflow UI (``tags.pipeline.study_name = 'x'``)
and what the steps read back from each other; Optuna user attributes point from a trial to its MLflow
run. Plain strings only: importing this module costs nothing (no torch, MLflow or Optuna).
"""

# --- The model registry ----------------------------------------------------------------------------
REGISTERED_MODEL = "fashion-mnist-{}"  # one registered model per model family (softmax, mlp, ...)
MODEL_NAME = REGISTERED_MODEL.format("softmax")  # the default model's: what `make serve` serves
CHAMPION = "champion"  # alias of the best version validated on the default (full-data) split
VERSION_VAL_ACCURACY_TAG = "val_accuracy"  # on each model version: what the champion is chosen by
VERSION_VAL_DIGEST_TAG = "val_digest"  # on each model version: the validation split it was chosen on
SPLIT_CHAMPION = CHAMPION + "-{}"  # alias of the best version among those validated on one split (its digest)
VERSION_MODEL_TAG = "model"  # on each model version: its model family (softmax, mlp, ...)
VERSION_DEFAULT_SPLIT_TAG = "default_split"  # on each model version: "true" if chosen on the default split
# on each logged model: its family, and a digest of its weights (the registry never registers one twice)
MODEL_FAMILY_TAG = "pipeline.model"
WEIGHTS_DIGEST_TAG = "pipeline.weights_digest"

# --- The MLflow experiment ------------------------------------------------------------------------
EXPERIMENT_NAME = "fashion-mnist-softmax"  # runs go here unless MLFLOW_EXPERIMENT_NAME / _ID say otherwise
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow's own tag: what the UI opens an experiment on
TRAINING_KIND = "custom_model_development"  # opens on the training runs (not on the GenAI traces page)
UI_WORKFLOW = "machine_learning"  # the UI's workflowType in a link: the training pages, not the GenAI ones

# --- Artifacts -------------------------------------------------------------------------------------
PREPARED_ARTIFACT = "prepared"  # the prepare run's folder: runs:/<run_id>/prepared
MODEL_ARTIFACT = "model"
CLASS_COUNTS = "class_counts.json"
SAMPLES_FIGURE = "samples.png"
CURVES_FIGURE = "curves.png"
NO_MODEL_NOTE = "no_model.txt"  # on a trial that keeps no model (pruned, diverged): why
PER_CLASS_TABLE = "per_class.json"
PER_CLASS_CSV = "per_class.csv"
CONFUSION_FIGURE = "confusion_matrix.png"
MISTAKES_FIGURE = "confident_mistakes.png"
TEST_PREDICTIONS = "test_predictions.npz"  # predicted and true labels per test image: paired tests
REGISTRY_DECISION = "registry_decision.json"
STUDY_FOLDER = "study"  # the tune run's trials table and figures: study/trials.csv, study/<figure>.png
REPORT_FOLDER = "report"  # a report run's artifacts, also written to reports/<experiment>/:
LEADERBOARD_MD, LEADERBOARD_CSV, SEEDS_CSV, REPORT_CURVES = (
    "leaderboard.md", "leaderboard.csv", "seeds.csv", "accuracy_curves.png")
CONVEX_TABLE = "convex_optimum.csv"  # one row per weight decay: objective, gradient norm, accuracies
STABILITY_TABLES = {"sweep": "loss_vs_scale", "race": "training_loss"}  # .csv/.json/.png of each

# --- Dataset contexts (mlflow.log_input) -----------------------------------------------------------
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}

# --- Run tags --------------------------------------------------------------------------------------
FAILURE_TAG = "pipeline.failure"  # why a run failed, in one line
MODEL_URI_TAG = "pipeline.model_uri"  # the model a train run produced (models:/<model_id>)
STOPPED_EARLY_TAG = "pipeline.stopped_early"
CACHE_KEY_TAG = "pipeline.cache_key"
RAW_DIGEST_TAG = "pipeline.raw_digest"  # on a prepare run: its raw files' contents (main reuses it only for the same)
CACHE_REUSED_TAG = "pipeline.cache_reused"
CODE_VERSION_TAG = "pipeline.code_version"  # git commit (+ hash of uncommitted changes) of a step
STEP_TAG = "pipeline.step.{}"  # on main: the run id of each step; + ".reused"
STUDY_TAG = "pipeline.study_name"  # on trial runs, tune runs and the main run that started the study
VAL_DIGEST_TAG = "pipeline.val_digest"  # on a training run: digest of the validation split it was chosen on
PARAMETER_COUNT = "parameter_count"  # param of a training run: how many numbers its model learns
DELIVERED_PREFIX = "delivered_"  # main's params delivered_lr, ...: the settings of the model it delivers
DELIVERED_RUN_TAG = "pipeline.delivered_run_id"  # on main: the run that trained the delivered model
TRIAL_TAG = "pipeline.trial_number"
TRIAL_STATE_TAG = "pipeline.trial_state"  # Optuna's state of a trial run: COMPLETE, PRUNED, FAIL
SIDE_BY_SIDE_TAG = "pipeline.side_by_side"  # on a trial run: how many trials trained in its stack
BEST_MODEL_TAG = "pipeline.best_model_uri"
BEST_TRIAL_TAG = "pipeline.best_trial"
BEST_RUN_TAG = "pipeline.best_run_id"
REGISTERED_VERSION_TAG = "pipeline.registered_version"
CHAMPION_DECISION_TAG = "pipeline.champion_decision"
ROLE_TAG = "pipeline.role"  # "experiment" on an experiment file's parent run, "report" on a report
FILE_TAG = "pipeline.experiment_file"
POINT_TAG = "pipeline.grid_point"
SMOKE_TAG = "pipeline.smoke"
CONVEX_SUMMARY_TAG = "pipeline.convex_summary"  # the convex optimum and how close the study came, in words
SEED_TAG = "pipeline.seed"  # experiment files with seeds: the seed of the run (its point is POINT_TAG)
TEST_DIGEST_TAG = "pipeline.test_digest"  # which test images the evaluation saw (paired tests need the same)
OWNER_TAG = "pipeline.owner"  # the process running a run: {"host", "pid", "started"} (pipeline.runtime.processes)

# --- Optuna user attributes of a trial -------------------------------------------------------------
RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
BEST_EPOCH_ATTR = "best_epoch"
FAIL_REASON_ATTR = "fail_reason"  # a failed trial with a result: training diverged
INTERRUPTED_ATTR = "interrupted"  # a failed trial without a result: its place goes to a new trial
RECIPE_ATTR = "recipe"  # the seed recipe's trial
OWNER_ATTR = "owner"  # the process running a trial, as OWNER_TAG
STUDY_BEST_MODEL_ATTR = "best_model_uri"  # on the study
STUDY_DATA_ATTRS = ("train_digest", "val_digest")  # on the study: the data its trials trained and chose on
STUDY_MODEL_ATTR = "model"  # on the study: the model family its trials train
