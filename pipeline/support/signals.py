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
