"""Shared fixtures: temporary MLflow stores, IDX files written by the tests, a slice of the real data."""

import gzip
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import DEBIAN_DIR, prepare_splits, raw_files_in

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR))


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (the format the parser reads), gzipped by default."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(str(path) + ".gz") if compress else Path(path)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fake_dataset(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Four small IDX files with random images and balanced labels, named like the real ones."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return directory


@pytest.fixture
def fake_data_dir(tmp_path) -> Path:
    return write_fake_dataset(tmp_path / "raw")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store (and artifact folder) for one test, for this process and children."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns beside the store
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def subprocess_env(mlflow_store) -> dict:
    """Environment for CLI / `mlflow run` subprocesses: this venv's python first on PATH, our store."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    return env


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if raw_files_in(REAL_DATA) is None:
        pytest.fail(f"real Fashion-MNIST not found in {REAL_DATA}: run `make data` (CI installs it)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_slice(real_data_dir, tmp_path_factory):
    """A stratified slice of the real data (2,000 images per split): enough to learn, quick to train."""
    cfg = DataConfig(data_dir=str(real_data_dir), val_size=10_000, limit=2_000)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("prepared"))
    return splits, path
