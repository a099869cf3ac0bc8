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
3. its end (``pipeline.tuning.trial_ends``: ``close_trial``; ``fail_trials`` for an interrupt or a fault):
   the MLflow run is ended first, with Optuna's state as a tag (a run never depends on Optuna's storage,
   which may be what failed), then Optuna is told.

Ctrl-C and SIGTERM stop a worker only at safe points, between the stores' writes (``worker.interrupted``,
``pipeline.runtime.signals``); an interrupted trial is FAIL without a result (a new trial takes its
place when the study resumes) and its run KILLED.
"""

import time
import warnings

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from pipeline.config import TrainConfig
from pipeline.core.training import DivergedError
from pipeline.names import (
    FAIL_REASON_ATTR,
    INTERRUPTED_ATTR,
    OWNER_ATTR,
    OWNER_TAG,
    RUN_ID_ATTR,
    SIDE_BY_SIDE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
)
from pipeline.runtime.processes import this_process
from pipeline.study_config import TuneConfig
from pipeline.tracking.training import train
from pipeline.tuning.dead_trials import recover_dead_trials, trial_id, watched_running_trials
from pipeline.tuning.search import sampler_for, suggest_params
from pipeline.tuning.trial_ends import close_trial, fail_trials
from pipeline.tuning.trial_state import TrialRun, Worker


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
