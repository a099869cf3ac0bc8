"""Command ``create-store``: the MLflow tracking store and its experiment, made before the steps run.

MLflow's own ``mlflow run`` creates a new store itself, before any code of ours runs; several started
at once on a new store collide while they create its tables (and, on a new experiment, while they
create it). One command of ours makes both first, under the store's lock (``pipeline.runtime.store_files``):
``make run`` runs it before ``mlflow run``. Imports only MLflow.
"""

import click
import mlflow
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.tracking.stores import open_tracking_store


def create_experiment_if_new(name: str) -> None:
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name)
        except MlflowException as e:  # another process created it a moment ago
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise


@click.command("create-store")
def create_store_command():
    open_tracking_store()
    if not MLFLOW_EXPERIMENT_ID.get():  # an experiment given by id exists already (or the commands refuse it)
        create_experiment_if_new(MLFLOW_EXPERIMENT_NAME.get())
    click.echo(f"MLflow store {mlflow.get_tracking_uri()} ready; runs go to experiment "
               f"{MLFLOW_EXPERIMENT_ID.get() or MLFLOW_EXPERIMENT_NAME.get()!r}")
