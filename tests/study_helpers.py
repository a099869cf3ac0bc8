"""What the study tests share: a small search space, the tune command, and reading a study and its runs."""

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna

from pipeline.names import INTERRUPTED_ATTR, RUN_ID_ATTR, STUDY_TAG, TRIAL_STATE_TAG, TRIAL_TAG
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.storage import open_storage

SMALL_SPACE = SearchSpace(epochs_low=1, epochs_high=3)


def load(storage: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(TuneConfig(storage=storage)))


def tune_command(data: Path, storage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "tune", "--data", str(data), "--storage", storage,
            "--study-name", "s", "--epochs-low", "1", "--epochs-high", "3", "--test-best", "false", *extra]


def trial_runs(study_name: str) -> list:
    """The MLflow child runs of a study's trials, across all parent runs."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{STUDY_TAG}` = '{study_name}'")
    return [r for r in runs if TRIAL_TAG in r.data.tags]


def assert_one_finished_run_per_trial(study: optuna.Study) -> None:
    """Every trial has exactly one ended MLflow run, except a surplus trial that gave way untrained."""
    trials = [t for t in study.trials if RUN_ID_ATTR in t.user_attrs or INTERRUPTED_ATTR not in t.user_attrs]
    runs = trial_runs(study.study_name)
    assert Counter(int(r.data.tags[TRIAL_TAG]) for r in runs) == Counter(t.number for t in trials)
    by_id = {r.info.run_id: r for r in runs}
    for trial in trials:
        run = by_id[trial.user_attrs[RUN_ID_ATTR]]
        assert int(run.data.tags[TRIAL_TAG]) == trial.number
        assert run.data.tags[TRIAL_STATE_TAG] == trial.state.name
        assert run.info.status != "RUNNING"
        assert "mlflow.parentRunId" in run.data.tags


def wait_for_trials(storage: str, ready: Callable[[list], bool], what: str, timeout: float = 300) -> None:
    """Poll study "s" in ``storage`` until ``ready(its trials)``; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = load(storage).trials
        except KeyError:  # the study is not created yet
            trials = []
        if ready(trials):
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


def running_with_run(trial) -> bool:
    return trial.state == optuna.trial.TrialState.RUNNING and RUN_ID_ATTR in trial.user_attrs
