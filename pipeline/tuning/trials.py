"""One Optuna trial as one nested MLflow run, and the loop that takes trials until the study is full.

Each trial trains with ``pipeline.tracking.training.train`` (so a trial logs exactly what a train run logs)
and reports every epoch's val accuracy to the pruner.
"""

import copy
import time

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import SearchSpace, TrainConfig, TuneConfig
from pipeline.core.splits import Splits
from pipeline.core.training import DivergedError, Tensors
from pipeline.names import (
    BEST_EPOCH_ATTR,
    FAIL_REASON_ATTR,
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_URI_ATTR,
    OWNER_ATTR,
    OWNER_TAG,
    RUN_ID_ATTR,
    STUDY_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)
from pipeline.runtime.processes import this_process
from pipeline.runtime.signals import interrupt_reason, interrupts_at_safe_points
from pipeline.tracking.training import train
from pipeline.tuning.dead_trials import recover_dead_trials, watched_running_trials
from pipeline.tuning.search import make_pruner, make_sampler, suggest_params
from pipeline.tuning.storage import open_storage


class PrunerReport:
    """An ``on_epoch`` callback: report val accuracy to the trial's pruner, stop the trial if it says so.

    One per trial, whether trained one at a time (through ``tracking.training``, logging to the active run)
    or side by side (``pipeline.tuning.stacked_trials``, logging to the trial's ``run_id``, and with
    the stack's trials sharing one read of the study per epoch: ``shared``).
    """

    def __init__(self, trial: optuna.Trial, run_id: str | None = None, shared: "SharedStudyRead | None" = None):
        self.trial, self.run_id, self.shared = trial, run_id, shared
        self.best = {"best_val_accuracy": -1.0, "best_epoch": 0}  # so far

    def __call__(self, metrics: dict) -> None:
        self.trial.report(metrics["val_accuracy"], step=metrics["epoch"])
        if metrics["val_accuracy"] > self.best["best_val_accuracy"]:
            self.best.update(best_val_accuracy=metrics["val_accuracy"], best_epoch=metrics["epoch"])
        if self.shared.should_prune(self.trial) if self.shared else self.trial.should_prune():
            # what the trial reached before it was stopped: without it MLflow's compare view would
            # draw the pruned run without a best_val_accuracy, at the top of that axis
            mlflow.log_metrics({**self.best, "pruned_at_epoch": metrics["epoch"], "epochs_run": metrics["epoch"]},
                               run_id=self.run_id)
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}: "
                                     f"val accuracy {metrics['val_accuracy']:.4f}")


class SharedStudyRead:
    """One read of the study for the pruner's decisions on all the trials of a stack after an epoch.

    ``Trial.should_prune`` has the pruner read the study's trials for every decision (the median pruner
    compares with the finished trials' curves; the read also brings back every running trial's curve). K
    trials deciding after the same epoch would read the same rows K times, ~5 ms each and more with every
    trial in flight. Here each trial decides once per read, and the read is renewed when a trial comes to
    decide again and when a trial of the stack ends (``renew``): every decision sees every trial this
    worker has finished, as one at a time; only other workers' news can reach it an epoch late.
    """

    def __init__(self, study: optuna.Study):
        self.study, self.read, self.decided = study, None, set()

    def renew(self) -> None:
        self.read = None

    def should_prune(self, trial: optuna.Trial) -> bool:
        if self.read is None or trial.number in self.decided:
            self.read, self.decided = StudyAsRead(self.study, self.study.get_trials(deepcopy=False)), set()
        self.decided.add(trial.number)
        # the trial's own curve, as should_prune passes it (kept by the trial as it reports: no read)
        return self.study.pruner.prune(self.read, trial._get_latest_trial())


class StudyAsRead:
    """A study whose ``get_trials`` answers from one earlier read; everything else is the study's own."""

    def __init__(self, study: optuna.Study, trials: list):
        self._study, self._trials = study, trials

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name):
        return getattr(self._study, name)


class SurplusTrial(Exception):
    """Two workers that counted at the same moment both started a trial: the later-numbered one gives way."""


