"""How a trial ends: its MLflow run first, with Optuna's state as a tag (a run never depends on Optuna's
storage, which may be what failed), then Optuna is told. ``close_trial`` ends a trial by what stopped its
training; ``fail_trials`` ends trials stopped by an interrupt or a fault."""


import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.core import figures
from pipeline.core.training import DivergedError, FitResult
from pipeline.faults import fault_of
from pipeline.names import (
    BEST_EPOCH_ATTR,
    CURVES_FIGURE,
    FAIL_REASON_ATTR,
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_URI_ATTR,
    NO_MODEL_NOTE,
    TRIAL_STATE_TAG,
)
from pipeline.runtime.signals import interrupt_reason
from pipeline.tuning.storage import storage_problem
from pipeline.tuning.trial_state import TrialRun, Worker


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
