"""The MLflow tracking store: a new sqlite store is made once, whoever starts first.

The first process that opens a new sqlite store creates its tables, and MLflow then migrates them step
by step; two processes doing that at the same moment collide, and the loser can leave the file
half-made for good. So a command of ours makes a new store first, under the store's creation lock and
in a staging file (``pipeline.runtime.store_files``), with MLflow's own store class; MLflow then only
ever opens a complete store. MLflow's ``mlflow run`` CLI makes its store before our code runs:
``make run`` runs ``python -m pipeline create-store`` first.
"""

import mlflow
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from pipeline.errors import PipelineError
from pipeline.faults import unwritable_sqlite_store
from pipeline.runtime.store_files import create_if_new, creation_lock, is_new
from pipeline.tracking.experiments import experiment_named
from pipeline.tracking.owners import claim_launched_run

DEFAULT_ARTIFACT_ROOT = "./mlruns"  # where MLflow puts a sqlite store's artifacts unless told otherwise


def open_tracking_store() -> None:
    """What a command that records runs does once its settings are checked (so bad settings leave no
    store behind): refuse a store it cannot write, create it if new, claim the run that ``mlflow run``
    created for this process, and create the experiment its runs go to if new."""
    problem = unwritable_sqlite_store(mlflow.get_tracking_uri())
    if problem:
        raise PipelineError(problem)
    make_tracking_store_if_new()
    claim_launched_run()
    if MLFLOW_EXPERIMENT_NAME.get() and not MLFLOW_EXPERIMENT_ID.get():  # before several commands race to make it
        experiment_named(MLFLOW_EXPERIMENT_NAME.get())


def make_tracking_store_if_new() -> None:
    """Create the tracking store at ``mlflow.get_tracking_uri()`` if it is a new sqlite file."""
    uri = mlflow.get_tracking_uri()
    if not is_new(uri):
        return  # no lock to take (and no lock file left beside it) for a store that exists
    with creation_lock(uri):
        create_if_new(uri, lambda staging: SqlAlchemyStore(staging, DEFAULT_ARTIFACT_ROOT).engine.dispose())
