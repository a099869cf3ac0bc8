"""New sqlite stores (MLflow's and Optuna's), created once even when several commands start together.

The first process that opens a new sqlite store creates its tables, and MLflow then migrates them
step by step. Two processes doing that at the same moment collide ("table _alembic_tmp_experiments
already exists"), and the loser can leave the file half-migrated for good. So every sqlite store is
opened under a file lock beside it (``mlflow.db.lock``): the first process creates and migrates it
while the others wait, then find it ready. It is made in a staging file and moved into place when
complete, so that a process killed meanwhile leaves no half-made store. Opening an existing store
under the lock takes milliseconds. Other databases (PostgreSQL, MySQL) have no file to lock beside: their creation is
retried instead (``pipeline.tuning.storage``).
"""

import contextlib
import os
from pathlib import Path

import filelock
from sqlalchemy.engine import make_url

from pipeline.config import MLFLOW_HTTP_DEFAULTS


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite URL (sqlite:///mlflow.db -> mlflow.db); None for other URLs and in-memory."""
    try:
        parsed = make_url(url)
    except Exception:  # not a database URL (a journal file, http://...)
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


@contextlib.contextmanager
def creation_lock(url: str):
    """Hold the lock of a sqlite store while opening it; other stores need none."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{path}.lock"):
        yield


def create_if_new(url: str, create) -> None:
    """Create a new sqlite store in a staging file, then move it into place (call under the lock).

    A process killed while MLflow migrates a new store would otherwise leave it half-made for good
    (``_alembic_tmp_experiments``): now it leaves only the staging file, which the next try replaces.
    ``create(staging_url)`` makes the store's tables and closes its connections.
    """
    path = sqlite_file(url)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return
    staging = path.with_name(path.name + ".new")
    for leftover in (staging, Path(f"{staging}-journal")):
        leftover.unlink(missing_ok=True)
    create(make_url(url).set(database=str(staging)).render_as_string(hide_password=False))
    os.replace(staging, path)


def locked(builder):
    """A store builder that creates a new store safely, and builds under the store's creation lock."""
    def build(store_uri, *args, **kwargs):
        with creation_lock(store_uri):
            create_if_new(store_uri, lambda staging: builder(staging, *args, **kwargs).engine.dispose())
            return builder(store_uri, *args, **kwargs)
    return build


def open_mlflow_stores_under_a_lock() -> None:
    """Make MLflow open its sqlite tracking and model registry stores under the creation lock.

    MLflow picks a store by the URI's scheme from a registry of builders (the same mechanism a
    tracking-store plugin uses); this wraps MLflow's own sqlite builders. Called once per process by
    the CLI, before any command touches MLflow. MLflow's own ``mlflow run`` CLI does not pass through
    here: create the store first (any command of ours does) before starting several ``mlflow run``.
    """
    from mlflow.tracking._model_registry import utils as registry_stores
    from mlflow.tracking._tracking_service import utils as tracking_stores

    tracking_stores._register("sqlite", locked(tracking_stores._get_sqlalchemy_store))
    registry_stores._get_store_registry().register("sqlite", locked(registry_stores._get_sqlalchemy_store))


def bounded_tracking_server_waits() -> None:
    """Wait less for an MLflow tracking server that does not answer (``config.MLFLOW_HTTP_DEFAULTS``),
    unless the environment sets MLflow's own variables; the processes this one starts inherit them."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
