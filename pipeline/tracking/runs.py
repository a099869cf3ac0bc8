"""Writing to MLflow runs: params once, one batched call per epoch, series, and ending runs on interrupt.

MLflow's defaults are used throughout (tracking store ``sqlite:///mlflow.db``, artifacts in ``./mlruns``),
overridable with the usual ``MLFLOW_TRACKING_URI`` (e.g. ``http://host:5000``, a tracking server that
also serves the artifacts: nothing here assumes a local store or local artifact paths).

Imports only MLflow and pandas: ``main`` uses it without PyTorch.
"""

import contextlib
import time

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.names import FAILURE_TAG
from pipeline.runtime.signals import interrupt_reason, interrupts_at_safe_points, interrupts_raise_keyboard_interrupt


def log_new_params(params: dict) -> None:
    """Log params the active run does not hold yet.

    Under ``mlflow run`` the project has already logged its -P values as typed on the command line
    ("1e-1"), and MLflow refuses to change a param, so ours ("0.1") must not overwrite them.
    """
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {k: "" if v is None else v for k, v in params.items() if k not in logged}
    if new:
        mlflow.log_params(new)


def log_epoch(metrics: dict, synchronous: bool = True, run_id: str | None = None) -> None:
    """One batched call per epoch, the epoch number as the step; to the active run unless ``run_id``.

    Straight to the client's ``log_batch``: ``mlflow.log_metrics(run_id=...)`` first reads the whole run
    back (to link metrics to the run's logged models, which a run has none of while it trains), and that
    read costs as much as the write itself, for each trial's epoch.
    """
    run_id = run_id or mlflow.active_run().info.run_id
    now, step = int(time.time() * 1000), metrics["epoch"]
    logged = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
    MlflowClient().log_batch(run_id, metrics=logged, synchronous=synchronous)


def log_series(table: pd.DataFrame, steps) -> None:
    """Every column of ``table`` as a metric curve over ``steps``, in one call (MLflow batches it).

    One ``log_metrics`` call per step would cost a database round trip each (seconds for 100 steps).
    """
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step))
               for key in table.columns for value, step in zip(table[key], steps)]
    MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def end_active_runs_killed(reason: str) -> None:
    """End every active MLflow run of this process KILLED, innermost first, with ``reason`` as its tag;
    a tag that cannot be written does not keep the run from ending."""
    while mlflow.active_run() is not None:
        try:
            mlflow.set_tag(FAILURE_TAG, reason)
        finally:
            mlflow.end_run("KILLED")


@contextlib.contextmanager
def runs_end_killed_on_interrupt():
    """On KeyboardInterrupt inside the block, end every active run KILLED with the reason, then let it go on.

    Put it inside the ``with mlflow.start_run()`` of the run(s) to end: that block would end its run
    FAILED on the way out (one of these in an inner block has ended them all, so an outer one is a no-op).
    """
    try:
        yield
    except KeyboardInterrupt as e:
        end_active_runs_killed(interrupt_reason(e))
        raise


@contextlib.contextmanager
def runs_killed_at_safe_points():
    """For a command that writes while it works: Ctrl-C and SIGTERM end its runs KILLED at the next safe
    point, ``check()``, which it yields, or at the end of the block."""
    with interrupts_at_safe_points() as interrupted, runs_end_killed_on_interrupt():
        yield interrupted
        interrupted()  # inside: one that came after the last safe point still ends the runs KILLED


@contextlib.contextmanager
def runs_killed_at_once():
    """For a command that mostly reads or waits: Ctrl-C and SIGTERM end its runs KILLED at once."""
    with interrupts_raise_keyboard_interrupt(), runs_end_killed_on_interrupt():
        yield
