"""Which MLflow experiment the runs go to, and marking it as a model-training experiment.

Runs land in the project's experiment (``pipeline.names.EXPERIMENT_NAME``) unless the user names
another with MLflow's own ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME`` (``mlflow run`` sets
``MLFLOW_EXPERIMENT_ID`` for its run: ``make run`` passes ``--experiment-name``). MLflow 3's UI opens an
experiment without a kind on its GenAI pages (traces); the tag ``mlflow.experimentKind`` set to
``custom_model_development`` makes it open on the training runs.

Imports only MLflow: ``main`` runs it without PyTorch.
"""

import functools

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Experiment
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.names import EXPERIMENT_KIND_TAG, EXPERIMENT_NAME, TRAINING_KIND


def mark_as_training(experiment: Experiment) -> None:
    """Tag the experiment as model development, unless it already has a kind (the user's choice wins)."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def use_project_experiment() -> Experiment:
    """Make the experiment this process records in the active one (created if needed), marked as training.

    ``mlflow.set_experiment`` also exports ``MLFLOW_EXPERIMENT_ID``, so worker processes and steps
    launched from here record in the same experiment.
    """
    experiment_id, name = MLFLOW_EXPERIMENT_ID.get(), MLFLOW_EXPERIMENT_NAME.get()
    try:
        if experiment_id:
            experiment = mlflow.set_experiment(experiment_id=experiment_id)
        else:
            experiment = mlflow.set_experiment(name or EXPERIMENT_NAME)
    except MlflowException as e:  # no such id, or the experiment was deleted
        chosen = f"MLFLOW_EXPERIMENT_ID={experiment_id}" if experiment_id else f"experiment '{name or EXPERIMENT_NAME}'"
        raise PipelineError(f"cannot record runs in {chosen}: {e.message}; name an existing or new experiment "
                            "with MLFLOW_EXPERIMENT_NAME, or restore it (mlflow experiments restore)")
    mark_as_training(experiment)
    return experiment


def records_in_project_experiment(callback):
    """Wrap a command's callback: choose and mark the experiment once the options are parsed."""
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        use_project_experiment()
        return callback(*args, **kwargs)

    wrapper.records_runs = True
    return wrapper
