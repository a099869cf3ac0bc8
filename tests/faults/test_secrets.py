"""A database password never reaches the MLflow store: it is refused in a storage URL, whose every setting is
recorded as a param (by our commands, and by `mlflow run` before a command starts), and it is taken from
the database client's own environment instead. A real PostgreSQL server that asks for a password."""

import sqlite3

import optuna
import pytest

from pipeline.study_config import TuneConfig
from pipeline.tuning.storage import open_storage
from tests.fault_helpers import error_line, run_cli, run_statuses
from tests.helpers import postgres_server

SECRET = "pw-never-recorded"


@pytest.fixture
def postgres_with_password():
    with postgres_server(password=SECRET) as url:
        yield url


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{SECRET}@")


def assert_nowhere_in(store: str) -> None:
    """No value anywhere in the MLflow store (params, tags, run names, inputs) holds the password."""
    with sqlite3.connect(store) as db:
        tables = [name for (name,) in db.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for row in db.execute(f"select * from {table}"):
                assert not any(SECRET in str(value) for value in row), (table, row)


@pytest.mark.slow
def test_main_refuses_a_storage_url_holding_a_password(postgres_with_password, fake_data_dir, mlflow_store,
                                                       subprocess_env, tmp_path):
    """main would hand the URL to `mlflow run -e tune` as a param, which MLflow records as it is."""
    done = run_cli(subprocess_env, "main", "--data-dir", fake_data_dir, "--val-size", 100, "--trials", 1,
                   "--storage", with_password(postgres_with_password), cwd=tmp_path)
    assert_nowhere_in(tmp_path / "mlflow.db")
    line = error_line(done)
    assert "holds a password" in line and "PGPASSWORD" in line and SECRET not in done.stdout + done.stderr
    assert not run_statuses(mlflow_store)  # refused before any run or step


@pytest.mark.slow
def test_tune_refuses_a_storage_url_holding_a_password(postgres_with_password, data_slice, mlflow_store,
                                                       subprocess_env, tmp_path):
    done = run_cli(subprocess_env, "tune", "--data", data_slice[1], "--trials", 1, "--test-best", "false",
                   "--storage", with_password(postgres_with_password), cwd=tmp_path)
    assert_nowhere_in(tmp_path / "mlflow.db")
    line = error_line(done)
    assert "holds a password" in line and SECRET not in done.stdout + done.stderr


@pytest.mark.slow
def test_the_password_comes_from_the_environment(postgres_with_password, data_slice, mlflow_store,
                                                 subprocess_env, tmp_path):
    env = {**subprocess_env, "PGPASSWORD": SECRET}  # libpq's own variable: ~/.pgpass works as well
    done = run_cli(env, "tune", "--data", data_slice[1], "--trials", 1, "--test-best", "false",
                   "--epochs-low", 1, "--epochs-high", 1, "--storage", postgres_with_password, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_nowhere_in(tmp_path / "mlflow.db")
    assert run_statuses(mlflow_store)["trial-0"] == ["FINISHED"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", SECRET)
        study = optuna.load_study(study_name="fashion-mnist-softmax",
                                  storage=open_storage(TuneConfig(storage=postgres_with_password)))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
