"""Optuna trials, each one nested MLflow run: asked, trained, reported epoch by epoch, then told.

A worker trains its trials one at a time (``work_one_at_a_time`` here: any model, through
``pipeline.tracking.training.train``, exactly as the ``train`` command does) or K at once as one stacked
layer (``pipeline.tuning.stacked_trials``). Both drive Optuna through its ask-and-tell interface and
share each trial's life:

1. ``ask_trial``: a trial (a queued one first: the seed recipe), its owner recorded first (if this
   process dies, a later command can tell), a check that workers asking at the same moment did not
   overfill the study, its heartbeat (database storages), its settings, and its MLflow run;
2. each epoch: the metrics are written to the run, then the val accuracy goes to the pruner
   (``report_epoch``), which may stop the trial;
3. its end (``close_trial``; ``fail_trials`` for an interrupt or a fault): the MLflow run is ended first,
   with Optuna's state as a tag (a run never depends on Optuna's storage, which may be what failed),
   then Optuna is told.

Ctrl-C and SIGTERM stop a worker only at safe points, between the stores' writes (``worker.interrupted``,
``pipeline.runtime.signals``); an interrupted trial is FAIL without a result (a new trial takes its
place when the study resumes) and its run KILLED.
"""

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.entities import RunInfo
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from pipeline.config import TrainConfig
from pipeline.core import figures
from pipeline.core.splits import Splits
from pipeline.core.training import DivergedError, FitResult, Tensors
from pipeline.faults import fault_of
from pipeline.names import (
    BEST_EPOCH_ATTR,
    CURVES_FIGURE,
    FAIL_REASON_ATTR,
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_URI_ATTR,
    NO_MODEL_NOTE,
    OWNER_ATTR,
    OWNER_TAG,
    RUN_ID_ATTR,
    SIDE_BY_SIDE_TAG,
    STUDY_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)
from pipeline.runtime.processes import this_process
from pipeline.runtime.signals import interrupt_reason
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tracking.training import train
from pipeline.tuning.dead_trials import has_heartbeats, recover_dead_trials, trial_id, watched_running_trials
from pipeline.tuning.search import sampler_for, suggest_params
from pipeline.tuning.storage import storage_problem


class Heartbeats:
    """One thread that records a heartbeat for every running trial of this worker, each interval.

    So a worker killed without a word has its trials failed by any other worker, on any machine
    (``dead_trials``). Journal files have no heartbeats: there the thread never starts.
    """

    def __init__(self, storage: BaseStorage, interval: int):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="trial heartbeats", daemon=True)

    def __enter__(self) -> "Heartbeats":
        if has_heartbeats(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial_id: int) -> None:
        if has_heartbeats(self.storage):
            self.storage.record_heartbeat(trial_id)  # at once: a trial without one is never found stale
        self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        self.trial_ids.discard(trial_id)

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            for number in list(self.trial_ids):
                self.storage.record_heartbeat(number)


@dataclass
class Worker:
    """What a worker's trials share: the study and its storage, the settings, the data, the parent run."""

    study: optuna.Study
    storage: BaseStorage
    cfg: TuneConfig
    space: SearchSpace
    splits: Splits
    tensors: Tensors
    parent: RunInfo
    interrupted: Callable[[], None]  # the safe point: raises KeyboardInterrupt once Ctrl-C or SIGTERM came
    heartbeats: Heartbeats


@dataclass
class TrialRun:
    """A trial that has been asked and not yet told, with its MLflow run."""

    trial: optuna.Trial
    trial_id: int
    cfg: TrainConfig
    run_id: str
    history: list[dict] = field(default_factory=list)  # its epochs so far, for its curves if it is pruned


