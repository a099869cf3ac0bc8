"""Fault injection with real processes and real signals: SIGKILL at random moments, SIGTERM, commands
started at the same moment on new stores. After each fault the next command must leave the stores
whole: the trials asked for, none RUNNING, none twice, and no MLflow run RUNNING for a dead process.

Trials are tiny (a 2,000-image slice of the real data, 1-2 epochs) so that the suite takes minutes.
"""

import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.names import (
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_NAME,
    OWNER_ATTR,
    RUN_ID_ATTR,
    STUDY_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)
from pipeline.study_config import TuneConfig
from pipeline.tuning.storage import open_storage
from pipeline.tuning.trials import counts_toward_total
from tests.helpers import child_env

KILLS_PER_STORAGE = 3
TRIALS = 4


def tune(data: Path, storage: str, study: str = "s", trials: int = TRIALS) -> list[str]:
    return [sys.executable, "-m", "pipeline", "tune", "--data", str(data), "--storage", storage,
            "--study-name", study, "--trials", str(trials), "--epochs-low", "1", "--epochs-high", "2",
            "--pruner", "none", "--test-best", "false"]


def load(storage: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(TuneConfig(storage=storage)))


def running_trials(storage: str) -> list:
    try:
        return load(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:  # the study does not exist yet
        return []


def runs_still_running() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="attributes.status = 'RUNNING'")


def assert_study_is_whole(study: optuna.Study, trials: int) -> None:
    """Exactly ``trials`` trials with a result, none RUNNING, one MLflow run per trial that has one."""
    states = Counter(t.state.name for t in study.trials)
    assert sum(map(counts_toward_total, study.trials)) == trials, states
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    for trial in study.trials:
        if not counts_toward_total(trial):  # killed: failed without a result, its place taken by another
            assert trial.state == TrialState.FAIL and INTERRUPTED_ATTR in trial.user_attrs
    runs = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                          filter_string=f"tags.`{STUDY_TAG}` = '{study.study_name}'")
            if TRIAL_TAG in r.data.tags]
    per_trial = Counter(int(r.data.tags[TRIAL_TAG]) for r in runs)
    assert max(per_trial.values(), default=1) == 1, f"a trial has two runs: {per_trial}"
    by_id = {r.info.run_id: r for r in runs}
    for trial in study.trials:
        if RUN_ID_ATTR in trial.user_attrs:  # (a trial killed before its run started has none)
            run = by_id[trial.user_attrs[RUN_ID_ATTR]]
            assert run.data.tags[TRIAL_STATE_TAG] == trial.state.name
            assert run.info.status == ("KILLED" if trial.state == TrialState.FAIL else "FINISHED")
    assert runs_still_running() == []


