"""Signals held during a store write: a real SIGINT sent to this process inside the write arrives after it."""

import os
import signal

import pytest

from pipeline.support.signals import held_during_write, interrupts_at_safe_points


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """A job started in the background (as CI may start the suite) inherits SIGINT ignored: these tests
    start from Python's own Ctrl-C handler, and put back what they found."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_write_is_raised_after_it():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with held_during_write():
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the "write"
            finished.append("write")  # the write goes on to its end
        finished.append("after")  # never reached: the interrupt is raised as the write ends
    assert finished == ["write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_a_held_signal_goes_to_the_handler_in_force():
    """Inside a side-by-side group the handler only notes the signal for the next safe point."""
    reached = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with interrupts_at_safe_points() as interrupted:
            with held_during_write():
                os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the write")  # that handler notes the signal, it does not raise
            interrupted()  # the safe point raises it
            reached.append("after the safe point")
    assert reached == ["after the write"]


def test_nothing_is_raised_without_a_signal():
    with held_during_write():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
