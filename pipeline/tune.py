"""Hyperparameter search with Optuna: learning rate, epochs and weight decay, chosen on the validation split.

How a study runs (``run_study``), inside the MLflow run of the ``tune`` command (the parent run):

1. open the study in its storage, or create it; a new study gets the book's seed recipe as its first
   trial (``enqueue_trial``), so the search can never report worse than the baseline;
2. one or more workers take trials until the study holds ``trials`` of them. Workers may be processes on
   this machine (``--workers``) or other machines running the same command against the same database;
   each trial is a nested MLflow run that trains with ``pipeline.steps.train`` and reports every
   epoch to the pruner;
3. the parent run records the best trial, a table of all trials and Optuna's figures;
4. the best trial's model is evaluated on test and registered (``pipeline.evaluate``, ``pipeline.registry``).

Weight decay and zero: Optuna's log-uniform range cannot contain 0, so every trial draws two parameters,
``use_weight_decay`` (True/False) and ``weight_decay`` (log-uniform), and trains with
``weight_decay if use_weight_decay else 0``. Both are drawn in every trial, not one inside the other,
so that parameter importances and the parallel-coordinate plot see them in every trial.
"""

import contextlib
import importlib.util
import multiprocessing
import signal
import time
import warnings
from dataclasses import asdict

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import sqlalchemy.exc
import torch
from mlflow import MlflowClient
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from pipeline import steps, tracking
from pipeline.config import JOURNAL_SCHEME, SearchSpace, TrainConfig, TuneConfig, is_journal
from pipeline.data import Splits
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate_step
from pipeline.registry import promote_if_better
from pipeline.train import DivergedError, Tensors

# Where the two sides point at each other: Optuna user attrs name the MLflow run and model,
# MLflow tags name the study and trial.
RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
FAIL_REASON_ATTR = "fail_reason"  # a failed trial with a result: training diverged
STUDY_TAG = "pipeline.study_name"
TRIAL_TAG = "pipeline.trial_number"
STATE_TAG = "pipeline.trial_state"
BEST_MODEL_TAG = "pipeline.best_model_uri"


# ---------------------------------------------------------------------------------------------------
# The search space, samplers and pruners


def seed_recipe_params(space: SearchSpace) -> dict:
    """The book's recipe (TrainConfig's defaults) as trial parameters: the study's first trial."""
    seed = TrainConfig()
    return {"lr": seed.lr, "epochs": seed.epochs, "use_weight_decay": seed.weight_decay > 0,
            "weight_decay": seed.weight_decay or space.wd_low}  # unused while use_weight_decay is False


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict:
    """Draw one trial's hyperparameters; returns the values training uses."""
    lr = trial.suggest_float("lr", space.lr_low, space.lr_high, log=True)
    epochs = trial.suggest_int("epochs", space.epochs_low, space.epochs_high)
    use_weight_decay = trial.suggest_categorical("use_weight_decay", [False, True])
    weight_decay = trial.suggest_float("weight_decay", space.wd_low, space.wd_high, log=True)
    return {"lr": lr, "epochs": epochs, "weight_decay": weight_decay if use_weight_decay else 0.0}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, space: SearchSpace) -> optuna.pruners.BasePruner:
    if name == "median":
        # Compare trials only after a few epochs: a small learning rate starts slowly but may end best.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.epochs_high)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------------
# Storage


def printable_url(url: str) -> str:
    """The storage URL without its password, for logs and errors."""
    if is_journal(url):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands; the error that follows says so
        return url


def close_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat callback: Optuna has failed a trial whose worker died silently; end its MLflow run too."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        client = MlflowClient()
        client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
        client.set_tag(run_id, "pipeline.failure", "its worker stopped sending heartbeats (killed or lost)")
        client.set_terminated(run_id, status="KILLED")