def kill_at_a_random_moment(command: list[str], env: dict, storage: str, rng: random.Random) -> bool:
    """Start the command, wait until a trial runs, SIGKILL it after a random delay; False if it ended first."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not running_trials(storage) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 1.5))  # anywhere in a trial: training, logging its model, ending its run
    killed = process.poll() is None
    process.kill()
    process.wait()
    return killed


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": f"journal:///{tmp_path / 'optuna.log'}"}[
        request.param]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_a_rerun_gives_exactly_the_trials_asked_for(
        storage, data_slice, subprocess_env):
    _, data = data_slice
    rng = random.Random(11)  # seeded: the same delays on every run of the suite
    kills, left_behind = 0, []
    for _ in range(KILLS_PER_STORAGE):
        kills += kill_at_a_random_moment(tune(data, storage), subprocess_env, storage, rng)
        left_behind += runs_still_running()  # (each next command ends those of the one before)
    assert kills >= 2, "the processes finished before they could be killed: make the trials longer"
    assert left_behind, "a SIGKILL leaves its runs RUNNING (the next command must end them)"

    # started right after the last kill: no waiting for heartbeats, the dead owners are seen at once
    rerun = subprocess.run(tune(data, storage), env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_study_is_whole(load(storage), TRIALS)
    study = load(storage)
    print(f"{kills} SIGKILLs survived on {study._storage.__class__.__name__}: {len(study.trials)} trials, "
          f"{sum(map(counts_toward_total, study.trials))} with a result, {len(left_behind)} runs left RUNNING, "
          "all ended by the next command")
    for run in left_behind:  # the killed tune parents and their trials: ended, saying why
        ended = mlflow.get_run(run.info.run_id)
        assert ended.info.status == "KILLED" and "died without ending it" in ended.data.tags[FAILURE_TAG]


@pytest.mark.slow
def test_a_trial_of_a_worker_on_another_host_is_failed_by_its_missing_heartbeat(
        data_slice, subprocess_env, tmp_path):
    """The owner check cannot see other machines' processes: there, database heartbeats take over, for
    each trial of a side-by-side group (the default)."""
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    process = subprocess.Popen(tune(data, storage) + ["--heartbeat-interval", "1", "--epochs-low", "300",
                                                      "--epochs-high", "300", "--patience", "0"],
                               env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # once an epoch is reported, the group's trials have all been asked and have their runs
    while not any(t.intermediate_values for t in running_trials(storage)):
        assert process.poll() is None, "tune ended before its trials could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()
    killed = running_trials(storage)  # all but the seed recipe's trial, if its 10 epochs were done
    assert len(killed) >= TRIALS - 1
    for trial in killed:  # as if the worker had run elsewhere: their owner is a process of another host
        load(storage)._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR,
                                                   '{"host": "elsewhere", "pid": 1, "started": 0}')
    time.sleep(3)  # two missed heartbeats of 1 s

    # the study's workers share one heartbeat interval: a trial is stale after two of them
    rerun = subprocess.run(tune(data, storage) + ["--heartbeat-interval", "1"], env=subprocess_env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = load(storage)
    for trial in killed:
        assert study.trials[trial.number].state == TrialState.FAIL
        run = mlflow.get_run(study.trials[trial.number].user_attrs[RUN_ID_ATTR])
        assert run.info.status == "KILLED" and "heartbeats" in run.data.tags[FAILURE_TAG]
    assert sum(map(counts_toward_total, study.trials)) == TRIALS


def sqlite_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}


@pytest.mark.slow
def test_four_commands_started_at_once_on_new_stores(data_slice, new_mlflow_store, tmp_path):
    """Four tune commands, each its own study, created together with both sqlite stores they share."""
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    subprocess_env = child_env(new_mlflow_store)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
    processes = [subprocess.Popen(tune(data, storage, study=f"s{i}", trials=2), env=subprocess_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
        assert "Traceback" not in output

    assert not any(t.startswith("_alembic_tmp") for t in sqlite_tables(tmp_path / "mlflow.db"))
    check = subprocess.run([sys.executable, "-c", "import mlflow; print(len(mlflow.search_runs("
                            "search_all_experiments=True)))"], env=subprocess_env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # a fresh process opens the store: its schema is current
    for i in range(4):
        assert_study_is_whole(load(storage, f"s{i}"), 2)


def main_command(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "main", "--data-dir", str(data_dir), "--limit", "500",
            "--trials", "0", "--epochs", "1"]


@pytest.mark.slow
def test_two_identical_mains_at_once_train_and_register_once(real_data_dir, subprocess_env, mlflow_store):
    processes = [subprocess.Popen(main_command(real_data_dir), env=subprocess_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
    for step in ("prepare", "train", "evaluate"):
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`mlflow.project.entryPoint` = '{step}'")
        assert len(runs) == 1, f"{step} ran {len(runs)} times"
    assert len(MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")) == 1
    assert sum("reusing" in output for output in outputs) == 1  # the second main reused all three steps
    assert runs_still_running() == []


def step_process(main_pid: int, entry_point: str) -> psutil.Process | None:
    """The process of ``main``'s step ``entry_point``, once it has started."""
    for child in psutil.Process(main_pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:  # ended meanwhile (a zombie until reaped)
            continue
        if "pipeline" in argv and entry_point in argv:
            return child
    return None


def catches(process: psutil.Process, signum: int) -> bool:
    """Whether the process has set a handler of its own for the signal (Linux: /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:  # ended meanwhile
        return False
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) & (1 << (signum - 1)))


def epoch_logged_by_step(entry_point: str) -> bool:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'")
    return any("val_accuracy" in r.data.metrics for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["starting", "training"])
def test_sigterm_to_main_stops_its_step_and_ends_both_runs_killed(moment, real_data_dir, subprocess_env,
                                                                  mlflow_store):
    """The train step is stopped while it starts (its handlers set, PyTorch still being imported: it has not
    taken over the run MLflow opened for it) or after it has trained an epoch."""
    long_training = ["--epochs", "100000", "--patience", "0"]
    main = subprocess.Popen(main_command(real_data_dir) + long_training, env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, step = time.monotonic() + 180, None
    while step is None and time.monotonic() < deadline:  # the train step's process, a child of main
        step = step_process(main.pid, "train")
        time.sleep(0.05)
    assert step is not None, "main never started its train step"
    ready = (lambda: catches(step, signal.SIGTERM)) if moment == "starting" else \
        (lambda: epoch_logged_by_step("train"))
    while not ready():
        assert main.poll() is None and time.monotonic() < deadline, f"the train step never got to {moment}"
        time.sleep(0.05)
    main.send_signal(signal.SIGTERM)
    output = main.communicate(timeout=120)[0]
    assert not step.is_running(), "the train step was left running without its main"

    runs = {r.data.tags.get("mlflow.project.entryPoint"): r for r in
            mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert runs["train"].info.status == "KILLED" and "SIGTERM" in runs["train"].data.tags[FAILURE_TAG]
    main_run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="attributes.run_name = 'main'")[0]
    assert main_run.info.status == "KILLED" and "SIGTERM" in main_run.data.tags[FAILURE_TAG]
    assert runs_still_running() == []
    assert main.returncode == 128 + signal.SIGTERM, output  # as the shell reports a process a signal stopped
