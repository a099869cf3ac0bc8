"""Trials side by side (``tune --side-by-side K``): K Optuna trials trained at once as one stacked layer.

``pipeline.core.stacked`` trains K softmax regressions together on the same batches, each exactly as it
would train alone. Each trial still lives the life of a trial (``pipeline.tuning.trials``): asked with
its own MLflow run, its epochs written to its run and reported to the pruner, and its own end, COMPLETE,
PRUNED or FAIL, as soon as it stops, while the others train on; a new trial takes its place at the next
epoch while the study is not full.

The stacked trials' runs are written to by id while they train (the fluent API holds one active run;
a stack needs K); at its end a trial's run becomes the active one, which its inputs, its curves and its
model are logged to, as ``pipeline.tracking.training`` logs a trial trained alone.
"""

import mlflow
import optuna

from pipeline.config import TrainConfig
from pipeline.core.stacked import fit_stacked
from pipeline.core.training import DivergedError, FitResult
from pipeline.tracking.runs import log_epoch
from pipeline.tracking.training import log_fit_result, log_training_inputs
from pipeline.tuning.dead_trials import recover_dead_trials
from pipeline.tuning.trial_ends import close_trial, fail_trials
from pipeline.tuning.trial_state import TrialRun, Worker
from pipeline.tuning.trials import ask_trial, is_full, report_epoch, wait_for_running_trials


def close_stacked(worker: Worker, run: TrialRun, outcome) -> None:
    """A stacked trial stopped: its run becomes the active one for its inputs, curves and model; then it
    is closed as any trial is. An unexpected exception is raised to the group's clean-up."""
    if not isinstance(outcome, FitResult | optuna.TrialPruned | DivergedError):
        raise outcome
    if isinstance(outcome, DivergedError):
        log_epoch(outcome.metrics, run_id=run.run_id)  # the NaN/inf epoch shows in the curves
    mlflow.start_run(run_id=run.run_id, nested=True)
    log_training_inputs(run.cfg, worker.splits)
    model_info = log_fit_result(outcome, worker.splits, run.cfg) if isinstance(outcome, FitResult) else None
    close_trial(worker, run, outcome, model_info)


def run_group(worker: Worker) -> bool:
    """Ask up to K trials, train them side by side, close each as soon as it stops and ask a new one into
    its place while the study is not full; False if the study was already full.

    Each ask checks the count again, so that workers asking at the same time together stop at the total.
    """
    joined: list[TrialRun] = []  # in the order they joined the stack: the stack's index of each
    running: list[TrialRun] = []

    def on_epoch(i: int, metrics: dict) -> None:  # what a trial trained alone does after each epoch
        worker.interrupted()  # before this trial's writes: the store is never cut mid-write
        log_epoch(metrics, run_id=joined[i].run_id)
        report_epoch(worker, joined[i], metrics)

    def on_end(i: int, outcome) -> None:
        close_stacked(worker, joined[i], outcome)  # (if that fails, the clean-up below fails the trial)
        running.remove(joined[i])

    def take(shuffle_offset: int = 0) -> TrialRun | None:
        run = None if is_full(worker) else ask_trial(worker, shuffle_offset)
        if run is not None:
            joined.append(run)
            running.append(run)
        return run

    def refill(epochs_drawn: int) -> TrainConfig | None:  # a new trial takes the finished one's place
        worker.interrupted()
        recover_dead_trials(worker.study, worker.storage)
        run = take(epochs_drawn)
        return run.cfg if run is not None else None

    try:
        for _ in range(worker.cfg.side_by_side):
            if take() is None:
                break
        if not running:
            return False
        fit_stacked([run.cfg for run in running], worker.tensors, on_epoch=on_epoch, on_end=on_end,
                         refill=refill)
        return True
    except BaseException as e:  # an interrupt, a bug or a lost store: fail what runs (no result), then stop
        fail_trials(worker, running, e)
        raise


def work_side_by_side(worker: Worker) -> None:
    """Groups of K trials until the study holds ``cfg.trials``, then, as one at a time, wait for the
    trials still running in other workers (one may fail and free a place)."""
    while True:
        worker.interrupted()
        recover_dead_trials(worker.study, worker.storage)
        if not run_group(worker) and not wait_for_running_trials(worker):
            return
