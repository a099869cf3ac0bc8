"""New sqlite stores (MLflow's and Optuna's), created once even when several processes start together.

A new store is made by the first process that takes the lock file beside it (``mlflow.db.lock``) while
the others wait, in a staging file moved into place when complete, so that a process killed meanwhile
leaves no half-made store; the others then find it ready. Other databases (PostgreSQL, MySQL) have no
file to lock beside (``pipeline.tuning.storage`` retries their creation instead).
"""

import contextlib
import os
from pathlib import Path

import filelock
from sqlalchemy.engine import make_url


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


def is_new(url: str) -> bool:
    """Whether ``url`` is a sqlite store that does not exist yet (or is an empty file)."""
    path = sqlite_file(url)
    return path is not None and not (path.exists() and path.stat().st_size > 0)


def create_if_new(url: str, create) -> None:
    """Create a new sqlite store in a staging file, then move it into place (call under the lock).

    A process killed while MLflow migrates a new store would otherwise leave it half-made for good
    (``_alembic_tmp_experiments``): now it leaves only the staging file, which the next try replaces.
    ``create(staging_url)`` makes the store's tables and closes its connections.
    """
    if not is_new(url):
        return
    path = sqlite_file(url)
    staging = path.with_name(path.name + ".new")
    for leftover in (staging, Path(f"{staging}-journal")):
        leftover.unlink(missing_ok=True)
    create(make_url(url).set(database=str(staging)).render_as_string(hide_password=False))
    os.replace(staging, path)
