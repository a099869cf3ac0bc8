"""Shared fixtures: temporary MLflow stores, IDX files written by the tests, a slice of the real data."""

import os

import mlflow
import pytest

from pipeline.config import DataConfig
from pipeline.core.idx import raw_files_in
from pipeline.core.splits import prepare_splits
from tests.helpers import REAL_DATA, child_env, postgres_server, write_fake_dataset


@pytest.fixture
def fake_data_dir(tmp_path):
    return write_fake_dataset(tmp_path / "raw")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store (and artifact folder) for one test, for this process and children."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns beside the store
    mlflow.set_tracking_uri(uri)
    experiment_vars = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    for name in experiment_vars:  # a command run in-process sets them (pipeline.support.experiments)
        monkeypatch.delenv(name, raising=False)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    for name in experiment_vars:  # that experiment belongs to this test's store: the next test starts afresh
        os.environ.pop(name, None)
    mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture
def subprocess_env(mlflow_store) -> dict:
    """Environment for CLI / `mlflow run` subprocesses: this venv's python first on PATH, our store."""
    return child_env(mlflow_store)


@pytest.fixture(scope="session")
def real_data_dir():
    if raw_files_in(REAL_DATA) is None:
        pytest.fail(f"real Fashion-MNIST not found in {REAL_DATA}: run `make data` (CI installs it)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_slice(real_data_dir, tmp_path_factory):
    """A stratified slice of the real data (2,000 images per split): enough to learn, quick to train."""
    cfg = DataConfig(data_dir=str(real_data_dir), val_size=10_000, limit=2_000)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("prepared"))
    return splits, path


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback, torn down afterwards."""
    with postgres_server() as url:
        yield url
