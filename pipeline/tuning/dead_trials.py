"""Trials whose worker died (kill -9, out of memory, lost machine): found, failed, and their place freed.

A killed worker leaves its trial RUNNING in the study. Left alone, that trial would hold its place for
ever: a rerun would stop one trial short (9 COMPLETE + 1 RUNNING for ``--trials 10``). Two checks find
such trials, at the start of a study and whenever a worker waits for the last trials:

- owner check, every storage: each trial records its worker (``OWNER_ATTR``, ``pipeline.runtime.
  processes``); a worker that ran here and is gone is dead at once;
- heartbeats, database storages only: Optuna fails a trial whose worker (anywhere) has been silent for
  two ``--heartbeat-interval`` s (``optuna.storages.fail_stale_trials``); a journal file has no
  heartbeats, so a trial of a worker that died on another machine stays RUNNING there until its study
  is resumed on that machine.

A dead trial becomes FAIL without a result (``INTERRUPTED_ATTR`` says why), so a new trial takes its
place (``pipeline.tuning.trials.counts_toward_total``), and its MLflow run ends KILLED.
"""

import warnings

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from pipeline.names import INTERRUPTED_ATTR, OWNER_ATTR
from pipeline.runtime import processes
from pipeline.tuning.storage import close_stale_run


def has_heartbeats(storage: BaseStorage) -> bool:
    """Database storages record heartbeats (``storage.open_storage`` always gives them an interval)."""
    return isinstance(storage, RDBStorage)


def trial_id(storage: BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of the study's trial ``number`` (what the storage's own methods take)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def fail_dead_trial(study: optuna.Study, storage: BaseStorage, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Fail another worker's RUNNING trial and end its MLflow run; False if its worker finished it first.

    Through the storage: Optuna's ``Study`` changes only the trials this process asked for."""
    number = trial_id(storage, study, trial.number)
    try:
        storage.set_trial_user_attr(number, INTERRUPTED_ATTR, reason)
        storage.set_trial_state_values(number, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):  # failed or finished meanwhile
        return False
    close_stale_run(study, trial, reason)
    return True


def recover_dead_trials(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """Fail the RUNNING trials whose worker is dead (see the module's doc); returns their numbers."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR, "")
        if processes.is_dead(owner) and fail_dead_trial(study, storage, trial, processes.why_dead(owner)):
            recovered.append(trial.number)
    if has_heartbeats(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # silent workers, anywhere; calls close_stale_run
    if recovered:
        print(f"tune: trial(s) {', '.join(map(str, recovered))} failed: their worker died; new trials take their place")
    return recovered


def watched_running_trials(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """RUNNING trials whose death would be noticed, so worth waiting for: their owner runs here, or
    elsewhere with heartbeats. (A trial whose worker died before recording its owner, within a
    millisecond of its start, is not waited for: it holds its place.)"""
    heartbeats = has_heartbeats(storage)
    watched = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR, "")
        if processes.runs_here(owner) or (processes.parsed(owner) is not None and heartbeats):
            watched.append(trial.number)
    return watched
