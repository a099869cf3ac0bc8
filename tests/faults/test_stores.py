"""Stores that hang, fail in the middle of a study, or are blamed wrongly, made for real.

A server on loopback that accepts connections and never answers (a tarpit) stands for a database server
or an MLflow tracking server that hangs; a real PostgreSQL server whose table another session keeps
locked, for a statement that never ends; an Optuna sqlite file made immutable (``chattr +i``: root is
refused too) in the middle of a study, for a storage that turns read-only. Each case runs the real CLI
in a subprocess and checks: one line naming the store that failed and the cause seen, a bounded wait, a
non-zero exit, no run left RUNNING, and the finished trials kept.
"""

import contextlib
import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse

import optuna
import psycopg2
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.config import STORAGE_CONNECT_TIMEOUT_S, STORAGE_STATEMENT_TIMEOUT_S
from pipeline.errors import PipelineError
from pipeline.faults import environment_problem
from pipeline.names import EXPERIMENT_NAME, OWNER_ATTR, RUN_ID_ATTR, TRIAL_TAG
from pipeline.study_config import TuneConfig
from pipeline.tuning.dead_trials import recover_dead_trials
from pipeline.tuning.storage import open_storage
from tests.fault_helpers import error_line, fill, run_cli, run_statuses, tmpfs
from tests.helpers import REPO, child_env

# Starting Python, torch and MLflow and loading the data before the storage is opened: generous, as
# the machine may be loaded; a command that hangs never ends at all.
START_UP_S = 90


