"""Shared fixtures: temporary MLflow stores, IDX files written by the tests, a slice of the real data."""

import os
import shutil
import sqlite3
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import MLFLOW_PICKLE_SWITCH, DataConfig, ThreadsConfig
from pipeline.core.idx import raw_files_in
from pipeline.core.splits import prepare_splits
from pipeline.core.training import Tensors
from tests.helpers import REAL_DATA, child_env, postgres_server, write_fake_dataset, write_learnable_dataset

# What every command does at its start (pipeline.cli, ThreadsConfig), for the library the tests call in this
# process: MLflow's check of a model's archive switched on, and PyTorch on the commands' threads.
os.environ[MLFLOW_PICKLE_SWITCH] = "false"
torch.set_num_threads(ThreadsConfig().threads)


@pytest.fixture
def fake_data_dir(tmp_path):
    return write_fake_dataset(tmp_path / "raw")


def use_store(tmp_path, monkeypatch):
    """Point this process and its children at the sqlite store ``tmp_path/mlflow.db``; clean up after."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns beside the store
    mlflow.set_tracking_uri(uri)
    experiment_vars = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    for name in experiment_vars:  # a command run in-process sets them (pipeline.tracking.experiments)
        monkeypatch.delenv(name, raising=False)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    for name in experiment_vars:  # that experiment belongs to this test's store: the next test starts afresh
        os.environ.pop(name, None)
    mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """One new sqlite tracking store, made by MLflow (tables created and migrated) and copied for each
    test: making a store costs 1-2 s, which the hundred tests that use one would each pay."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh, empty sqlite tracking store (and artifact folder) for one test, for this process and children."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    db = sqlite3.connect(tmp_path / "mlflow.db")
    with db:  # MLflow made the Default experiment's artifact folder absolute, beside the original: move it here
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(tmp_path / "mlruns" / "0"),))
    db.close()
    yield from use_store(tmp_path, monkeypatch)


@pytest.fixture
def new_mlflow_store(tmp_path, monkeypatch) -> str:
    """As ``mlflow_store``, but no file yet: for tests of what makes a store, or must not make one."""
    yield from use_store(tmp_path, monkeypatch)


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


@pytest.fixture(scope="session")
def data_slice(tmp_path_factory):
    """A made-up task a model learns (``helpers.write_learnable_dataset``), split as the real data is
    (2,000 images per split): for the tests that need training to work, not Fashion-MNIST."""
    raw = write_learnable_dataset(tmp_path_factory.mktemp("learnable") / "raw")
    cfg = DataConfig(data_dir=str(raw), val_size=2_000, limit=2_000)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("prepared-learnable"))
    return splits, path


@pytest.fixture(scope="session")
def tensors(real_slice) -> Tensors:
    """The real slice as tensors, converted once for the whole session."""
    return Tensors.from_splits(real_slice[0])


def pytest_collection_modifyitems(items):
    # `make test-fast` runs without the real data: it skips the tests that need it (marker real_data)
    for item in items:
        if {"real_data_dir", "real_slice", "tiny_split", "tensors"} & set(item.fixturenames):
            item.add_marker(pytest.mark.real_data)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback, torn down afterwards."""
    with postgres_server() as url:
        yield url
