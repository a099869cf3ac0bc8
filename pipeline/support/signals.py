"""Signals: SIGTERM acts like Ctrl-C, so that a stopped command still ends its runs and trials properly.

Used by ``tune`` (the interrupted trial is failed and its run ended) and ``main`` (the running step is
stopped too, and both runs end). Imports nothing heavy: ``main`` stays free of PyTorch.
"""

import contextlib
import signal


@contextlib.contextmanager
def interrupts_raise_keyboard_interrupt():
    """Make SIGTERM act like Ctrl-C, and ignore further signals while the interrupted trial closes.

    Optuna marks a trial FAIL when its objective sees KeyboardInterrupt, and run_trial ends the
    trial's MLflow run; a second Ctrl-C or a SIGTERM arriving during that clean-up would cut it short.
    """
    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here, leave them alone
        yield
        return

    def interrupt_once(signum, frame):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in previous:
        signal.signal(s, interrupt_once)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def interrupts_at_safe_points():
    """Note Ctrl-C and SIGTERM instead of raising at once; yields ``check()``, which raises
    KeyboardInterrupt once one has arrived: call it where no store write is under way.

    Trials side by side write to the tracking store several times per epoch; an interrupt raised in the
    middle of such a write can leave its sqlite transaction open, and then the clean-up that ends the
    trials' runs finds the database locked.
    """
    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield lambda: None
        return
    arrived = []

    def note(signum, frame):
        arrived.append(signal.Signals(signum).name)
        for s in previous:  # further signals are ignored while the interrupted trials close
            signal.signal(s, signal.SIG_IGN)

    def check() -> None:
        if arrived:
            raise KeyboardInterrupt(arrived[0])

    for s in previous:
        signal.signal(s, note)
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check()  # one that came after the last safe point still stops the command


@contextlib.contextmanager
def held_during_write():
    """Hold Ctrl-C and SIGTERM while a store write is under way; one that came is delivered when it ends.

    An interrupt raised inside a sqlite write can leave its transaction open, and the clean-up that then
    ends the interrupted runs finds the database locked (a one-at-a-time trial's Ctrl-C once left its run
    RUNNING so). The handlers in force (raising KeyboardInterrupt, or noting it for a safe point) still
    decide what the signal does: it is raised again, to them, after the write.
    """
    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if None in previous.values():  # a handler set outside Python could not be put back
            raise ValueError
        arrived = []
        for s in previous:
            signal.signal(s, lambda signum, frame: arrived.append(signum))
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:
            signal.raise_signal(arrived[0])