def with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; the project installs psycopg2."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def open_database_storage(cfg: TuneConfig, attempts: int = 3) -> RDBStorage:
    # A sqlite writer waits up to a minute for another's lock instead of failing "database is
    # locked"; other databases get a connection check so that a dropped connection is reopened.
    is_sqlite = cfg.storage.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite else {"pool_pre_ping": True}
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(with_installed_driver(cfg.storage), engine_kwargs=engine_kwargs,
                                  heartbeat_interval=cfg.heartbeat_interval,
                                  heartbeat_stale_trial_callback=close_stale_run)
        # Workers that open a new database at the same moment all create Optuna's tables, and the
        # losers fail on a duplicate table or key. The tables exist by then: opening again works.
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == attempts:
                raise
            time.sleep(attempt)


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """A journal file, or a database through SQLAlchemy (sqlite, PostgreSQL, MySQL...)."""
    try:
        if is_journal(cfg.storage):
            path = cfg.storage.removeprefix(JOURNAL_SCHEME)
            return JournalStorage(JournalFileBackend(path))
        return open_database_storage(cfg)
    except Exception as e:
        raise PipelineError(
            f"cannot open the Optuna storage {printable_url(cfg.storage)} ({type(e).__name__}: {e}); "
            "check the URL, that the database server is running and reachable, and that its driver "
            "is installed (psycopg2 for postgresql://, pymysql for mysql+pymysql://)"
        )


def open_study(cfg: TuneConfig, space: SearchSpace, storage) -> optuna.Study:
    """Create the study with the seed recipe as its first trial, or resume it if it exists."""
    try:
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:  # resume: never overwrite a study
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise PipelineError(f"study {cfg.study_name!r} exists but minimizes; pick another --study-name")
        return study
    # Only the process that created the study gets here (the database enforces unique names), so
    # the seed trial is queued exactly once even when several machines start together.
    study.enqueue_trial(seed_recipe_params(space), user_attrs={"recipe": "seed (d2l 3.7)"})
    return study


# ---------------------------------------------------------------------------------------------------
# One trial


