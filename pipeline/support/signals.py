"""Signals: SIGTERM acts like Ctrl-C, so that a stopped command still ends its runs and trials properly.

Used by ``tune`` (the interrupted trials are failed and their runs ended) and ``main`` (the running step
is stopped too, and both runs end). Imports nothing heavy: ``main`` stays free of PyTorch.
"""

import contextlib
import signal
import threading

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_handled_by(handler):
    """Send Ctrl-C and SIGTERM to ``handler`` for the length of the block, then put back the handlers before.

    Changes nothing where Python cannot: outside the main thread, or when a handler was set outside
    Python (it could not be put back).
    """
    previous = {s: signal.getsignal(s) for s in INTERRUPTS}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    for s in INTERRUPTS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def interrupt_reason(e: KeyboardInterrupt) -> str:
    """What an interrupted run or trial records: the signal's name from our handlers, else Ctrl-C."""
    return f"interrupted ({e.args[0] if e.args else 'Ctrl-C'})"


def ignore_further_interrupts() -> None:
    """After the first interrupt: a second Ctrl-C or a SIGTERM would cut the clean-up of the first short."""
    for s in INTERRUPTS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_raise_keyboard_interrupt():
    """Make SIGTERM act like Ctrl-C, and ignore further signals while the interrupted command closes.

    Optuna marks a trial FAIL when its objective sees KeyboardInterrupt, and the runs end KILLED.
    """
    def interrupt_once(signum, frame):
        ignore_further_interrupts()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with interrupts_handled_by(interrupt_once):
        yield


@contextlib.contextmanager
def interrupts_at_safe_points():
    """Note Ctrl-C and SIGTERM instead of raising at once; yields ``check()``, which raises
    KeyboardInterrupt once one has arrived: call it where no store write is under way.

    A trial writes to its stores many times (its MLflow run, Optuna's storage); an interrupt raised in
    the middle of a write can leave a sqlite transaction open, so that the clean-up that ends the
    trial's run finds the database locked, or break Optuna's journal-file lock, whose release then
    raises FileNotFoundError in the interrupt's place (and the trial's run ends FAILED, not KILLED).
    """
    arrived = []

    def note(signum, frame):
        arrived.append(signal.Signals(signum).name)
        ignore_further_interrupts()

    def check() -> None:
        if arrived:
            raise KeyboardInterrupt(arrived[0])

    with interrupts_handled_by(note):
        yield check
    check()  # one that came after the last safe point still stops the command


@contextlib.contextmanager
def held_during_write():
    """Hold Ctrl-C and SIGTERM while a store write is under way; one that came is delivered when it ends.

    For a write that may run outside ``interrupts_at_safe_points`` (the ``train`` command's per-epoch
    metrics): the handlers in force still decide what the signal does; it is raised again, to them,
    after the write.
    """
    arrived = []
    try:
        with interrupts_handled_by(lambda signum, frame: arrived.append(signum)):
            yield
    finally:
        if arrived:
            signal.raise_signal(arrived[0])
