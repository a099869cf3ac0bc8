"""The machine's own faults, each named in one line: a full disk, a folder we may not write, a store that
cannot be written or reached, a database server that does not answer.

``environment_problem`` turns such an error into one line naming the cause that was seen and what to do;
the CLI applies it to every command (``pipeline.errors.PipelineError`` is its counterpart for the user's
own problems). Anything else, a bug above all, keeps its traceback.
"""

import errno
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
from dataclasses import dataclass

from pipeline.errors import DEFAULT_TRACKING_URI, debugging, printable_url, show_traceback_when_debugging

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
# Python's own programming errors: one raised while another error was being handled is a bug of its
# own, not that error (a TypeError in an OSError's clean-up is no full disk), and keeps its traceback.
PROGRAMMING_ERRORS = (ArithmeticError, AssertionError, AttributeError, LookupError, NameError, TypeError, ValueError)


@dataclass(frozen=True)
class Fault:
    """A fault of the machine, as seen: what happened, in a few words, and what to do about it."""

    cause: str
    remedy: str


MAKE_WRITABLE = ("make the file and its folder writable (permissions, chattr -i, a read-only mount) and check "
                 "the disk, or use another path")
# sqlite's result codes (the error's ``sqlite_errorname``, by prefix: SQLITE_IOERR_WRITE is an SQLITE_IOERR)
SQLITE_FAULTS = {
    "SQLITE_FULL": "free some space, or move the file to a disk with room",
    "SQLITE_READONLY": MAKE_WRITABLE,
    "SQLITE_IOERR": MAKE_WRITABLE,
    "SQLITE_CANTOPEN": "check that its folder exists and that this user may write there",
    "SQLITE_PERM": MAKE_WRITABLE,
    "SQLITE_BUSY": "another process holds it locked: let it finish, or end it",
    "SQLITE_LOCKED": "another process holds it locked: let it finish, or end it",
    "SQLITE_CORRUPT": "the file is damaged or is not a database: restore it from a copy, or use another path",
    "SQLITE_NOTADB": "the file is damaged or is not a database: restore it from a copy, or use another path",
}
SERVER_UP = "check that the server runs and that this machine reaches it"
# What a database driver's message says (libpq, PyMySQL), lower-cased, as a regular expression -> the
# fault. Connection-time errors carry no error code, only these words.
DRIVER_FAULTS = {
    "timeout expired": Fault("no answer within the connect timeout", SERVER_UP + " (connect_timeout=<seconds> "
                             "in a PostgreSQL URL sets the wait)"),
    "timed out": Fault("no answer within the timeout", SERVER_UP),  # PyMySQL's connect_timeout
    "statement timeout": Fault("a statement ran past the statement timeout (a lock held for long, or an "
                               "overloaded server)", SERVER_UP + ", and what holds its locks"),
    "connection refused": Fault("connection refused", "nothing listens at that host and port: start the server, "
                                "or fix the host and port in the URL"),
    "could not translate host name": Fault("unknown host name", "fix the host name in the URL"),
    "name or service not known": Fault("unknown host name", "fix the host name in the URL"),
    "password authentication failed": Fault("authentication failed", "check the user name and password (in the "
                                            "URL, PGPASSWORD or ~/.pgpass)"),
    "no password supplied": Fault("the server asks for a password", "give it in the URL, PGPASSWORD or ~/.pgpass"),
    "access denied": Fault("access denied", "check the user name and password in the URL"),
    'role ".*" does not exist': Fault("no such user on the server", "fix the user name in the URL, or create "
                                      "the user (createuser)"),
    'database ".*" does not exist': Fault("no such database on the server", "fix its name in the URL, or create "
                                          "it (createdb)"),
    "server closed the connection": Fault("the server closed the connection", SERVER_UP + "; then run again"),
    "terminating connection": Fault("the server closed the connection", SERVER_UP + "; then run again"),
    "no space left on device": Fault("the database server's disk is full", "free some space on the server"),
    "read-only transaction": Fault("the database is read-only", "use a server that takes writes"),
}


HTTP_TIMEOUT, HTTP_RETRIES = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # MLflow's own


def http_timeout() -> Fault:
    """A tracking server that did not answer, with the waits in force (the CLI sets them unless the user did)."""
    timeout, retries = os.environ.get(HTTP_TIMEOUT), os.environ.get(HTTP_RETRIES)
    waited = f"within {timeout} s, {int(retries) + 1} tries" if timeout and retries else "within the timeout"
    return Fault(f"no answer {waited}", f"{SERVER_UP} ({HTTP_TIMEOUT} and {HTTP_RETRIES} set how long to wait)")


