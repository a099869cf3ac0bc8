"""The deployment for several machines, for real: one `mlflow server` (PostgreSQL backend store, artifacts
served over HTTP), one Optuna PostgreSQL database, and "machines" that are separate working directories
sharing nothing but the two URLs. prepare runs on one, tune on two at once, evaluation and registration on
a fourth, and everything a step needs from another (the prepared split, the models) comes over HTTP.
"""

import re
import subprocess
import sys
import time

import mlflow
import optuna
import psycopg2
import pytest
from mlflow import MlflowClient

from pipeline.names import CHAMPION, EXPERIMENT_NAME, MODEL_NAME, STUDY_TAG, TRIAL_TAG
from pipeline.study_config import TuneConfig
from pipeline.tuning.storage import open_storage
from tests.helpers import child_env, free_port, postgres_server, stop_process_group, wait_for_url

STUDY = ["--study-name", "shared", "--epochs-low", "1", "--epochs-high", "2", "--pruner", "none"]


def create_database(url: str, name: str) -> str:
    """A second database on the same PostgreSQL server: MLflow and Optuna both keep an alembic_version table."""
    connection = psycopg2.connect(url)
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    # MLflow's SQLAlchemy picks the psycopg (3) driver for a plain postgresql:// URL: name psycopg2
    return url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://") + "/" + name


def start_tracking_server(backend: str, artifacts, cwd, port: int) -> subprocess.Popen:
    """The command of docs/several-machines.md, with one worker process."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    log = open(cwd / "server.log", "w")  # noqa: SIM115 (the server writes to it; a pipe nobody reads would fill up)
    server = subprocess.Popen(command, cwd=cwd, env=child_env(""), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    wait_for_url(f"http://127.0.0.1:{port}/health", server, (cwd / "server.log").read_text)
    return server


def on_machine(machine, tracking_uri: str, *args: str) -> subprocess.Popen:
    """``python -m pipeline ARGS`` in its own folder, knowing only the tracking server's URL."""
    machine.mkdir(exist_ok=True)
    log = open(machine / "output.log", "w")  # noqa: SIM115 (read by finish(); a pipe could fill up while it runs)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=machine,
                               env=child_env(tracking_uri), stdout=log, stderr=subprocess.STDOUT)
    process.log = machine / "output.log"
    return process


def shared_study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="shared", storage=open_storage(TuneConfig(storage=storage)))


def wait_for_first_trial(storage: str, worker: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while worker.poll() is None and time.time() < deadline:
        try:
            if shared_study(storage).trials:
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.5)
    pytest.fail(f"no trial started: {finish(worker)[-3000:]}")


def finish(process: subprocess.Popen) -> str:
    process.wait(timeout=900)
    output = process.log.read_text()
    assert process.returncode == 0, output[-4000:]
    print(f"{time.strftime('%X')} {' '.join(process.args[3:5])}: done")  # where the time goes (pytest -s)
    return output


@pytest.mark.slow
def test_prepare_tune_on_two_machines_evaluate_and_register_over_http(real_data_dir, tmp_path, monkeypatch):
    with postgres_server("optuna") as optuna_url:
        mlflow_db = create_database(optuna_url, "mlflow")
        (tmp_path / "server").mkdir()
        port = free_port()
        server = start_tracking_server(mlflow_db, tmp_path / "server" / "artifacts", tmp_path / "server", port)
        tracking = f"http://127.0.0.1:{port}"
        try:
            out = finish(on_machine(tmp_path / "a", tracking, "prepare", "--data-dir", str(real_data_dir),
                                    "--limit", "2000"))
            data = re.search(r"data URI: (runs:/\S+)", out).group(1)
            tune = ["tune", "--data", data, "--storage", optuna_url, *STUDY, "--test-best", "false"]
            # b until the study holds 2 trials, c until 4: c starts once b has a trial, so both surely
            # take trials, and they run at the same time for as long as b has trials left
            b = on_machine(tmp_path / "b", tracking, *tune, "--trials", "2")
            wait_for_first_trial(optuna_url, b)
            c = on_machine(tmp_path / "c", tracking, *tune, "--trials", "4")
            finish(b), finish(c)
            # the study is full: on a fourth machine this records the best trial, tests and registers it
            finish(on_machine(tmp_path / "d", tracking, *tune[:-1], "true", "--trials", "4"))
            out = finish(on_machine(tmp_path / "d", tracking, "evaluate", "--data", data,
                                    "--model-uri", f"models:/{MODEL_NAME}/1"))
            assert re.search(r"test accuracy 0\.[5-9]\d*", out), out

            monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
            mlflow.set_tracking_uri(tracking)
            client = MlflowClient()
            experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
            assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served, not a local path
            study = shared_study(optuna_url)
            trial_runs = client.search_runs([experiment.experiment_id], f"tags.`{STUDY_TAG}` = 'shared'")
            trial_runs = [r for r in trial_runs if TRIAL_TAG in r.data.tags]
            assert len(study.trials) == len(trial_runs) >= 4
            assert len({r.data.tags["mlflow.parentRunId"] for r in trial_runs}) == 2  # both machines worked
            # the best of its split (a limited one: never `champion`, which follows the default split)
            aliases = client.get_registered_model(MODEL_NAME).aliases
            assert len(aliases) == 1 and next(iter(aliases)).startswith(CHAMPION + "-")
            held = client.get_model_version_by_alias(MODEL_NAME, next(iter(aliases)))
            assert held.source == study.best_trial.user_attrs["model_uri"]
        finally:
            mlflow.set_tracking_uri(None)
            stop_process_group(server)
    # the machines wrote no MLflow store or artifacts of their own: all of it went to the server
    for machine in "abcd":
        assert not {"mlruns", "mlflow.db", "mlartifacts"} & {p.name for p in (tmp_path / machine).iterdir()}
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["output.log"]  # not even the prepared data
    assert list((tmp_path / "server" / "artifacts").rglob("splits.npz"))
