"""Runs record the process that runs them; the commands that train end the runs of dead processes.

Every run started in a process of this project gets the owner tag (``pipeline.runtime.processes``)
from MLflow itself (``pipeline.tracking.owner_tag``); a run that ``mlflow run`` created before our code
started is claimed explicitly.
"""

import os

import mlflow
from mlflow import MlflowClient

from pipeline.names import FAILURE_TAG, OWNER_TAG
from pipeline.runtime.processes import is_dead, this_process, why_dead
from pipeline.runtime.store_files import sqlite_file


def claim_launched_run() -> None:
    """Record this process as the owner of the run ``mlflow run`` (or ``main``) created for it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        MlflowClient().set_tag(run_id, OWNER_TAG, this_process())


def end_runs_of_dead_processes() -> list[str]:
    """End as KILLED every RUNNING run whose owner is surely dead; returns their ids.

    Runs whose owner is alive, elsewhere or unknown are left alone. Several processes may do this at
    once: ending a run twice does no harm.
    """
    store_file = sqlite_file(mlflow.get_tracking_uri())
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
