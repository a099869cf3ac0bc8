"""Worker processes for ``tune --workers N``, and how Ctrl-C and SIGTERM reach them.

Each worker is a spawned process (a fresh interpreter) that reads the splits from a file the parent
writes once: its arguments stay small, so starting it never waits while it imports PyTorch, and an
interrupt can never cut them short (the worker would die reading them, with a traceback).

The parent only waits, looking for an interrupt a few times a second (``POLL_SECONDS``): one that comes
is passed on to every worker as SIGTERM; each fails its running trials and ends their runs KILLED at its
next safe point (``pipeline.runtime.signals``), then exits quietly; the parent waits for them all, then ends its
own run KILLED.
"""

import multiprocessing
import signal
import sys
import tempfile
from multiprocessing import resource_tracker
from pathlib import Path

import mlflow
import optuna
import torch

from pipeline.core.splits import Splits
from pipeline.core.training import Tensors
from pipeline.errors import PipelineError, show_traceback_when_debugging
from pipeline.faults import quiet_store_tracebacks
from pipeline.runtime.signals import exit_status, interrupts_at_safe_points
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.search import make_pruner
from pipeline.tuning.stacked_trials import work_side_by_side
from pipeline.tuning.storage import open_storage, storage_faults_named
from pipeline.tuning.trial_state import Heartbeats, Worker
from pipeline.tuning.trials import work_one_at_a_time

POLL_SECONDS = 0.2  # how often the waiting parent looks for an interrupt


def work_on_study(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Take trials until the study holds ``cfg.trials``: K at a time as one stacked layer, or one at a time.

    Any number of workers may do this at once, on this machine and others; trials still running
    elsewhere hold their place, so that the workers together stop at the total.
    """
    storage = open_storage(cfg)
    study = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=make_pruner(cfg.pruner, space))
    # Ctrl-C and SIGTERM stop the trials only at safe points, between the stores' writes (why: signals.py)
    with interrupts_at_safe_points() as interrupted, Heartbeats(storage, cfg.heartbeat_interval) as heartbeats:
        worker = Worker(study, storage, cfg, space, splits, Tensors.from_splits(splits), parent, interrupted,
                        heartbeats)
        if cfg.side_by_side > 1:
            work_side_by_side(worker)
        else:
            work_one_at_a_time(worker)


def worker_process(cfg: TuneConfig, space: SearchSpace, data: Path, parent: mlflow.entities.RunInfo,
                   tracking_uri: str, threads: int) -> None:
    """Entry point of a ``--workers`` process (spawned: a fresh interpreter); ``threads``: its parent's
    PyTorch threads (``ThreadsConfig``), which a fresh interpreter does not inherit."""
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    quiet_store_tracebacks()  # as the CLI does in its own process
    try:
        with interrupts_at_safe_points() as interrupted, storage_faults_named(cfg.storage):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # blocked at its start (start_worker)
            interrupted()
            work_on_study(cfg, space, Splits.load(data), parent)
    except KeyboardInterrupt as e:  # its trials have failed and their runs ended: the parent says why
        sys.exit(exit_status(e))
    except PipelineError as e:  # one line, as the CLI would print it (the parent then names this worker)
        show_traceback_when_debugging(e)
        print(f"{multiprocessing.current_process().name}: {e.message}", file=sys.stderr)
        sys.exit(1)


def start_worker(process: multiprocessing.Process) -> None:
    """Start a worker with Ctrl-C blocked; it unblocks it once its handlers are set.

    A Ctrl-C at the terminal reaches every process of the group: a worker still starting (importing
    PyTorch) would die of it with a traceback. The SIGTERM the parent passes on ends such a worker
    quietly. (Multiprocessing's resource tracker unblocks both signals when it starts, which the first
    start would do: it is started beforehand.)
    """
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_workers(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo) -> None:
    """Run the trials here (one worker) or in ``cfg.workers`` processes, all on the same study."""
    if cfg.workers == 1:
        work_on_study(cfg, space, splits, parent)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch/sqlite start is unsafe
    with tempfile.TemporaryDirectory(prefix="tune-workers-") as folder, interrupts_at_safe_points() as interrupted:
        data = splits.save(Path(folder))
        processes = [context.Process(target=worker_process, name=f"tune-worker-{i}",
                                     args=(cfg, space, data, parent, mlflow.get_tracking_uri(),
                                           torch.get_num_threads()))
                     for i in range(cfg.workers)]
        try:
            for p in processes:
                interrupted()
                start_worker(p)
            for p in processes:
                while p.is_alive():
                    p.join(POLL_SECONDS)
                    interrupted()
        except KeyboardInterrupt:
            started = [p for p in processes if p.pid is not None]
            for p in started:
                p.terminate()  # SIGTERM: each worker fails its trials and ends their runs, then exits
            for p in started:
                p.join()
            raise
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise PipelineError(f"{', '.join(failed)} failed, see the messages above; the finished trials "
                            "are kept in the study: run the same command again to resume it")
