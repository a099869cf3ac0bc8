"""Where a study's points come from: workers on one real sqlite storage, each with its own Study object, as
processes on one machine or on several have."""

import contextlib
import sqlite3
import threading
import time

import mlflow
import optuna
import pytest

from pipeline.core.training import Tensors
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.storage import open_storage
from pipeline.tuning.trial_state import Heartbeats, Worker
from pipeline.tuning.trials import ask_trial

SPACE = SearchSpace()


def new_study(path, seed: int = 0) -> TuneConfig:
    cfg = TuneConfig(trials=10, storage=f"sqlite:///{path}", study_name="s", sampler="random", seed=seed,
                     test_best=False)
    optuna.create_study(study_name="s", storage=open_storage(cfg), direction="maximize")
    return cfg


@contextlib.contextmanager
def worker_on(cfg: TuneConfig, splits, parent):
    """A worker with its own connection to the storage and its own Study object."""
    storage = open_storage(cfg)
    study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    with Heartbeats(storage, cfg.heartbeat_interval) as heartbeats:
        yield Worker(study, storage, cfg, SPACE, splits, Tensors.from_splits(splits), parent, lambda: None, heartbeats)


def point(run) -> tuple:
    return run.cfg.lr, run.cfg.epochs, run.cfg.weight_decay


def drawn_one_after_another(cfg: TuneConfig, splits, parent, trials: int = 4) -> list[tuple]:
    with worker_on(cfg, splits, parent) as worker:
        return [point(ask_trial(worker)) for _ in range(trials)]


@contextlib.contextmanager
def writes_held(path):
    """Hold sqlite's write lock: other connections still read, and their writes wait until it is let go."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


@pytest.mark.slow
def test_two_workers_asking_at_the_same_moment_draw_different_points(data_slice, mlflow_store, tmp_path):
    """Both workers ask while the study holds the same trials (neither's trial is stored yet): each
    still draws its own point."""
    splits, _ = data_slice
    cfg = new_study(tmp_path / "optuna.db")
    drawn = {}
    with mlflow.start_run() as parent, worker_on(cfg, splits, parent.info) as a, \
            worker_on(cfg, splits, parent.info) as b:
        with writes_held(tmp_path / "optuna.db"):
            threads = [threading.Thread(target=lambda w=w, n=n: drawn.__setitem__(n, point(ask_trial(w))))
                       for n, w in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            time.sleep(3)  # both workers look at the study and wait to store their trial
        for t in threads:
            t.join(timeout=120)
    assert len(drawn) == 2 and drawn["a"] != drawn["b"], drawn


@pytest.mark.slow
def test_one_worker_with_the_same_seed_draws_the_same_study(data_slice, mlflow_store, tmp_path):
    splits, _ = data_slice
    with mlflow.start_run() as parent:
        first = drawn_one_after_another(new_study(tmp_path / "first.db"), splits, parent.info)
        again = drawn_one_after_another(new_study(tmp_path / "again.db"), splits, parent.info)
        other_seed = drawn_one_after_another(new_study(tmp_path / "other.db", seed=1), splits, parent.info)
    assert first == again
    assert len(set(first)) == len(first) and other_seed != first
