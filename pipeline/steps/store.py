"""Command ``create-store``: the MLflow tracking store and its experiment, made before the steps run.

MLflow's own ``mlflow run`` creates a new store itself, before any code of ours runs; several started
at once on a new store collide while they create its tables (and, on a new experiment, while they
create it). One command of ours makes both first, under the store's lock (``pipeline.runtime.store_files``):
``make run`` runs it before ``mlflow run``. Imports only MLflow.
"""

import click
import mlflow
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME

from pipeline.tracking.stores import open_tracking_store


@click.command("create-store")
def create_store_command():
    open_tracking_store()  # the store and, unless MLFLOW_EXPERIMENT_ID names one that exists, the experiment
    click.echo(f"MLflow store {mlflow.get_tracking_uri()} ready; runs go to experiment "
               f"{MLFLOW_EXPERIMENT_ID.get() or MLFLOW_EXPERIMENT_NAME.get()!r}")
