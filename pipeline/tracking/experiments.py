"""Which MLflow experiment the runs go to, and marking it as a model-training experiment.

Runs land in the project's experiment (``pipeline.names.EXPERIMENT_NAME``) unless the user names
another with MLflow's own ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME``. ``mlflow run`` creates its
run, in the experiment it was given, before our code starts and sets ``MLFLOW_EXPERIMENT_ID``: ``make
run`` passes ``--experiment-name``. MLflow 3's UI opens an experiment without a kind on its GenAI pages
(traces); the tag ``mlflow.experimentKind`` set to ``custom_model_development`` makes it open on the
training runs, and the links the commands print (``runs_url``) open the experiment's runs table itself.

Imports only MLflow: ``main`` runs it without PyTorch.
"""

import os
from urllib.parse import quote, urlencode

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Experiment
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.config import UiConfig
from pipeline.errors import PipelineError
from pipeline.names import EXPERIMENT_KIND_TAG, EXPERIMENT_NAME, STUDY_TAG, TRAINING_KIND, UI_WORKFLOW


def experiment_named(name: str) -> Experiment:
    """The MLflow experiment ``name``, created if new: commands started together may each find it missing,
    and the one that creates it second finds it made."""
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    return client.get_experiment_by_name(name)


def mark_as_training(experiment: Experiment) -> None:
    """Tag the experiment as model development, unless it already has a kind (the user's choice wins)."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def default_to_project_experiment() -> None:
    """Unless MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME name another, runs go to the project's experiment.

    Only the environment is set: MLflow creates the experiment at the first run (bad options open no
    store), and worker processes and steps launched from here inherit the choice.
    """
    experiment_id = MLFLOW_EXPERIMENT_ID.get()
    if experiment_id:
        try:
            MlflowClient().get_experiment(experiment_id)
        except MlflowException as e:
            raise PipelineError(f"cannot record runs in MLFLOW_EXPERIMENT_ID={experiment_id}: {e.message}; "
                                "name an existing or a new experiment with MLFLOW_EXPERIMENT_NAME instead")
    elif not MLFLOW_EXPERIMENT_NAME.get():
        os.environ[MLFLOW_EXPERIMENT_NAME.name] = EXPERIMENT_NAME


def mark_chosen_experiment() -> None:
    """Mark the experiment the command recorded in (if it has one by now) as model development."""
    experiment_id = MLFLOW_EXPERIMENT_ID.get()
    client = MlflowClient()
    experiment = (client.get_experiment(experiment_id) if experiment_id
                  else client.get_experiment_by_name(MLFLOW_EXPERIMENT_NAME.get()))
    if experiment is not None:
        mark_as_training(experiment)


def chosen_experiment() -> Experiment:
    """The experiment the command's runs go to (after ``default_to_project_experiment``), created if new."""
    experiment_id = MLFLOW_EXPERIMENT_ID.get()
    if experiment_id:
        return MlflowClient().get_experiment(experiment_id)
    return experiment_named(MLFLOW_EXPERIMENT_NAME.get() or EXPERIMENT_NAME)


def ui_address() -> str:
    """The MLflow UI that shows this store: the tracking server itself, else where ``make ui`` serves it."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    ui = UiConfig()
    return f"http://{ui.host}:{ui.port}"


def study_filter(study_name: str) -> str:
    """The runs search that shows a study's runs (its trials, its tune run, the main run that started it)."""
    return f"tags.{STUDY_TAG} = '{study_name}'"


def runs_url(experiment_id: str, study_name: str = "", ui: str = "") -> str:
    """The address of the experiment's runs table in the MLflow UI; with ``study_name``, of the study's runs,
    best validation accuracy first.

    The experiments list (``/#/experiments``) opens an experiment on MLflow 3's GenAI overview; this
    link opens the training runs, with the UI told the experiment is machine learning. The UI nests
    child runs (the trials) under their parent unless the table is sorted by something other than time."""
    query = {"workflowType": UI_WORKFLOW}
    if study_name:
        query.update(searchFilter=study_filter(study_name), orderByKey="metrics.`best_val_accuracy`",
                     orderByAsc="false")
    return f"{ui or ui_address()}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"