def causes(error: BaseException):
    """The error and every error behind it: raised from, SQLAlchemy's ``orig``, and raised while handling
    (``__context__``), except behind a programming error (``PROGRAMMING_ERRORS``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        behind = error.__cause__ or getattr(error, "orig", None)
        if behind is None and not error.__suppress_context__ and not isinstance(error, PROGRAMMING_ERRORS):
            behind = error.__context__
        error = behind


def file_fault(e: BaseException) -> str | None:
    """One line for an OSError on a named file (the disk, its permissions), or None."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL + NO_ACCESS:
        return None
    where = e.filename or "a file"
    if e.errno in DISK_FULL:
        return (f"the disk is full (writing {where}); free some space, or point MLFLOW_TRACKING_URI and the "
                "working folder at a disk with room, and run again")
    if e.errno == errno.EROFS:
        return f"cannot write {where} ({e.strerror}); point MLFLOW_TRACKING_URI and the working folder elsewhere"
    return f"cannot access {where} ({e.strerror}); check its permissions"


def fault_of(error: BaseException) -> Fault | None:
    """The machine fault behind ``error``, as its driver or the network saw it; None if there is none.

    Only what names a fault is read: sqlite's result codes, a driver's connection messages, the
    network's own errors. An unknown database error (a missing table, bad SQL) is not a fault: a bug.
    """
    import sqlalchemy.exc  # here: the CLI imports this module before it knows a store is needed

    for e in causes(error):
        if isinstance(e, sqlite3.Error):
            name = getattr(e, "sqlite_errorname", "")
            for code, remedy in SQLITE_FAULTS.items():
                if name.startswith(code):
                    return Fault(str(e), remedy)
        elif isinstance(e, sqlalchemy.exc.DBAPIError) and not isinstance(e.orig, sqlite3.Error):
            text = str(e.orig).lower()
            for words, fault in DRIVER_FAULTS.items():
                if re.search(words, text):
                    return fault
        elif isinstance(e, TimeoutError):  # a socket's: MLflow's HTTP requests
            return http_timeout()
        elif isinstance(e, ConnectionRefusedError):
            return DRIVER_FAULTS["connection refused"]
        elif isinstance(e, socket.gaierror):
            return DRIVER_FAULTS["name or service not known"]
    return None


def from_optuna_storage(error: BaseException) -> bool:
    """Whether ``error`` came from an Optuna database storage: Optuna raises StorageInternalError from
    the driver's error, where MLflow raises an MlflowException."""
    optuna_exceptions = sys.modules.get("optuna.exceptions")  # not imported: no Optuna storage was used
    return optuna_exceptions is not None and any(
        isinstance(e, optuna_exceptions.StorageInternalError) for e in causes(error))


def named_store(error: BaseException) -> str:
    """The store a database error came from (``pipeline.tuning.storage`` names the Optuna
    storage's URL in the errors of ``tune``)."""
    if from_optuna_storage(error):
        return "the Optuna storage"
    return f"the MLflow tracking store {printable_url(os.environ.get('MLFLOW_TRACKING_URI', DEFAULT_TRACKING_URI))}"


def environment_problem(error: BaseException) -> str | None:
    """One line naming a fault of the machine behind ``error`` and what to do, or None if it is not one."""
    for e in causes(error):
        if line := file_fault(e):
            return line
    fault = fault_of(error)
    return f"{named_store(error)} failed: {fault.cause}; {fault.remedy}" if fault else None


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


def report_thread_faults(args: threading.ExceptHookArgs) -> None:
    """A thread that stops on a machine fault (Optuna's heartbeat thread, when its storage fails) says so in
    one line; any other error of a thread is printed as Python prints it, with its traceback."""
    problem = environment_problem(args.exc_value) if isinstance(args.exc_value, Exception) else None
    if problem is None:
        threading.__excepthook__(args)
        return
    show_traceback_when_debugging(args.exc_value)
    print(f"thread {args.thread.name if args.thread else '?'} stopped: {problem}", file=sys.stderr)


class WithoutTraceback(logging.Filter):
    """Keeps a log record's message, drops its traceback: the CLI reports the cause in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = record.exc_text = None
        return True


def quiet_store_tracebacks() -> None:
    # MLflow logs every failed database call with its traceback before raising it (a full disk, a
    # locked file); the CLI then names the fault itself, in one line. So do threads that hit it.
    if not debugging():
        logging.getLogger("mlflow.store.db.utils").addFilter(WithoutTraceback())
    threading.excepthook = report_thread_faults
