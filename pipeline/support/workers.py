"""Worker processes for ``tune --workers N``; SIGTERM and Ctrl-C end a trial cleanly (``support.signals``)."""

import multiprocessing
import sys

import mlflow

from pipeline.config import SearchSpace, TuneConfig
from pipeline.core.splits import Splits
from pipeline.errors import PipelineError, quiet_store_tracebacks, show_traceback_when_debugging
from pipeline.support.optuna_storage import storage_faults_named
from pipeline.support.signals import interrupts_raise_keyboard_interrupt
from pipeline.support.trials import work_on_study


def worker_process(cfg: TuneConfig, space: SearchSpace, splits: Splits, parent: mlflow.entities.RunInfo,
                   tracking_uri: str) -> None:
    """Entry point of a ``--workers`` process (spawned: a fresh interpreter)."""
    mlflow.set_tracking_uri(tracking_uri)
    quiet_store_tracebacks()  # as the CLI does in its own process
    try:
        with interrupts_raise_keyboard_interrupt(), storage_faults_named(cfg.storage):
            work_on_study(cfg, space, splits, parent)
    except PipelineError as e:  # one line, as the CLI would print it (the parent then names this worker)
        show_traceback_when_debugging(e)
        print(f"{multiprocessing.current_process().name}: {e.message}", file=sys.stderr)
        sys.exit(1)


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
