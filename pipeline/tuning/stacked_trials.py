"""Trials side by side (``tune --side-by-side K``): K Optuna trials trained at once as one stacked layer.

``pipeline.tuning.trials`` runs one trial at a time through ``study.optimize``. Here Optuna's ask/tell
interface takes K trials at once; ``pipeline.core.stacked`` trains them together on the same
batches, each exactly as it would train alone. Each trial still gets everything a trial gets one at a
time: its own nested MLflow run with its params, per-epoch metrics, curves figure, model and summary
(logged by ``pipeline.tracking.training.log_fit_result``), its own pruner reports, and its own end: COMPLETE, PRUNED or
FAIL, as soon as it stops, while the others train on.

The lifecycle is explicit, because ``study.optimize`` no longer does it for us: every asked trial is
told its state; each running trial records Optuna heartbeats (SQL storages) from a thread of its own,
as ``optimize`` does, so that a killed worker's trials are failed (``recover_dead_trials``: its owner gone on
this host, or its heartbeats stopped); on Ctrl-C or
SIGTERM every running trial is told FAIL (marked interrupted: its place goes to a new trial on resume)
and its MLflow run ends KILLED.
"""

import warnings
from dataclasses import asdict, dataclass

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.tracking.context import registry as mlflow_context
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from optuna.storages._heartbeat import BaseHeartbeatThread, get_heartbeat_thread
from optuna.trial import TrialState

