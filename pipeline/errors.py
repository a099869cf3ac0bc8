"""The one exception type the pipeline raises for problems a user can fix, and the switch that shows the
traceback behind each one-line error.

The CLI prints a ``PipelineError`` as one line, ``Error: <message>``, and exits with its ``exit_code``
(1); raised inside ``mlflow.start_run``, it has ended the run FAILED before the message is shown. The
machine's own faults are named the same way by ``pipeline.faults``. ``--debug`` (or ``PIPELINE_DEBUG=1``)
prints the traceback behind every such line as well.
"""

import os
import reprlib
import sys
import traceback

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's default store
DEBUG_ENV = "PIPELINE_DEBUG"  # set by the CLI's --debug, so that the processes it starts inherit it


class PipelineError(Exception):
    """A problem the user can fix, said in one line: what is wrong and what to do."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut short: an error echoes what the user gave, and what the user gave may be
    huge (a list of a million numbers, a 10 MB string), so every echoed value goes through here."""
    shortener = reprlib.Repr()  # Python's own bounded repr: 5 items a level, 2 levels, ``limit`` characters
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, limit, limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 5
    return shortener.repr(value)


def printable_url(url: str) -> str:
    """A store's URL without its password, for logs and errors."""
    from sqlalchemy.engine import make_url

    try:  # a journal file's path has no password, and renders as it is
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands; the error that follows says so
        return url


def debugging() -> bool:
    """Whether ``--debug`` or ``PIPELINE_DEBUG=1`` asks for the traceback behind each one-line error."""
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def show_traceback_when_debugging(error: BaseException) -> None:
    if debugging():
        traceback.print_exception(error, file=sys.stderr)


