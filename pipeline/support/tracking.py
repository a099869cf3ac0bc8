"""MLflow helpers shared by the steps: models, datasets, metrics, params and fetching the prepared data.

MLflow's defaults are used throughout (tracking store ``sqlite:///mlflow.db``, artifacts in
``./mlruns``), overridable with the usual ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``.
"""

import functools
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.models import ModelSignature, infer_signature

from pipeline.config import IMAGE_SIZE, NUM_CLASSES, DataConfig
from pipeline.core.splits import SPLITS, Splits, array_digest, prepare_splits, to_tensor
from pipeline.errors import PipelineError
from pipeline.names import DATASET_CONTEXTS, MODEL_ARTIFACT


@functools.cache
def model_signature() -> ModelSignature:
    # Computed once per process: a float batch of images in, one logit per class out.
    example_in = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    example_out = np.zeros((2, NUM_CLASSES), dtype=np.float32)
    return infer_signature(example_in, example_out)


@functools.cache
def pip_requirements() -> list[str]:
    # Passing these explicitly skips MLflow's requirement inference, which costs seconds per model.
    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "torch", "torchvision", "numpy")]


def log_model(model, example_images: np.ndarray, step: int):
    """Log the model (pt2 format, exported with a real batch of images) and return its ModelInfo."""
    example = to_tensor(example_images).numpy()
    return mlflow.pytorch.log_model(
        model, name=MODEL_ARTIFACT, signature=model_signature(), input_example=example,
        pip_requirements=pip_requirements(), step=step,
    )


def log_epoch(metrics: dict, synchronous: bool = True, run_id: str | None = None) -> None:
    """One batched call per epoch, the epoch number as the step; to the active run unless ``run_id``."""
    step = metrics["epoch"]
    mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step, synchronous=synchronous,
                       run_id=run_id)


def log_series(table: pd.DataFrame, steps) -> None:
    """Every column of ``table`` as a metric curve over ``steps``, in one call (MLflow batches it).

    One ``log_metrics`` call per step would cost a database round trip each (seconds for 100 steps).
    """
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step))
               for key in table.columns for value, step in zip(table[key], steps)]
    MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def log_datasets(splits: Splits, source: str) -> None:
    """Record the three splits as MLflow dataset inputs, with a digest over the full arrays."""
    for split in SPLITS:
        x, y = splits.arrays(split)
        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_numpy(
                x, targets=y, source=source, name=f"fashion-mnist-{split}", digest=array_digest(x, y)
            )
        mlflow.log_input(dataset, context=DATASET_CONTEXTS[split])


def fetch_prepared(data_uri: str) -> Splits:
    """Load the prepared splits from a local path or any MLflow artifact URI (runs:/<id>/prepared)."""
    if Path(data_uri).exists():
        return Splits.load(Path(data_uri))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=data_uri, dst_path=tempfile.mkdtemp())
    except Exception as e:
        raise PipelineError(
            f"cannot fetch the prepared data from '{data_uri}' ({type(e).__name__}: {e}); pass the "
            "prepare run's artifact URI (runs:/<run_id>/prepared) or a local prepared folder"
        )
    return Splits.load(Path(local))


def load_data(data_uri: str) -> Splits:
    """The prepared splits named by ``data_uri``; with none given, prepare the default ones here."""
    if data_uri:
        return fetch_prepared(data_uri)
    splits = prepare_splits(DataConfig())[0]
    log_datasets(splits, "prepared in this run with the default settings")
    return splits


def load_model(model_uri: str):
    """Load a logged model from runs:/..., models:/name@alias, models:/<model_id> or a path."""
    try:
        return mlflow.pytorch.load_model(model_uri)
    except Exception as e:  # MLflow raises many types for a bad URI: not found, bad scheme, ...
        raise PipelineError(
            f"cannot load model '{model_uri}' ({type(e).__name__}: {e}); use runs:/<run_id>/model, "
            "models:/<name>@<alias>, models:/<name>/<version> or models:/<model_id>"
        )


def logged_model_id(model_uri: str) -> str | None:
    """The MLflow 3 LoggedModel id behind a model URI, so metrics can be linked to the model."""
    return mlflow.models.get_model_info(model_uri).model_id


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
