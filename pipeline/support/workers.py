"""Worker processes for ``tune --workers N``, and signals: SIGTERM and Ctrl-C end a trial cleanly."""

import contextlib
import multiprocessing
import signal

import mlflow

from pipeline.config import SearchSpace, TuneConfig
from pipeline.core.splits import Splits
from pipeline.errors import PipelineError
from pipeline.support.trials import work_on_study


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


def worker_process(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo,
                   tracking_uri: str) -> None:
    """Entry point of a ``--workers`` process (spawned: a fresh interpreter)."""
    mlflow.set_tracking_uri(tracking_uri)
    with interrupts_raise_keyboard_interrupt():
        work_on_study(cfg, space, splits, parent)


def run_workers(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Run the trials here (one worker) or in ``cfg.workers`` processes, all on the same study."""
    if cfg.workers == 1:
        work_on_study(cfg, space, splits, parent)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch/sqlite start is unsafe
    processes = [context.Process(target=worker_process, name=f"tune-worker-{i}",
                                 args=(cfg, space, splits, parent, mlflow.get_tracking_uri()))
                 for i in range(cfg.workers)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:
        for p in processes:  # SIGTERM: each worker fails its trial and ends its run, then exits
            p.terminate()
        for p in processes:
            p.join()
        raise
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise PipelineError(f"{', '.join(failed)} failed, see the messages above; the finished trials "
                            "are kept in the study: run the same command again to resume it")
