"""Signals and store writes: a real SIGINT sent to this process inside a write arrives after it."""

import os
import signal
import threading

import mlflow
import optuna
import pytest
from optuna.storages.journal import JournalStorage
from optuna.trial import TrialState

from pipeline.names import FAILURE_TAG, RUN_ID_ATTR
from pipeline.runtime.signals import held_during_write, interrupts_at_safe_points, interrupts_raise_keyboard_interrupt
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tracking.runs import runs_killed_at_safe_points
from pipeline.tuning.storage import open_storage
from pipeline.tuning.workers import work_on_study


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
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupts_at_safe_points() as interrupted:
        with held_during_write():
            os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the write")  # that handler notes the signal, it does not raise
        interrupted()  # the safe point raises it
        reached.append("after the safe point")
    assert reached == ["after the write"]


def test_a_signal_noted_before_a_nested_block_began_stops_it_at_its_first_safe_point():
    """The tune command notes a signal while it loads its data; the trials' own block must still see it."""
    reached = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupts_at_safe_points():
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the outer block
        with interrupts_at_safe_points() as interrupted:
            interrupted()
            reached.append("a first trial")
    assert reached == []


def test_an_interrupt_ends_the_nested_run_and_its_parent_killed(mlflow_store):
    """As an experiment file's parent run and the grid point it trains: neither ends FAILED."""
    with pytest.raises(KeyboardInterrupt), mlflow.start_run() as parent, runs_killed_at_safe_points():
        with mlflow.start_run(nested=True) as child, runs_killed_at_safe_points() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            interrupted()
    for run in (parent, child):
        ended = mlflow.get_run(run.info.run_id)
        assert (ended.info.status, ended.data.tags[FAILURE_TAG]) == ("KILLED", "interrupted (SIGINT)")
    assert mlflow.active_run() is None


def test_nothing_is_raised_without_a_signal():
    with held_during_write():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("side_by_side", [1, 2])
def test_ctrl_c_inside_a_trials_store_write_lets_it_end_and_stops_at_the_next_safe_point(
        side_by_side, data_slice, mlflow_store, tmp_path, monkeypatch):
    """Seen in CI: a Ctrl-C inside Optuna's journal write broke its file lock (FileNotFoundError took the
    interrupt's place) and the trial's run ended FAILED instead of KILLED."""
    splits, _ = data_slice
    cfg = TuneConfig(trials=side_by_side, storage=f"journal:///{tmp_path / 'optuna.log'}", study_name="s",
                     test_best=False, pruner="none", patience=0, side_by_side=side_by_side)
    write = JournalStorage.set_trial_intermediate_value

    def ctrl_c_inside(storage, trial_id, step, value):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the pruner's write
        write(storage, trial_id, step, value)

    monkeypatch.setattr(JournalStorage, "set_trial_intermediate_value", ctrl_c_inside)
    optuna.create_study(study_name="s", storage=open_storage(cfg), direction="maximize")
    with mlflow.start_run() as parent, interrupts_raise_keyboard_interrupt():  # as in tune
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            work_on_study(cfg, SearchSpace(epochs_low=3, epochs_high=3), splits, parent.info)

    trials = optuna.load_study(study_name="s", storage=open_storage(cfg)).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * side_by_side
    # the interrupted write went to its end; a trial side by side stops before its own epoch-2 writes
    assert [sorted(t.intermediate_values) for t in trials] == [[1, 2], [1]][:side_by_side]
    for trial in trials:
        run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert (run.info.status, run.data.tags[FAILURE_TAG]) == ("KILLED", "interrupted (SIGINT)")
    assert not list(tmp_path.glob("optuna.log.lock*"))  # the journal's lock was released


def test_outside_the_main_thread_signals_are_left_alone():
    """Python takes signals only in its main thread: there each of these changes nothing, and raises nothing."""
    errors = []

    def write():
        try:
            with interrupts_raise_keyboard_interrupt(), interrupts_at_safe_points() as interrupted:
                with held_during_write():
                    interrupted()
        except Exception as e:  # kept for the assertion below, which shows it
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this thread's handler untouched
