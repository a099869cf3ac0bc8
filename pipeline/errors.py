"""The one exception type the pipeline raises for problems a user can fix, and the machine's own faults.

``PipelineError`` is a ``click.ClickException``, so the CLI prints just the message (no traceback) and
exits with status 1; inside ``mlflow.start_run`` the run is marked FAILED before the message is shown.

``environment_problem`` turns what the machine does wrong (a full disk, a folder we may not write, a
tracking database that cannot be opened) into one such line; the CLI applies it to every command.
"""

import errno
import logging
import os
import reprlib
import sqlite3

import click

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's default store


class PipelineError(click.ClickException):
    pass


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut short: an error echoes what the user gave, and what the user gave may be
    huge (a list of a million numbers, a 10 MB string), so every echoed value goes through here."""
    shortener = reprlib.Repr()  # Python's own bounded repr: 5 items a level, 2 levels, ``limit`` characters
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, limit, limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 5
    return shortener.repr(value)


def causes(error: BaseException):
    """The error and every error behind it (raised from, raised during, SQLAlchemy's ``orig``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or getattr(error, "orig", None) or error.__context__


def environment_problem(error: BaseException) -> str | None:
    """One line naming a fault of the machine behind ``error`` and what to do, or None if it is not one."""
    store = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    for e in causes(error):
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return (f"the disk is full (writing {e.filename or 'a file'}); free some space, or point "
                    "MLFLOW_TRACKING_URI and the working folder at a disk with room, and run again")
        if isinstance(e, OSError) and e.errno in NO_ACCESS:
            return f"cannot access {e.filename or 'a file'} ({e.strerror}); check its permissions"
        if isinstance(e, sqlite3.OperationalError):
            return (f"the MLflow tracking store {store} failed ({e}); check that its folder exists and is "
                    "writable and that its disk is not full")
    return None


def unwritable_sqlite_store(uri: str) -> str | None:
    """Why the sqlite tracking store at ``uri`` cannot be written, or None (other stores: not checked).

    Checked before MLflow opens it: MLflow retries a database it cannot open for about 100 seconds,
    which for a read-only folder only delays the same error.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    db = os.path.abspath(uri[len("sqlite:///"):].split("?")[0])
    folder = os.path.dirname(db)
    while not os.path.exists(folder):  # MLflow creates missing folders: the nearest existing one counts
        folder = os.path.dirname(folder)
    for path in (folder, db):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return (f"the MLflow tracking store {uri} cannot be written ({path} is read-only for this user); "
                    "point MLFLOW_TRACKING_URI at a writable place")
    return None


class WithoutTraceback(logging.Filter):
    """Keeps a log record's message, drops its traceback: the CLI reports the cause in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


def quiet_store_tracebacks() -> None:
    # MLflow logs every failed database call with its traceback before raising it (a full disk, a
    # locked file); the CLI then names the fault itself, in one line.
    logging.getLogger("mlflow.store.db.utils").addFilter(WithoutTraceback())