def report_to(trial: optuna.Trial):
    """An ``on_epoch`` callback for steps.train: report val accuracy to the pruner, stop if it says so."""

    def on_epoch(metrics: dict) -> None:
        trial.report(metrics["val_accuracy"], step=metrics["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}: "
                                     f"val accuracy {metrics['val_accuracy']:.4f}")

    return on_epoch


def run_trial(trial: optuna.Trial, cfg: TuneConfig, space: SearchSpace, splits: Splits, tensors: Tensors,
              parent: mlflow.entities.RunInfo) -> float:
    """Train with the trial's parameters in a nested MLflow run; return the best val accuracy.

    The MLflow run always ends: FINISHED when complete or pruned, FAILED when training diverged,
    KILLED when interrupted; its tag ``pipeline.trial_state`` holds Optuna's state.
    """
    params = suggest_params(trial, space)
    train_cfg = TrainConfig(**params, batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed)
    run = mlflow.start_run(run_name=f"trial-{trial.number}", experiment_id=parent.experiment_id,
                           parent_run_id=parent.run_id, nested=True,
                           tags={STUDY_TAG: cfg.study_name, TRIAL_TAG: str(trial.number)})
    state, status = TrialState.FAIL, "FAILED"
    try:
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        result, model_info = steps.train(train_cfg, splits, tensors=tensors, progress=False,
                                         on_epoch=report_to(trial))
        trial.set_user_attr(MODEL_URI_ATTR, model_info.model_uri)
        trial.set_user_attr("best_epoch", result.best_epoch)
        state, status = TrialState.COMPLETE, "FINISHED"
        return result.best_val_accuracy
    except optuna.TrialPruned:
        state, status = TrialState.PRUNED, "FINISHED"
        raise
    except DivergedError as e:  # a failed trial, not a failed study: optimize(catch=...) goes on
        trial.set_user_attr(FAIL_REASON_ATTR, e.message)
        raise
    except KeyboardInterrupt as e:  # no result: this trial's place goes to a new trial on resume
        reason = f"interrupted ({e.args[0] if e.args else 'Ctrl-C'})"
        trial.set_user_attr("interrupted", reason)
        mlflow.set_tag("pipeline.failure", reason)
        status = "KILLED"
        raise
    finally:
        mlflow.set_tag(STATE_TAG, state.name)
        mlflow.end_run(status)


# ---------------------------------------------------------------------------------------------------
# Workers


@contextlib.contextmanager
def interrupts_raise_keyboard_interrupt():
    """Make SIGTERM act like Ctrl-C, and ignore further signals while the interrupted trial closes.

    Optuna marks a trial FAIL when its objective sees KeyboardInterrupt, and run_trial ends the
    trial's MLflow run; a second Ctrl-C or a SIGTERM arriving during that clean-up would cut it short.
    """
    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here, leave them alone
        yield
        return

    def interrupt_once(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in previous:
        signal.signal(s, interrupt_once)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def work_on_study(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Take trials until the study holds ``cfg.trials``; any number of these may run at once.

    Trials still running in other workers or on other machines hold their place, so the workers
    together stop at the total. (Optuna cannot create a trial only if the study is not yet full, so
    two workers that check within the same few milliseconds could both start one and overshoot by
    one; with trials lasting seconds this is rare.) Each trial gets a fresh sampler seeded with the seed plus the number
    of trials so far: one worker gives the same study for the same seed, while workers elsewhere,
    which would otherwise draw the same random points from the same seed, draw different ones.
    """
    # One thread per worker: a 784x10 matrix product gains nothing from more, and threads that
    # spin-wait for each other run ~10x slower when the cores are shared. Use --workers for more cores.
    torch.set_num_threads(1)
    tensors = Tensors.from_splits(splits)  # once per process, shared by all its trials
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg),
                              pruner=make_pruner(cfg.pruner, space))
    while True:
        trials = study.get_trials(deepcopy=False)
        if sum(map(counts_toward_total, trials)) >= cfg.trials:
            return
        study.sampler = make_sampler(cfg.sampler, cfg.seed + len(trials))
        study.optimize(lambda trial: run_trial(trial, cfg, space, splits, tensors, parent),
                       n_trials=1, catch=(DivergedError,))


def counts_toward_total(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial counts toward ``--trials`` (running ones hold their place) except failed trials
    without a result, i.e. interrupted or whose worker died: their place is taken by a new trial."""
    return trial.state != TrialState.FAIL or FAIL_REASON_ATTR in trial.user_attrs


def worker_process(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo,
                   tracking_uri: str) -> None:
    """Entry point of a ``--workers`` process (spawned: a fresh interpreter)."""
    mlflow.set_tracking_uri(tracking_uri)
    with interrupts_raise_keyboard_interrupt():
        work_on_study(cfg, space, splits, parent)


def run_workers(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Run the trials here (one worker) or in ``cfg.workers`` processes, all on the same study."""
    if cfg.workers == 1:
        work_on_study(cfg, space, splits, parent)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch/sqlite start is unsafe
    processes = [context.Process(target=worker_process, name=f"tune-worker-{i}",
                                 args=(cfg, space, splits, parent, mlflow.get_tracking_uri()))
                 for i in range(cfg.workers)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:
        for p in processes:  # SIGTERM: each worker fails its trial and ends its run, then exits
            p.terminate()
        for p in processes:
            p.join()
        raise
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise PipelineError(f"{', '.join(failed)} failed, see the messages above; the finished trials "
                            "are kept in the study: run the same command again to resume it")


# ---------------------------------------------------------------------------------------------------
# Recording the study on the parent run


FIGURES = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
}


def log_figures(study: optuna.Study) -> None:
    """Optuna's matplotlib figures as PNGs under study/; a figure the study cannot make yet is skipped."""
    for name, plot in FIGURES.items():
        with warnings.catch_warnings():  # experimental API; axis-limit notes for studies of few trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances need two finished trials
                print(f"tune: figure {name} skipped: {e}")
                continue
        figure = np.ravel(axes)[0].figure
        mlflow.log_figure(figure, f"study/{name}.png")
        plt.close(figure)


def log_trials_table(study: optuna.Study) -> None:
    """Every trial as a row: params, value, state, duration, MLflow run id (CSV and an MLflow table)."""
    table = study.trials_dataframe()
    for column in table.columns:  # timestamps and durations as text, which JSON can hold
        if table[column].dtype.kind in "mM":
            table[column] = table[column].astype(str)
    mlflow.log_table(table, artifact_file="study/trials.json")
    mlflow.log_text(table.to_csv(index=False), "study/trials.csv")


def record_best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Log the best trial on the parent run and return it."""
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{state}": n for state, n in counts.items()})
    try:
        best = study.best_trial
    except ValueError:
        raise PipelineError(f"no trial of study {study.study_name!r} completed ({counts}); see the "
                            "failure reasons in the trials table, then widen or move the search space")
    model_uri = best.user_attrs[MODEL_URI_ATTR]
    study.set_user_attr("best_model_uri", model_uri)
    used = best_training_params(best)
    mlflow.log_params({f"best_{k}": v for k, v in used.items()})
    mlflow.log_metric("best_val_accuracy", best.value)
    mlflow.set_tags({BEST_MODEL_TAG: model_uri, "pipeline.best_trial": best.number,
                     "pipeline.best_run_id": best.user_attrs[RUN_ID_ATTR]})
    return best


def best_training_params(trial: optuna.trial.FrozenTrial) -> dict:
    p = trial.params
    return {"lr": p["lr"], "epochs": p["epochs"],
            "weight_decay": p["weight_decay"] if p["use_weight_decay"] else 0.0}


def evaluate_best(model_uri: str, val_accuracy: float, splits: Splits) -> dict:
    """Test metrics of the best model (in a nested "evaluate" run), and register it if it is better."""
    with mlflow.start_run(run_name="evaluate", nested=True,
                          experiment_id=mlflow.active_run().info.experiment_id):
        result = evaluate_step(model_uri, splits)
        promote_if_better(model_uri, val_accuracy)
    metrics = {k: result[k] for k in ("test_accuracy", "test_loss")}
    mlflow.log_metrics({f"best_{k}": v for k, v in metrics.items()})  # on the parent, beside best_val_accuracy
    return metrics


# ---------------------------------------------------------------------------------------------------
# The study


def run_study(tune_cfg: TuneConfig, space: SearchSpace, data_uri: str) -> optuna.Study:
    """Run (or resume) the study, record it on the active MLflow run, evaluate and register the best.

    Called inside ``mlflow.start_run()`` like the other steps (one is opened if none is active).
    """
    tune_cfg.validate()
    space.validate()
    own_run = mlflow.start_run(run_name="tune") if mlflow.active_run() is None else contextlib.nullcontext()
    with own_run, interrupts_raise_keyboard_interrupt():
        parent = mlflow.active_run().info
        tracking.log_new_params({**asdict(tune_cfg), "storage": printable_url(tune_cfg.storage),
                                 **asdict(space), "data": data_uri})
        mlflow.set_tag(STUDY_TAG, tune_cfg.study_name)
        splits = steps.load_data(data_uri)
        study = open_study(tune_cfg, space, open_storage(tune_cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # trials whose worker died since (SQL storages)
        run_workers(tune_cfg, space, splits, parent)
        log_trials_table(study)
        log_figures(study)
        best = record_best(study)
        if tune_cfg.evaluate:
            evaluate_best(best.user_attrs[MODEL_URI_ATTR], best.value, splits)
    return study


def describe(study: optuna.Study) -> str:
    """One line for the terminal: the study's size and its best trial."""
    best = study.best_trial
    params = ", ".join(f"{k} {v:.4g}" for k, v in best_training_params(best).items())
    return (f"study {study.study_name!r}: {len(study.trials)} trials; best trial {best.number}: "
            f"val accuracy {best.value:.4f} with {params}; model: {best.user_attrs[MODEL_URI_ATTR]}")
