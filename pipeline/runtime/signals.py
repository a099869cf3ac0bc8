"""Signals: SIGTERM acts like Ctrl-C, and an interrupted command ends its MLflow runs KILLED.

The CLI makes SIGTERM act like Ctrl-C for every command, from before it imports anything heavy
(``pipeline.cli``). Within a command an interrupt is taken in one of two ways:

- at safe points (``interrupts_at_safe_points``): the signal is noted when it comes and raised where no
  store write is under way. For commands that write to their stores while they work: ``train``,
  ``tune`` and its workers, ``experiment``;
- at once (``interrupts_raise_keyboard_interrupt``): for commands that mostly read or wait: ``prepare``,
  ``evaluate``, ``report``, and ``main``, which waits for its step's process (MLflow stops the step
  when that wait is interrupted).

Either way ``runs_end_killed_on_interrupt`` then ends every active run KILLED, the reason as its tag
``pipeline.failure``, and the CLI prints one line (``stopped_by``). Trials end their own runs
(``pipeline.tuning.trials``). Imports nothing heavy (MLflow only when a run ends).
"""

import contextlib
import signal
import threading

from pipeline.errors import PipelineError

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


def exit_status(e: KeyboardInterrupt) -> int:
    """The shell's exit status for a process stopped by the signal: 128 + its number (130 for Ctrl-C)."""
    name = e.args[0] if e.args and e.args[0] in signal.Signals.__members__ else "SIGINT"
    return 128 + signal.Signals[name]


def stopped_by(e: KeyboardInterrupt) -> PipelineError:
    """The one line an interrupted command ends with (in place of click's bare "Aborted!")."""
    error = PipelineError(f"{interrupt_reason(e)}; the runs it had open ended KILLED, what had finished is kept")
    error.exit_code = exit_status(e)
    return error


def ignore_further_interrupts() -> None:
    """After the first interrupt: a second Ctrl-C or a SIGTERM would cut the clean-up of the first short."""
    for s in INTERRUPTS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_raise_keyboard_interrupt():
    """Make SIGTERM act like Ctrl-C: either raises KeyboardInterrupt at once, naming the signal; further
    ones are ignored while the interrupted command closes."""
    def interrupt_once(signum, frame):
        ignore_further_interrupts()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with interrupts_handled_by(interrupt_once):
        yield


noted: list[str] = []  # the signals noted since the outermost interrupts_at_safe_points block began


def note(signum, frame) -> None:
    """The handler at safe points: note the signal (a second one too: it is never raised, so it cannot
    cut the clean-up of the first short)."""
    noted.append(signal.Signals(signum).name)


def check() -> None:
    """A safe point: raise KeyboardInterrupt if Ctrl-C or SIGTERM has come."""
    if noted:
        raise KeyboardInterrupt(noted[0])


@contextlib.contextmanager
def interrupts_at_safe_points():
    """Note Ctrl-C and SIGTERM instead of raising at once; yields ``check()``, which raises
    KeyboardInterrupt once one has arrived: call it where no store write is under way.

    A trial writes to its stores many times (its MLflow run, Optuna's storage); an interrupt raised in
    the middle of a write can leave a sqlite transaction open, so that the clean-up that ends the
    trial's run finds the database locked, or break Optuna's journal-file lock, whose release then
    raises FileNotFoundError in the interrupt's place (and the trial's run ends FAILED, not KILLED).

    Blocks nest: one inside another (``tune``'s workers inside the ``tune`` command, a study inside an
    experiment) shares its notes, so that a signal noted before the inner block began still stops it.
    """
    if signal.getsignal(signal.SIGINT) is note:  # inside another such block: its handlers and notes serve
        yield check
        return
    noted.clear()
    try:
        with interrupts_handled_by(note):
            yield check
            check()  # one that came after the last safe point still stops the command
    finally:
        noted.clear()  # (the KeyboardInterrupt on its way out carries the signal's name)


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
