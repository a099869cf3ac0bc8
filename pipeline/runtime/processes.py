"""Which process runs a run or a trial, and whether it is still alive: cleaning up after hard kills.

A process killed with SIGKILL (or by the out-of-memory killer) cannot end its MLflow run: the run would
stay RUNNING for ever. So each run and trial records its owner: the host name, the pid and the
process's start time (a pid is reused after a while; the start time tells the new process from the
old). A later command on the same host that finds the owner gone ends the run as KILLED. On other
hosts nothing can be known from here: Optuna's heartbeats cover trials in database storages.
"""

import json
import os
import socket

import mlflow
import psutil
from mlflow import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.tracking.context.abstract_context import RunContextProvider

from pipeline.names import FAILURE_TAG, OWNER_TAG
from pipeline.runtime.store_files import sqlite_file


def this_host() -> str:
    return socket.gethostname()


def host_of(owner: str) -> str | None:
    try:
        return json.loads(owner)["host"]
    except (ValueError, KeyError, TypeError):
        return None


def this_process() -> str:
    """The owner of what this process runs, as the JSON text stored in tags and trial attributes."""
    me = psutil.Process()
    return json.dumps({"host": socket.gethostname(), "pid": me.pid, "started": round(me.create_time(), 2)})


def is_dead(owner: str) -> bool:
    """True only when surely dead: the owner ran on this host and its process is gone (or a zombie)."""
    try:
        owner = json.loads(owner)
        if owner["host"] != socket.gethostname():
            return False  # another machine's process: cannot tell from here
        process = psutil.Process(owner["pid"])
        # create_time is known to 1/100 s: another start time means the pid now belongs to another process
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - owner["started"]) > 0.5
    except psutil.NoSuchProcess:
        return True
    except (ValueError, KeyError, TypeError, psutil.Error):  # not an owner we wrote, or not ours to inspect
        return False


def why_dead(owner: str) -> str:
    pid = json.loads(owner)["pid"]
    return f"its process (pid {pid} on {socket.gethostname()}) died without ending it (killed?)"


def claim_launched_run() -> None:
    """Record this process as the owner of the run ``mlflow run`` (or ``main``) created for it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        MlflowClient().set_tag(run_id, OWNER_TAG, this_process())


def claim_active_run() -> None:
    mlflow.set_tag(OWNER_TAG, this_process())


class OwnerContext(RunContextProvider):
    """Adds the owner tag to every run this process creates (MLflow's run-context plugin interface)."""

    def in_context(self):
        return True

    def tags(self):
        return {OWNER_TAG: this_process()}


def tag_new_runs_with_their_owner() -> None:
    """Give each run created from now on in this process the owner tag (once per process)."""
    if not any(isinstance(p, OwnerContext) for p in context_registry._run_context_provider_registry):
        context_registry._run_context_provider_registry.register(OwnerContext)


def end_runs_of_dead_processes() -> list[str]:
    """End as KILLED every RUNNING run whose owner died on this host; returns their ids.

    Runs whose owner is alive, on another host or unknown are left alone. Several processes may do
    this at once: ending a run twice does no harm.
    """
    uri = mlflow.get_tracking_uri()
    store_file = sqlite_file(uri)
    if store_file is not None and not store_file.exists():
        return []  # a new store holds no runs, and must not be created by a mere check
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(experiments, max_results=1000,
                                 filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` LIKE '%'")
    ended = []
    for run in running:
        owner = run.data.tags[OWNER_TAG]
        if is_dead(owner):
            client.set_tag(run.info.run_id, FAILURE_TAG, why_dead(owner))
            client.set_terminated(run.info.run_id, status="KILLED")
            print(f"ended run {run.info.run_id} ({run.info.run_name}): {why_dead(owner)}")
            ended.append(run.info.run_id)
    return ended