def counts_toward_total(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial counts toward ``--trials`` (running ones hold their place) except failed trials
    without a result, i.e. interrupted or whose worker died: their place is taken by a new trial; and
    queued ones (the seed recipe), which have not started: with ``--trials 1`` the seed trial must run."""
    if trial.state == TrialState.WAITING:
        return False
    return trial.state != TrialState.FAIL or FAIL_REASON_ATTR in trial.user_attrs


def is_full(worker: Worker) -> bool:
    """Whether the study holds ``cfg.trials`` trials that count."""
    return sum(map(counts_toward_total, worker.study.get_trials(deepcopy=False))) >= worker.cfg.trials


def is_surplus(trial: optuna.Trial, cfg: TuneConfig) -> bool:
    """Whether the trials numbered before this new one already fill the study: two workers that counted
    at the same moment both asked one, and the later-numbered gives way."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    return sum(map(counts_toward_total, earlier)) >= cfg.trials


def ask_trial(worker: Worker, shuffle_offset: int = 0) -> TrialRun | None:
    """Ask a trial and start its heartbeat and its MLflow run; None if it is surplus (``is_surplus``).

    ``shuffle_offset``: how many epochs of batch orders a stack drew before this trial joined it (its
    settings record it, so that the trial trained alone with them gives the same result).
    """
    cfg = worker.cfg
    with warnings.catch_warnings():  # Optuna warns that heartbeats belong to optimize: ``Heartbeats`` records them
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = worker.study.ask()
    trial.set_user_attr(OWNER_ATTR, this_process())
    if is_surplus(trial, cfg):  # it gives way untrained, without a run; a failed trial without a result
        trial.set_user_attr(INTERRUPTED_ATTR, f"not needed: the study already holds {cfg.trials} trials")
        worker.study.tell(trial, state=TrialState.FAIL)  # does not count
        return None
    number = trial_id(worker.storage, worker.study, trial.number)
    worker.heartbeats.add(number)
    # A fresh sampler, seeded by the study's seed and this trial's number, which the storage gives each trial
    # once: the same study for the same seed with one worker, and different points for workers anywhere that
    # ask at the same moment (a seed from the count of trials so far would be the same for both). Optuna
    # draws a trial's values when they are first suggested, a GP sampler's joint draw included.
    worker.study.sampler = sampler_for(cfg, f"trial {trial.number}")
    train_cfg = TrainConfig(**suggest_params(trial, worker.space, cfg.model), model=cfg.model,
                            batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed,
                            shuffle_offset=shuffle_offset)
    name = f"trial-{trial.number}"
    created = MlflowClient().create_run(
        worker.parent.experiment_id, run_name=name,
        tags={MLFLOW_PARENT_RUN_ID: worker.parent.run_id, STUDY_TAG: cfg.study_name, TRIAL_TAG: str(trial.number),
              SIDE_BY_SIDE_TAG: str(cfg.side_by_side), OWNER_TAG: this_process()})
    run = TrialRun(trial, number, train_cfg, created.info.run_id)
    try:
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
    except BaseException as e:  # the storage failed (or an interrupt came) just after the run was made
        fail_trials(worker, [run], e)
        raise
    return run


def report_epoch(worker: Worker, run: TrialRun, metrics: dict) -> None:
    """After an epoch's metrics are written to the trial's run: its val accuracy to the pruner, which
    may stop the trial (``optuna.TrialPruned``). A safe point comes first: no write is under way."""
    worker.interrupted()
    run.history.append(metrics)
    run.trial.report(metrics["val_accuracy"], step=metrics["epoch"])
    if run.trial.should_prune():
        raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}: val accuracy {metrics['val_accuracy']:.4f}")


def end_run(run: TrialRun, state: TrialState, status: str, reason: str | None = None) -> None:
    """End the trial's MLflow run with Optuna's state as a tag: the active run, or one written to by id."""
    client = MlflowClient()
    try:
        client.set_tag(run.run_id, TRIAL_STATE_TAG, state.name)
        if reason:
            client.set_tag(run.run_id, FAILURE_TAG, reason)
    finally:  # a tag that cannot be written must not leave the run RUNNING
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run.run_id, status=status)


def tell(worker: Worker, run: TrialRun, state: TrialState, value: float | None = None) -> None:
    worker.heartbeats.remove(run.trial_id)
    worker.study.tell(run.trial, value, state=state)