from pipeline.config import SearchSpace, TrainConfig, TuneConfig
from pipeline.core.splits import Splits
from pipeline.core.stacked import fit_side_by_side
from pipeline.core.training import DivergedError, FitResult, Tensors
from pipeline.errors import fault_of
from pipeline.names import (
    BEST_EPOCH_ATTR,
    FAIL_REASON_ATTR,
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_URI_ATTR,
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
from pipeline.tracking.runs import log_epoch
from pipeline.tracking.training import log_fit_result, log_training_inputs
from pipeline.tuning.dead_trials import recover_dead_trials
from pipeline.tuning.search import make_sampler, suggest_params
from pipeline.tuning.storage import storage_problem
from pipeline.tuning.trials import (
    PrunerReport,
    SharedStudyRead,
    SurplusTrial,
    counts_toward_total,
    refuse_surplus,
    wait_for_running_trials,
)


@dataclass
class Running:
    """An asked trial that has not been told yet, and its MLflow run."""

    trial: optuna.Trial
    heartbeat: BaseHeartbeatThread
    cfg: TrainConfig | None = None
    run_id: str | None = None
    report: PrunerReport | None = None  # its epochs to the pruner


def ask(study: optuna.Study, cfg: TuneConfig, space: SearchSpace, parent, running: list, pruning: SharedStudyRead,
        shuffle_offset: int = 0) -> Running | None:
    """Ask one trial (a queued one first, e.g. the seed recipe), start its heartbeat and its MLflow run;
    None if another worker, asking at the same moment, filled the study (``refuse_surplus``).

    ``pruning``: the stack's shared read of the study for its pruner. ``shuffle_offset``: the epochs of
    batch orders the stack has drawn before this trial joins it (its params record it, so that the trial
    trained alone with them gives the same result)."""
    # a fresh sampler per trial, seeded as pipeline.tuning.trials does: one worker gives the same study
    # for the same seed, workers elsewhere draw different points
    study.sampler = make_sampler(cfg.sampler, cfg.seed + len(study.get_trials(deepcopy=False)))
    with warnings.catch_warnings():  # Optuna warns that heartbeats belong to optimize: we record them below
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
    trial.set_user_attr(OWNER_ATTR, this_process())  # first: if this process dies, a later run can tell
    try:
        refuse_surplus(trial, cfg)
    except SurplusTrial:  # it gives way untrained, without a run, as one at a time does
        study.tell(trial, state=TrialState.FAIL)
        return None
    member = Running(trial, get_heartbeat_thread(trial._trial_id, study._storage))
    member.heartbeat.start()
    running.append(member)  # from here on, the clean-up tells it and stops its heartbeat
    member.cfg = TrainConfig(**suggest_params(trial, space), batch_size=cfg.batch_size, patience=cfg.patience,
                             seed=cfg.seed, shuffle_offset=shuffle_offset)
    name = f"trial-{trial.number}"
    # the tags mlflow.start_run(nested=True) would set (user, source, parent), for a run we keep open
    # beside the others: the fluent API holds one active run, a group needs K
    tags = mlflow_context.resolve_tags({MLFLOW_PARENT_RUN_ID: parent.run_id, MLFLOW_RUN_NAME: name,
                                        STUDY_TAG: cfg.study_name, TRIAL_TAG: str(trial.number),
                                        SIDE_BY_SIDE_TAG: str(cfg.side_by_side), OWNER_TAG: this_process()})
    member.run_id = MlflowClient().create_run(parent.experiment_id, tags=tags, run_name=name).info.run_id
    trial.set_user_attr(RUN_ID_ATTR, member.run_id)
    member.report = PrunerReport(trial, member.run_id, pruning)
    mlflow.log_params(asdict(member.cfg), run_id=member.run_id)
    return member


def tell(study: optuna.Study, member: Running, state: TrialState, value: float | None = None) -> None:
    member.heartbeat.join()
    study.tell(member.trial, value, state=state)


def end_run(member: Running, state: TrialState, status: str, reason: str | None = None) -> None:
    """End a trial's MLflow run (not the active one) with Optuna's state as a tag."""
    if member.run_id is None:
        return
    client = MlflowClient()
    try:
        client.set_tag(member.run_id, TRIAL_STATE_TAG, state.name)
        if reason:
            client.set_tag(member.run_id, FAILURE_TAG, reason)
    finally:  # a tag that cannot be written must not leave the run RUNNING
        client.set_terminated(member.run_id, status=status)


def complete(study, member: Running, result: FitResult, splits: Splits) -> None:
    """A trial that trained to its end or stopped early: log its result as tracking.training does, tell COMPLETE."""
    with mlflow.start_run(run_id=member.run_id, nested=True):  # ends FAILED if logging raises
        log_training_inputs(member.cfg, splits)
        model_info = log_fit_result(result, splits, member.cfg)
        member.trial.set_user_attr(MODEL_URI_ATTR, model_info.model_uri)
        member.trial.set_user_attr(BEST_EPOCH_ATTR, result.best_epoch)
        mlflow.set_tag(TRIAL_STATE_TAG, TrialState.COMPLETE.name)
    tell(study, member, TrialState.COMPLETE, result.best_val_accuracy)


def finish(study, member: Running, outcome, splits: Splits) -> None:
    """Close one trial by its outcome; an unexpected exception is raised to the group's clean-up."""
    if isinstance(outcome, FitResult):
        complete(study, member, outcome, splits)
    elif isinstance(outcome, optuna.TrialPruned):
        end_run(member, TrialState.PRUNED, "FINISHED")
        tell(study, member, TrialState.PRUNED)
    elif isinstance(outcome, DivergedError):  # a failed trial, not a failed study: the others go on
        log_epoch(outcome.metrics, run_id=member.run_id)  # the NaN/inf epoch shows in the curves
        member.trial.set_user_attr(FAIL_REASON_ATTR, outcome.message)
        end_run(member, TrialState.FAIL, "FAILED", outcome.message)
        tell(study, member, TrialState.FAIL)
    else:
        raise outcome


def run_group(study: optuna.Study, cfg: TuneConfig, space: SearchSpace, splits: Splits, tensors: Tensors,
              parent, interrupted) -> bool:
    """Ask up to K trials, train them side by side, tell each its state as soon as it stops and ask a
    new one into its place while the study is not full; False if the study was already full.

    Each ask checks the count again, so that workers asking at the same time together stop at the total.
    ``interrupted``: the safe point (``signals.interrupts_at_safe_points``), checked between writes.
    """
    running: list[Running] = []
    pruning = SharedStudyRead(study)  # one read of the study per epoch for the pruner, not one per trial

    def on_epoch(i: int, metrics: dict) -> None:  # what tracking.training and a trial one at a time do, per trial
        interrupted()  # between epochs, before this trial's writes: the store is never cut mid-write
        member = running_by_index[i]
        log_epoch(metrics, run_id=member.run_id)
        member.report(metrics)

    def on_end(i: int, outcome) -> None:
        member = running_by_index[i]
        finish(study, member, outcome, splits)
        running.remove(member)
        pruning.renew()  # the trials still to decide after this epoch see this one's end

    def refill(epochs_drawn: int) -> TrainConfig | None:  # a new trial takes the finished one's place
        interrupted()
        recover_dead_trials(study)
        member = None if is_full(study, cfg) else ask(study, cfg, space, parent, running, pruning, epochs_drawn)
        if member is None:
            return None
        running_by_index.append(member)
        return member.cfg

    try:
        for _ in range(cfg.side_by_side):
            if is_full(study, cfg) or ask(study, cfg, space, parent, running, pruning) is None:
                break
        if not running:
            return False
        running_by_index = list(running)
        fit_side_by_side([m.cfg for m in running], tensors, on_epoch=on_epoch, on_end=on_end, refill=refill)
        return True
    except KeyboardInterrupt as e:  # no result: each trial's place goes to a new trial on resume
        reason = interrupt_reason(e)
        for member in running:
            end_run(member, TrialState.FAIL, "KILLED", reason)
        fail_trials(study, running, interrupted=reason)
        raise
    except Exception as e:  # a bug or a lost store: fail what runs (no result, so not counted), then stop
        for member in running:
            end_run(member, TrialState.FAIL, "FAILED", storage_problem(cfg.storage, e) or f"{type(e).__name__}: {e}")
        fail_trials(study, running)
        raise
    finally:  # if telling failed too: a heartbeat thread left running would keep the process alive
        for member in running:
            member.heartbeat.join()  # (joining twice is harmless)


def fail_trials(study: optuna.Study, running: list[Running], interrupted: str | None = None) -> None:
    """Tell each trial FAIL (``interrupted``: why, so that its place goes to a new trial), after their
    MLflow runs have ended: those never depend on the Optuna storage, which may be what failed. Then the
    first fault ends the telling (each would wait for the same storage); the trials left RUNNING are
    failed by the next command (``recover_dead_trials``), and the error that stopped the group is raised.
    """
    for member in running:
        try:
            if interrupted:
                member.trial.set_user_attr(INTERRUPTED_ATTR, interrupted)
            tell(study, member, TrialState.FAIL)
        except Exception as e:
            if fault_of(e) is None:
                raise
            return


def is_full(study: optuna.Study, cfg: TuneConfig) -> bool:
    """Whether the study holds ``cfg.trials`` (as ``work_on_study`` counts them).

    A queued trial (the seed recipe) is left out: the next ask takes it rather than adding one.
    """
    taken = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    return sum(map(counts_toward_total, taken)) >= cfg.trials


def work_side_by_side(study: optuna.Study, cfg: TuneConfig, space: SearchSpace, splits: Splits,
                      tensors: Tensors, parent, interrupted) -> None:
    """``work_on_study`` with up to K trials at a time: groups until the study holds ``cfg.trials``, then,
    as one at a time, waits for the trials still running in other workers (one may fail and free a place)."""
    while True:
        interrupted()
        recover_dead_trials(study)
        if (not run_group(study, cfg, space, splits, tensors, parent, interrupted)
                and not wait_for_running_trials(study, interrupted)):
            return
