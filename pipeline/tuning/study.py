"""An Optuna study of learning rate, epochs and weight decay, chosen on the validation split.

How a study runs (``run_study``), inside the MLflow run of the ``tune`` command (the parent run):

1. open the study in its storage, or create it (``pipeline.tuning.storage``); a new study gets
   the book's seed recipe as its first trial, so the search can never report worse than the baseline;
2. one or more workers take trials until the study holds ``trials`` of them (``pipeline.tuning.workers``,
   ``pipeline.tuning.trials``). Workers may be processes on this machine (``--workers``) or other
   machines running the same command against the same database; each trial is a nested MLflow run;
3. the parent run records the best trial, a table of all trials and the study's figures
   (``pipeline.tuning.record``);
4. the best trial's model is tested and registered (``final_test``).
"""

import contextlib
from dataclasses import asdict

import mlflow
import optuna

from pipeline.config import MODELS
from pipeline.core.splits import Splits
from pipeline.names import MODEL_URI_ATTR, STUDY_DATA_ATTRS, STUDY_MODEL_ATTR, STUDY_TAG
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tracking.datasets import is_default_split, load_data, split_digest
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.runs import log_new_params, runs_killed_at_safe_points
from pipeline.tuning.dead_trials import recover_dead_trials
from pipeline.tuning.record import log_figures, log_trials_table, record_best
from pipeline.tuning.storage import open_storage, open_study, printable_url, storage_faults_named
from pipeline.tuning.workers import run_workers


def final_test(model_uri: str, val_accuracy: float, splits: Splits, default_split: bool) -> dict:
    """Test metrics of the best model (in a nested "evaluate" run), and register it if it is better;
    returns the metrics and, under "registry", the registry's decision."""
    with mlflow.start_run(run_name="evaluate", nested=True,
                          experiment_id=mlflow.active_run().info.experiment_id):
        result = evaluate_on_test(model_uri, splits)
        decision = promote_if_better(model_uri, val_accuracy, split_digest(splits, "val"), default_split)
    metrics = {k: result[k] for k in ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_loss")}
    mlflow.log_metrics({f"best_{k}": v for k, v in metrics.items()})  # on the parent, beside best_val_accuracy
    return {**metrics, "registry": decision}


def how_trials_train(cfg: TuneConfig) -> str:
    """One line: whether this study's trials train side by side or one at a time, and why."""
    title = MODELS[cfg.model].title
    if cfg.side_by_side > 1:
        return (f"model {cfg.model} ({title}): {cfg.side_by_side} trials side by side in each worker, as one "
                "stacked model")
    if MODELS[cfg.model].side_by_side == 1:
        return f"model {cfg.model} ({title}): one trial at a time in each worker (it has no stacked training)"
    return f"model {cfg.model} ({title}): one trial at a time in each worker (--side-by-side 1)"


def run_study(tune_cfg: TuneConfig, space: SearchSpace, data_uri: str) -> optuna.Study:
    """Run (or resume) the study, record it on the active MLflow run, test and register the best."""
    return run_and_test_study(tune_cfg, space, data_uri)[0]


def run_and_test_study(tune_cfg: TuneConfig, space: SearchSpace, data_uri: str) -> tuple[optuna.Study, dict | None]:
    """``run_study``, returning also ``final_test``'s result (None with ``test_best`` off).

    Called inside ``mlflow.start_run()`` like the other steps (one is opened if none is active). Ctrl-C
    and SIGTERM fail the running trials and end every active run KILLED (``pipeline.runtime.signals``).
    """
    tune_cfg.validate()
    space.validate()
    tune_cfg = tune_cfg.resolved()
    print(how_trials_train(tune_cfg))
    own_run = (mlflow.start_run(run_name="tune", log_system_metrics=True) if mlflow.active_run() is None
               else contextlib.nullcontext())
    with own_run, runs_killed_at_safe_points(), storage_faults_named(tune_cfg.storage):
        parent = mlflow.active_run().info
        log_new_params({**asdict(tune_cfg), "storage": printable_url(tune_cfg.storage),
                                 **asdict(space), "data": data_uri})
        mlflow.set_tag(STUDY_TAG, tune_cfg.study_name)
        splits = load_data(data_uri)
        # the study remembers its data and refuses other data: trials on other splits are not comparable
        digests = dict(zip(STUDY_DATA_ATTRS, (split_digest(splits, s) for s in ("train", "val"))))
        digests[STUDY_MODEL_ATTR] = tune_cfg.model  # and its model: trials of other models are not comparable
        storage = open_storage(tune_cfg)
        study = open_study(tune_cfg, space, storage, digests)
        recover_dead_trials(study, storage)  # trials whose worker was killed since: their places are free again
        run_workers(tune_cfg, space, splits, parent)
        log_trials_table(study)
        log_figures(study)
        best = record_best(study)
        tested = None
        if tune_cfg.test_best:
            tested = final_test(best.user_attrs[MODEL_URI_ATTR], best.value, splits, is_default_split(data_uri))
    return study, tested