@contextlib.contextmanager
def tarpit():
    """A server on 127.0.0.1 that accepts every connection and never answers; yields (port, accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def accept_all():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept_all, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


def tune(data, storage: str, *more: str) -> list[str]:
    return ["tune", "--data", str(data), "--storage", storage, "--study-name", "s", "--pruner", "none",
            "--test-best", "false", *more]


def no_run_running(tracking_uri: str) -> bool:
    return all("RUNNING" not in statuses for statuses in run_statuses(tracking_uri).values())


@pytest.mark.slow
def test_a_database_server_that_never_answers_is_one_line_within_the_connect_timeout(
        data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    with tarpit() as (port, accepted):
        storage = f"postgresql://someone@127.0.0.1:{port}/optuna"  # the password where it belongs: PGPASSWORD
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pipeline", *tune(data, storage)],
                              env={**subprocess_env, "PGPASSWORD": "secret"},
                              capture_output=True, text=True, timeout=STORAGE_CONNECT_TIMEOUT_S + START_UP_S)
        took = time.monotonic() - started
    line = error_line(done)
    assert (f"cannot open the Optuna storage {storage}: no answer within the connect timeout") in line
    assert "secret" not in done.stdout + done.stderr
    assert len(accepted) == 1  # it reached the server, and did not try again: a hung server stays hung
    assert took >= STORAGE_CONNECT_TIMEOUT_S  # the default wait, in full
    assert run_statuses(mlflow_store) == {"tune s": ["FAILED"]}


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_tune_while_it_waits_for_a_database_server(sent, data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    with tarpit() as (port, accepted):
        command = [sys.executable, "-m", "pipeline", *tune(data, f"postgresql://u@127.0.0.1:{port}/db")]
        process = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            deadline = time.monotonic() + START_UP_S
            while not accepted and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert accepted, "tune never reached the server"
            time.sleep(0.5)  # now waiting for the server's first answer
            signalled = time.monotonic()
            process.send_signal(sent)
            output, errors = process.communicate(timeout=STORAGE_CONNECT_TIMEOUT_S + 30)
            took = time.monotonic() - signalled
        finally:
            process.kill()
            process.wait()
    assert process.returncode != 0 and "Traceback" not in errors, errors
    assert took < STORAGE_CONNECT_TIMEOUT_S + 10  # at worst the rest of the connect timeout, then the clean-up
    assert list(run_statuses(mlflow_store)) == ["tune s"] and no_run_running(mlflow_store)


def study_trials(url: str) -> list:
    try:
        return optuna.load_study(study_name="s", storage=open_storage(TuneConfig(storage=url))).trials
    except KeyError:  # the study does not exist yet
        return []


def wait_for_a_trial(url: str, process: subprocess.Popen, that) -> None:
    """Wait until a trial of the study is ``that(trial)``, while ``process`` runs."""
    deadline = time.monotonic() + 240
    while not any(map(that, study_trials(url))):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


@pytest.mark.slow
def test_a_postgresql_statement_stuck_behind_a_lock_ends_with_one_line_and_no_run_running(
        postgres_url, data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    # the URL's own libpq options win over the default (a minute): a short statement timeout for the test
    storage = postgres_url + "?options=" + urllib.parse.quote("-c statement_timeout=3s")
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *tune(data, storage, "--trials", "6",
                                                                         "--epochs-low", "30", "--epochs-high", "60")],
                               env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locker = psycopg2.connect(postgres_url)
    try:
        # once an epoch is reported, the group's trials have all been asked and have their runs
        wait_for_a_trial(postgres_url, process, lambda t: t.state == TrialState.RUNNING and t.intermediate_values)
        locker.cursor().execute("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE")  # held: no commit
        output, errors = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
        locker.rollback()
        locker.close()
    line = error_line(subprocess.CompletedProcess(process.args, process.returncode, output, errors))
    assert f"the Optuna storage {postgres_url}?options=" in line and "statement timeout" in line, line
    assert "MLflow" not in line
    trial_runs = [r for r in all_runs(mlflow_store) if TRIAL_TAG in r.data.tags]
    assert trial_runs and no_run_running(mlflow_store)
    assert {r.info.status for r in trial_runs} == {"FAILED"}


def test_storage_waits_default_to_the_settings_and_the_urls_own_values_win(postgres_url):
    def statement_timeout(url: str) -> str:
        storage = open_storage(TuneConfig(storage=url))
        with storage.engine.connect() as connection:
            return connection.exec_driver_sql("SHOW statement_timeout").scalar()

    assert statement_timeout(postgres_url) == f"{STORAGE_STATEMENT_TIMEOUT_S // 60}min"
    assert statement_timeout(postgres_url + "?options=" + urllib.parse.quote("-c statement_timeout=7s")) == "7s"


def all_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def chattr(flag: str, path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable_files(tmp_path):
    """``chattr +i`` on tmp_path's file system, undone afterwards (or the test is skipped where it is not
    available: it stops writes to an open file, even by root, where a chmod would not)."""
    probe = tmp_path / "probe"
    probe.touch()
    try:
        chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +i is not available here: {e}")
    chattr("-i", probe)
    made = []
    yield lambda path: (chattr("+i", path), made.append(path))
    for path in made:
        chattr("-i", path)


@pytest.mark.slow
@pytest.mark.parametrize("side_by_side", ["8", "1"])
def test_an_optuna_storage_that_turns_read_only_mid_study_is_named_and_every_run_ends(
        side_by_side, immutable_files, tmp_path, data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *tune(data, storage, "--trials", "12", "--epochs-low", "2",
                                                 "--epochs-high", "40", "--side-by-side", side_by_side)],
        env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_a_trial(storage, process, lambda t: t.state == TrialState.COMPLETE)
        immutable_files(db)
        output, errors = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    line = error_line(subprocess.CompletedProcess(process.args, process.returncode, output, errors))
    assert f"the Optuna storage {storage} failed: disk I/O error" in line and "MLflow" not in line, line
    assert no_run_running(mlflow_store)

    # the finished trials and their runs are kept; the trials the fault cut short are failed by the next
    # command (here: the same recovery, in this process, now that the file can be written again)
    chattr("-i", db)
    reopened = open_storage(TuneConfig(storage=storage))
    study = optuna.load_study(study_name="s", storage=reopened)
    recover_dead_trials(study, reopened)
    runs = {r.info.run_id: r for r in all_runs(mlflow_store)}
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # A trial the fault caught between its creation and its first attribute has no owner on record: no
    # process can be judged dead for it, so it holds its place (docs/faults.md); it never had a run.
    left = [t for t in study.trials if t.state == TrialState.RUNNING]
    assert completed and all(OWNER_ATTR not in t.user_attrs and RUN_ID_ATTR not in t.user_attrs for t in left)
    for trial in study.trials:
        if RUN_ID_ATTR in trial.user_attrs:
            status = runs[trial.user_attrs[RUN_ID_ATTR]].info.status
            assert status == ("FINISHED" if trial.state == TrialState.COMPLETE else "FAILED"), (trial.number, status)


@pytest.mark.slow
def test_a_tracking_server_that_never_answers_is_one_line_and_the_users_waits_are_kept(tmp_path, subprocess_env):
    with tarpit() as (port, accepted):
        env = {**subprocess_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
        done = run_cli(env, "prepare", "--limit", "100", cwd=tmp_path)
    line = error_line(done)
    assert line == (f"Error: the MLflow tracking store http://127.0.0.1:{port} failed: no answer within 2 s, 2 tries; "
                    "check that the server runs and that this machine reaches it (MLFLOW_HTTP_REQUEST_TIMEOUT and "
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES set how long to wait)")
    assert len(accepted) == 2  # the user's 1 retry, not the project's default of 3


@pytest.mark.slow
def test_a_tracking_server_that_never_answers_is_retried_the_projects_default_times(tmp_path, subprocess_env):
    with tarpit() as (port, accepted):
        env = {**subprocess_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}
        env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        done = run_cli(env, "prepare", "--limit", "100", cwd=tmp_path)
    assert "no answer within 1 s, 4 tries" in error_line(done)
    assert len(accepted) == 4  # MLflow's own default, 7 retries, would wait through 8


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["--debug", "PIPELINE_DEBUG=1"])
def test_debug_prints_the_traceback_behind_the_one_line(switch, data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        command = tune(data, f"postgresql://u@127.0.0.1:{s.getsockname()[1]}/db")
        plain = run_cli(subprocess_env, *command)
        env = {**subprocess_env, "PIPELINE_DEBUG": "1"} if switch.startswith("PIPELINE") else subprocess_env
        debugged = run_cli(env, *([switch] if switch.startswith("--") else []), *command)
    assert "Traceback" in debugged.stderr and "psycopg2.OperationalError" in debugged.stderr
    line = error_line(plain)
    assert "connection refused" in line
    assert debugged.returncode == plain.returncode and line in debugged.stderr.splitlines()


def raised(make):
    """The exception ``make`` raises (with its real chain of causes)."""
    try:
        make()
    except Exception as e:
        return e
    raise AssertionError("nothing raised")


def test_a_bug_raised_while_a_fault_was_handled_is_not_that_fault():
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/splits.npz")

    def bug_in_the_clean_up():
        try:
            full_disk()
        except OSError:
            None.unlink()  # an AttributeError: a bug of its own

    def wrapped():
        try:
            full_disk()
        except OSError as e:
            raise RuntimeError("could not save") from e

    assert "the disk is full (writing /data/splits.npz)" in environment_problem(raised(full_disk))
    assert "the disk is full" in environment_problem(raised(wrapped))
    assert environment_problem(raised(bug_in_the_clean_up)) is None


def test_sqlite_faults_are_named_by_their_cause_and_other_database_errors_are_not_faults(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "folder.db").mkdir()  # a folder where the database should be
    cannot_open = raised(lambda: sqlite3.connect(tmp_path / "folder.db").execute("select 1"))
    assert environment_problem(cannot_open) == (
        f"the MLflow tracking store sqlite:///{tmp_path / 'mlflow.db'} failed: unable to open database file; "
        "check that its folder exists and that this user may write there")
    (tmp_path / "text.db").write_text("not a database " * 100)
    not_a_database = raised(lambda: sqlite3.connect(tmp_path / "text.db").execute("select * from t"))
    assert "file is not a database; the file is damaged" in environment_problem(not_a_database)
    missing_table = raised(lambda: sqlite3.connect(":memory:").execute("select * from runs"))
    assert environment_problem(missing_table) is None  # a bug (or a wrong schema), with its traceback


@pytest.mark.slow
def test_several_mlflow_runs_at_once_on_a_store_made_by_create_store_all_succeed(fake_data_dir, new_mlflow_store,
                                                                                 tmp_path):
    """What `make run` does before `mlflow run`; four started together then find the store and experiment made."""
    env = child_env(new_mlflow_store)
    made = run_cli(env, "create-store", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "mlflow.db").exists()
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prepare", "--env-manager", "local",
               "--experiment-name", EXPERIMENT_NAME, "-P", f"data_dir={fake_data_dir}", "-P", "val_size=100"]
    processes = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    runs = all_runs(new_mlflow_store)
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    assert {MlflowClient().get_experiment(r.info.experiment_id).name for r in runs} == {EXPERIMENT_NAME}


def test_a_database_server_names_what_it_refused(postgres_url):
    server = postgres_url.rsplit("/", 1)[0]  # postgresql://postgres@127.0.0.1:PORT
    for url, cause in ((server.replace("postgres@", "nobody@") + "/optuna", "no such user on the server"),
                       (server + "/no_such_db", "no such database on the server")):
        with pytest.raises(PipelineError) as refused:
            open_storage(TuneConfig(storage=url))
        assert refused.value.message.startswith(f"cannot open the Optuna storage {url}: {cause}; ")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_an_optuna_storage_on_a_full_disk_names_the_full_disk(tmp_path, data_slice, subprocess_env, mlflow_store):
    _, data = data_slice
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        done = run_cli(subprocess_env, *tune(data, f"sqlite:///{disk / 'optuna.db'}"))
    line = error_line(done)
    assert f"cannot open the Optuna storage sqlite:///{disk / 'optuna.db'}: database or disk is full; free some " \
           "space" in line, line
    assert run_statuses(mlflow_store) == {"tune s": ["FAILED"]}