def log_stopped_early(run: TrialRun, why: str) -> None:
    """On the active run of a trial that keeps no model: its curves so far, what it reached, and a note
    where its model would be, so that every trial's run holds the same things."""
    best = max(run.history, key=lambda m: m["val_accuracy"])
    mlflow.log_metrics({"best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                        "epochs_run": len(run.history), "pruned_at_epoch": len(run.history)})
    mlflow.log_figure(figures.training_curves(run.history, f"trial {run.trial.number}: {why}"), CURVES_FIGURE)
    mlflow.log_text(f"No model: {why}. Only trials that train to their end keep a model.\n", NO_MODEL_NOTE)


def close_trial(worker: Worker, run: TrialRun, outcome, model_info=None) -> None:
    """End a trial by what stopped its training, on its active MLflow run; then tell Optuna.

    ``outcome``: the ``FitResult`` (with the logged model's ``model_info``), ``optuna.TrialPruned`` or
    ``DivergedError``.
    """
    if isinstance(outcome, FitResult):
        run.trial.set_user_attr(MODEL_URI_ATTR, model_info.model_uri)
        run.trial.set_user_attr(BEST_EPOCH_ATTR, outcome.best_epoch)
        end_run(run, TrialState.COMPLETE, "FINISHED")
        tell(worker, run, TrialState.COMPLETE, outcome.best_val_accuracy)
    elif isinstance(outcome, optuna.TrialPruned):
        log_stopped_early(run, str(outcome))
        MlflowClient().update_run(run.run_id, name=f"trial-{run.trial.number} (pruned)")  # seen in the runs table
        end_run(run, TrialState.PRUNED, "FINISHED")
        tell(worker, run, TrialState.PRUNED)
    elif isinstance(outcome, DivergedError):  # a failed trial, not a failed study: the others go on
        mlflow.log_text(f"No model: {outcome.message}\n", NO_MODEL_NOTE)
        run.trial.set_user_attr(FAIL_REASON_ATTR, outcome.message)
        end_run(run, TrialState.FAIL, "FAILED", outcome.message)
        tell(worker, run, TrialState.FAIL)
    else:
        raise TypeError(f"not a trial's outcome: {outcome!r}")


def fail_trials(worker: Worker, runs: list[TrialRun], error: BaseException) -> None:
    """Trials stopped by an interrupt (their runs KILLED, each FAIL and marked interrupted, so that its
    place goes to a new trial) or by an error (runs FAILED): every run is ended first, then Optuna is
    told until its storage fails (the next command fails the trials left RUNNING, ``dead_trials``)."""
    if isinstance(error, KeyboardInterrupt):
        status, reason = "KILLED", interrupt_reason(error)
    else:
        status = "FAILED"
        reason = storage_problem(worker.cfg.storage, error) or f"{type(error).__name__}: {error}"
    for run in runs:
        end_run(run, TrialState.FAIL, status, reason)
    for run in runs:
        try:
            if status == "KILLED":
                run.trial.set_user_attr(INTERRUPTED_ATTR, reason)
            tell(worker, run, TrialState.FAIL)
        except Exception as e:
            if fault_of(e) is None:
                raise
            return


def train_alone(worker: Worker, run: TrialRun) -> None:
    """Train one trial as the ``train`` command would, its run the active one; close it by its outcome."""
    mlflow.start_run(run_id=run.run_id, nested=True)
    try:
        try:
            outcome, model_info = train(run.cfg, worker.splits, worker.tensors, progress=False,
                                        on_epoch=lambda metrics: report_epoch(worker, run, metrics))
        except (optuna.TrialPruned, DivergedError) as stopped:
            outcome, model_info = stopped, None
        close_trial(worker, run, outcome, model_info)
    except BaseException as e:  # in training or in closing (the storage may fail at the last write)
        fail_trials(worker, [run], e)
        raise


def wait_for_running_trials(worker: Worker, poll_seconds: float = 1.0) -> bool:
    """Wait while the study's last trials run in other workers; False if there were none.

    The study is full, but a running trial may still be interrupted or its worker die: then its
    place is free again and this worker takes it, so that the study ends with the trials asked for.
    Only trials whose death would be noticed are waited for (``watched_running_trials``).
    """
    waited = False
    while running := watched_running_trials(worker.study, worker.storage):
        if not waited:
            print(f"tune: waiting for trial(s) {', '.join(map(str, running))} of other workers to finish")
            waited = True
        time.sleep(poll_seconds)
        worker.interrupted()
        recover_dead_trials(worker.study, worker.storage)
    return waited


def work_one_at_a_time(worker: Worker) -> None:
    """Take trials one after the other until the study holds ``cfg.trials``, then wait for the trials
    still running elsewhere (one may fail and free a place)."""
    while True:
        worker.interrupted()
        recover_dead_trials(worker.study, worker.storage)
        if is_full(worker):
            if not wait_for_running_trials(worker):
                return
            continue  # they ended: count again, a place may be free
        run = ask_trial(worker)
        if run is not None:
            train_alone(worker, run)