def refuse_surplus(trial: optuna.Trial, cfg: TuneConfig) -> None:
    """Optuna cannot create a trial only if the study is not yet full; so a new trial checks that the
    trials numbered before it do not already fill the study, and otherwise fails at once, untrained and
    without a run (a failed trial without a result does not count: the study keeps ``cfg.trials``)."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
    if sum(map(counts_toward_total, earlier)) >= cfg.trials:
        reason = f"not needed: the study already holds {cfg.trials} trials"
        trial.set_user_attr(INTERRUPTED_ATTR, reason)
        raise SurplusTrial(f"trial {trial.number} {reason}")


def run_trial(trial: optuna.Trial, cfg: TuneConfig, space: SearchSpace, splits: Splits, tensors: Tensors,
              parent: mlflow.entities.RunInfo, interrupted=lambda: None) -> float:
    """Train with the trial's parameters in a nested MLflow run; return the best val accuracy.

    The MLflow run always ends: FINISHED when complete or pruned, FAILED when training diverged,
    KILLED when interrupted; its tag ``pipeline.trial_state`` holds Optuna's state. ``interrupted``:
    the safe point (``signals.interrupts_at_safe_points``), checked after each epoch's metrics are written.
    """
    trial.set_user_attr(OWNER_ATTR, this_process())  # first: if this process dies, a later run can tell
    refuse_surplus(trial, cfg)
    params = suggest_params(trial, space)
    train_cfg = TrainConfig(**params, batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed)
    run = mlflow.start_run(run_name=f"trial-{trial.number}", experiment_id=parent.experiment_id,
                           parent_run_id=parent.run_id, nested=True,
                           tags={STUDY_TAG: cfg.study_name, TRIAL_TAG: str(trial.number),
                                 OWNER_TAG: this_process()})
    state, status = TrialState.FAIL, "FAILED"
    report = PrunerReport(trial)

    def on_epoch(metrics: dict) -> None:
        interrupted()  # the epoch is written to MLflow, the pruner's write is still to come: a safe point
        report(metrics)

    try:
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        result, model_info = train(train_cfg, splits, tensors=tensors, progress=False, on_epoch=on_epoch)
        trial.set_user_attr(MODEL_URI_ATTR, model_info.model_uri)
        trial.set_user_attr(BEST_EPOCH_ATTR, result.best_epoch)
        state, status = TrialState.COMPLETE, "FINISHED"
        return result.best_val_accuracy
    except optuna.TrialPruned:
        state, status = TrialState.PRUNED, "FINISHED"
        raise
    except DivergedError as e:  # a failed trial, not a failed study: optimize(catch=...) goes on
        trial.set_user_attr(FAIL_REASON_ATTR, e.message)
        raise
    except KeyboardInterrupt as e:  # no result: this trial's place goes to a new trial on resume
        status, reason = "KILLED", interrupt_reason(e)  # first: the run ends KILLED whatever fails below
        trial.set_user_attr(INTERRUPTED_ATTR, reason)
        mlflow.set_tag(FAILURE_TAG, reason)
        raise
    finally:
        try:
            mlflow.set_tag(TRIAL_STATE_TAG, state.name)
        finally:  # a tag that cannot be written must not leave the run RUNNING
            mlflow.end_run(status)


def work_on_study(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Take trials until the study holds ``cfg.trials``; any number of these may run at once.

    Trials still running in other workers or on other machines hold their place, so the workers
    together stop at the total (two workers that check within the same few milliseconds may both start
    one: the surplus one gives way at once, ``refuse_surplus``). Each trial gets a fresh sampler seeded
    with the seed plus the number of trials so far: one worker gives the same study for the same seed,
    while workers elsewhere, which would otherwise draw the same random points from the same seed, draw
    different ones.
    """
    # One thread per worker: a 784x10 matrix product gains nothing from more, and threads that
    # spin-wait for each other run ~10x slower when the cores are shared. Use --workers for more cores.
    torch.set_num_threads(1)
    tensors = Tensors.from_splits(splits)  # once per process, shared by all its trials
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg),
                              pruner=make_pruner(cfg.pruner, space))
    # Ctrl-C and SIGTERM stop the trials only at safe points, between the stores' writes (why: signals.py)
    with interrupts_at_safe_points() as interrupted:
        if cfg.side_by_side > 1:  # K trials at a time, trained as one stack (imported here: it imports us)
            from pipeline.tuning.stacked_trials import work_side_by_side
            return work_side_by_side(study, cfg, space, splits, tensors, parent, interrupted)
        while True:
            interrupted()
            recover_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            if sum(map(counts_toward_total, trials)) >= cfg.trials:
                if not wait_for_running_trials(study, interrupted):
                    return
                continue  # they ended: count again, a place may be free
            study.sampler = make_sampler(cfg.sampler, cfg.seed + len(trials))
            study.optimize(lambda trial: run_trial(trial, cfg, space, splits, tensors, parent, interrupted),
                           n_trials=1, catch=(DivergedError, SurplusTrial))


def wait_for_running_trials(study: optuna.Study, interrupted, poll_seconds: float = 1.0) -> bool:
    """Wait while the study's last trials run in other workers; False if there were none.

    The study is full, but a running trial may still be interrupted or its worker die: then its
    place is free again and this worker takes it, so that the study ends with the trials asked for.
    Only trials whose death would be noticed are waited for (``watched_running_trials``).
    """
    waited = False
    while running := watched_running_trials(study):
        if not waited:
            print(f"tune: waiting for trial(s) {', '.join(map(str, running))} of other workers to finish")
            waited = True
        time.sleep(poll_seconds)
        interrupted()
        recover_dead_trials(study)
    return waited


def counts_toward_total(trial: optuna.trial.FrozenTrial) -> bool:
    """Every trial counts toward ``--trials`` (running ones hold their place) except failed trials
    without a result, i.e. interrupted or whose worker died: their place is taken by a new trial; and
    queued ones (the seed recipe), which have not started: with ``--trials 1`` the seed trial must run."""
    if trial.state == TrialState.WAITING:
        return False
    return trial.state != TrialState.FAIL or FAIL_REASON_ATTR in trial.user_attrs
