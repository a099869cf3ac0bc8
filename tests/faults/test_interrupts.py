"""Ctrl-C and SIGTERM, real signals to the real CLI: every run the command had open ends KILLED at once,
the trials it was training fail, its worker processes end with it, and it says so in one line.

Each command is started as a terminal starts it (its own process group, Python's own Ctrl-C handler) and
signalled at a moment known from the stores: after a first epoch is written, or while workers start.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from pipeline.names import FAILURE_TAG, INTERRUPTED_ATTR, OWNER_ATTR, RUN_ID_ATTR, TRIAL_STATE_TAG
from pipeline.runtime.signals import interrupts_at_safe_points
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.storage import open_storage
from pipeline.tuning.workers import work_on_study
from tests.fault_helpers import run_statuses
from tests.study_helpers import load, tune_command

LONG_TRAINING = ["--patience", "0"]  # with an epoch count no test waits for: the signal always comes first
LONG_STUDY = ["--epochs-low", "100000", "--epochs-high", "100000", "--patience", "0", "--pruner", "none"]


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """The commands start with Python's own Ctrl-C handler, as from a terminal: a suite started in the
    background (as CI may start it) inherits Ctrl-C ignored, and would pass that on to them."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def start(command: list, env: dict, output: Path) -> subprocess.Popen:
    """The command in a process group of its own, as a terminal runs it; its output to a file (a pipe
    nobody reads while we wait would fill up and stall it)."""
    with output.open("w") as out:
        return subprocess.Popen(list(map(str, command)), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(ready, process: subprocess.Popen, output: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the command ended before {what}:\n{output.read_text()}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s:\n{output.read_text()}"
        time.sleep(0.05)


def ended(process: subprocess.Popen, output: Path, timeout: float = 120) -> str:
    """The command's output once it has ended; one still going after ``timeout`` s is killed (with its
    workers) and fails the test."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"still running {timeout} s after the signal:\n{output.read_text()}")
    return output.read_text()


def assert_stopped_in_one_line(process: subprocess.Popen, text: str, signum: int) -> None:
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, text  # as the shell reports a process a signal stopped
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"interrupted ({name})" in errors[0], text


def assert_open_runs_killed(signum: int, signalled_at: float) -> None:
    """Every run ended KILLED, saying which signal, except a trial's run that had trained its last epoch
    before the signal came (the study's first trial, the book's 10-epoch recipe, may have)."""
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        if run.info.status == "FINISHED":  # nothing trained after the signal: at most its result was recorded
            epochs = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
            assert epochs and max(m.timestamp for m in epochs) < signalled_at * 1000, run.info.run_name
            continue
        assert run.info.status == "KILLED", (run.info.run_name, run.info.status)
        assert run.data.tags[FAILURE_TAG] == f"interrupted ({signal.Signals(signum).name})", run.info.run_name


def signal_now(process: subprocess.Popen, signum: int, to_the_group: bool = False) -> float:
    """Send the signal (to the command, or to its process group as a terminal's Ctrl-C does); returns when."""
    signalled_at = time.time()
    if to_the_group:
        os.killpg(process.pid, signum)  # the command's own group (start_new_session): it and its workers
    else:
        process.send_signal(signum)
    return signalled_at


def epoch_logged(run_name: str) -> bool:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"attributes.run_name = '{run_name}'")
    return any("val_accuracy" in r.data.metrics for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_train_ends_its_run_killed(signum, data_slice, subprocess_env, mlflow_store, tmp_path):
    _, data = data_slice
    output = tmp_path / "output.txt"
    process = start([sys.executable, "-m", "pipeline", "train", "--data", data, "--epochs", "100000",
                     *LONG_TRAINING], subprocess_env, output)
    wait_until(lambda: epoch_logged("train"), process, output, "a first epoch")
    signalled_at = signal_now(process, signum)
    text = ended(process, output)

    assert run_statuses(mlflow_store) == {"train": ["KILLED"]}
    assert_open_runs_killed(signum, signalled_at)
    assert_stopped_in_one_line(process, text, signum)


@pytest.mark.slow
def test_an_interrupted_experiment_ends_its_parent_and_its_current_run_killed(
        real_data_dir, subprocess_env, mlflow_store, tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(textwrap.dedent(f"""\
        experiment: long
        entry_point: train
        description: two points that train for longer than the test waits
        data: {{data_dir: {real_data_dir}, limit: 500}}
        params: {{epochs: 100000, patience: 0}}
        grid: {{lr: [0.1, 0.2]}}
    """))
    output = tmp_path / "output.txt"
    process = start([sys.executable, "-m", "pipeline", "experiment", path], subprocess_env, output)
    wait_until(lambda: epoch_logged("lr=0.1"), process, output, "the first point's first epoch")
    signalled_at = signal_now(process, signal.SIGTERM)
    text = ended(process, output)

    # the parent and the point it was training; the second point never started
    assert run_statuses(mlflow_store) == {"long": ["KILLED"], "lr=0.1": ["KILLED"]}
    assert_open_runs_killed(signal.SIGTERM, signalled_at)
    assert_stopped_in_one_line(process, text, signal.SIGTERM)


def worker_processes(parent: psutil.Process) -> list[psutil.Process]:
    """The ``tune --workers`` processes (spawned: multiprocessing marks their command line)."""
    workers = []
    for child in parent.children(recursive=True):
        try:
            if "--multiprocessing-fork" in child.cmdline():
                workers.append(child)
        except psutil.Error:  # ended meanwhile
            pass
    return workers


def assert_gone(workers: list[psutil.Process]) -> None:
    """The workers ended before their parent did (none was left behind to go on)."""
    assert workers
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def trials_training_in(storage: str) -> dict[str, list]:
    """The running trials that have written an epoch, by the worker process that runs them."""
    try:
        trials = load(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:  # no study yet
        return {}
    by_worker = {}
    for trial in trials:
        if trial.intermediate_values:
            by_worker.setdefault(trial.user_attrs[OWNER_ATTR], []).append(trial.number)
    return by_worker


def recipe_done(storage: str) -> bool:
    return any(t.number == 0 and t.state.is_finished() for t in load(storage).get_trials(deepcopy=False))


@pytest.mark.slow
@pytest.mark.parametrize("workers, signum", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_an_interrupted_study_fails_the_trials_of_every_worker_and_ends_every_run_killed(
        workers, signum, data_slice, subprocess_env, mlflow_store, tmp_path):
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    output = tmp_path / "output.txt"
    process = start(tune_command(data, storage, "--trials", "4", "--workers", workers, "--side-by-side", "2",
                                 *LONG_STUDY), subprocess_env, output)
    # the book's recipe (trial 0, 10 epochs) done first: a worker hears of a SIGTERM only when tune passes it
    # on, and the recipe's last epoch could finish in that moment; every other trial trains "for ever"
    wait_until(lambda: len(trials_training_in(storage)) == workers and recipe_done(storage), process, output,
               "the recipe done and a trial training in every worker")
    spawned = worker_processes(psutil.Process(process.pid))
    signalled_at = signal_now(process, signum)
    text = ended(process, output)

    if workers > 1:
        assert_gone(spawned)
    trials = load(storage).trials
    stopped = [t for t in trials if t.state != TrialState.COMPLETE]  # (complete: see assert_open_runs_killed)
    assert len(stopped) >= workers, text
    for trial in stopped:
        assert trial.state == TrialState.FAIL  # without a result: a new trial takes its place on resume
        assert trial.user_attrs[INTERRUPTED_ATTR] == f"interrupted ({signal.Signals(signum).name})"
        assert mlflow.get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags[TRIAL_STATE_TAG] == "FAIL"
    assert run_statuses(mlflow_store)["tune s"] == ["KILLED"]
    assert_open_runs_killed(signum, signalled_at)
    assert_stopped_in_one_line(process, text, signum)


@pytest.mark.slow
@pytest.mark.parametrize("to_the_group", [False, True], ids=["SIGTERM to tune", "Ctrl-C at the terminal"])
def test_an_interrupt_while_the_workers_start_ends_them_quietly(
        to_the_group, data_slice, subprocess_env, mlflow_store, tmp_path):
    """The signal comes while the workers import PyTorch; a Ctrl-C at the terminal reaches them too."""
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    output = tmp_path / "output.txt"
    process = start(tune_command(data, storage, "--trials", "4", "--workers", "2", *LONG_STUDY),
                    subprocess_env, output)
    parent = psutil.Process(process.pid)
    wait_until(lambda: len(worker_processes(parent)) == 2, process, output, "both workers starting")
    spawned = worker_processes(parent)
    signum = signal.SIGINT if to_the_group else signal.SIGTERM
    signalled_at = signal_now(process, signum, to_the_group)
    text = ended(process, output)

    assert_gone(spawned)
    assert not load(storage).get_trials(states=(TrialState.RUNNING, TrialState.COMPLETE))
    assert run_statuses(mlflow_store) == {"tune s": ["KILLED"]}
    assert_open_runs_killed(signum, signalled_at)
    assert_stopped_in_one_line(process, text, signum)


def test_a_trial_run_ends_even_when_its_last_tag_cannot_be_written(data_slice, mlflow_store, tmp_path,
                                                                  monkeypatch):
    splits, _ = data_slice
    cfg = TuneConfig(trials=1, storage=f"journal:///{tmp_path / 'optuna.log'}", study_name="s", test_best=False,
                     pruner="none", patience=0, side_by_side=1)
    optuna.create_study(study_name="s", storage=open_storage(cfg), direction="maximize")
    set_tag = MlflowClient.set_tag

    def store_fails_on_the_trial_state(client, run_id, key, value, *args, **kwargs):
        if key == TRIAL_STATE_TAG:
            raise MlflowException("the tracking store stopped answering")
        set_tag(client, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_tag", store_fails_on_the_trial_state)
    with mlflow.start_run() as parent, interrupts_at_safe_points():
        with pytest.raises(MlflowException, match="stopped answering"):
            work_on_study(cfg, SearchSpace(epochs_low=1, epochs_high=1), splits, parent.info)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the trial's run is no longer active

    [trial] = load(cfg.storage).trials
    assert mlflow.get_run(trial.user_attrs[RUN_ID_ATTR]).info.status != "RUNNING"
