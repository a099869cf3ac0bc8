"""MLflow helpers shared by the steps: models, datasets, metrics, params and fetching the prepared data.

MLflow's defaults are used throughout (tracking store ``sqlite:///mlflow.db``, artifacts in
``./mlruns``), overridable with the usual ``MLFLOW_TRACKING_URI`` (e.g. ``http://host:5000``, a
tracking server that also serves the artifacts: nothing here assumes a local store or local artifact
paths; every artifact and model is fetched through MLflow's artifact API).
"""

import functools
import tempfile
import time
import warnings
import weakref
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
from pipeline.tracking.safe_loading import load_own_model


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


def model_name(cfg) -> str:
    """A logged model's name that says how it was trained, e.g. ``softmax-lr0_1-wd0-ep10``.

    MLflow refuses '.', '/', ':' and quotes in LoggedModel names, so 0.1 is written 0_1. Such a model
    is found as ``models:/<model_id>`` or ``runs:/<run_id>/<name>``.
    """
    parts = [f"lr{cfg.lr:.3g}", f"wd{cfg.weight_decay:.3g}", f"ep{cfg.epochs}"]  # the params hold every digit
    if cfg.input_dropout:
        parts.append(f"dropout{cfg.input_dropout:.3g}")
    if cfg.augment:
        parts.append("augment")
    return "-".join(["softmax", *parts]).replace(".", "_")


def log_model(model, example_images: np.ndarray, step: int, name: str = MODEL_ARTIFACT):
    """Log the model (pt2 format, exported with a real batch of images) and return its ModelInfo."""
    example = to_tensor(example_images).numpy()
    return mlflow.pytorch.log_model(
        model, name=name, signature=model_signature(), input_example=example,
        pip_requirements=pip_requirements(), step=step,
    )


def log_epoch(metrics: dict, synchronous: bool = True, run_id: str | None = None) -> None:
    """One batched call per epoch, the epoch number as the step; to the active run unless ``run_id``.

    Straight to the client's ``log_batch``: ``mlflow.log_metrics(run_id=...)`` first reads the whole run
    back (to link metrics to the run's logged models, which a run has none of while it trains), and that
    read cost as much as the write (~7 ms for each trial's epoch when trials train side by side).
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


_datasets: dict[int, tuple[weakref.ref, dict]] = {}  # id(splits) -> (the splits, their MLflow datasets)


def datasets_of(splits: Splits, source: str) -> dict:
    """The three splits as MLflow datasets, made once per Splits object in this process.

    The digest reads every byte (0.13 s for the training split), so every trial of a study reuses it.
    MLflow keeps one dataset per name and digest in an experiment: the first source recorded stays.
    """
    cached = _datasets.get(id(splits))
    if cached is None or cached[0]() is not splits:
        made = {}
        for split in SPLITS:
            x, y = splits.arrays(split)
            with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
                warnings.filterwarnings("ignore", message="The specified dataset source")
                made[split] = mlflow.data.from_numpy(x, targets=y, source=source, name=f"fashion-mnist-{split}",
                                                     digest=array_digest(x, y))
        cached = _datasets[id(splits)] = (weakref.ref(splits), made)
    return cached[1]


def log_datasets(splits: Splits, source: str = "prepared splits", which=SPLITS) -> None:
    """Record the splits (all three, or ``which``) as MLflow dataset inputs of the active run."""
    datasets = datasets_of(splits, source)
    for split in which:
        mlflow.log_input(datasets[split], context=DATASET_CONTEXTS[split])


def fetch_prepared(data_uri: str) -> Splits:
    """Load the prepared splits from a local path or any MLflow artifact URI (runs:/<id>/prepared).

    An artifact is downloaded into a temporary folder that is deleted once its arrays are in memory
    (``Splits.load`` reads them eagerly): every step reads the 55 MB split, and none keeps a copy.
    """
    if Path(data_uri).exists():
        splits = Splits.load(Path(data_uri))
        datasets_of(splits, str(Path(data_uri).resolve()))  # the datasets' source, for the runs that use them
        return splits
    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:  # the arrays are in memory once loaded
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=data_uri, dst_path=tmp)
        except Exception as e:
            raise PipelineError(
                f"cannot fetch the prepared data from '{data_uri}' ({type(e).__name__}: {e}); pass the "
                "prepare run's artifact URI (runs:/<run_id>/prepared) or a local prepared folder"
            )
        splits = Splits.load(Path(local))
    datasets_of(splits, f"prepared splits: {data_uri}")  # MLflow has no dataset source type for runs:/ URIs
    return splits


def load_data(data_uri: str) -> Splits:
    """The prepared splits named by ``data_uri``; with none given, prepare the default ones here.

    The datasets are logged to the active run; without one (``predict``) nothing is logged, since
    ``mlflow.log_input`` would otherwise start a stray run of its own.
    """
    if data_uri:
        return fetch_prepared(data_uri)
    splits = prepare_splits(DataConfig())[0]
    if mlflow.active_run() is not None:
        log_datasets(splits, "prepared in this run with the default settings")
    return splits


def load_model(model_uri: str):
    """Load a model the project logged, from runs:/..., models:/name@alias, models:/<model_id> or a path.

    Anything not in the project's own pt2 format is refused before it is read (``safe_models``).
    """
    return load_own_model(model_uri)


def logged_model_id(model_uri: str) -> str | None:
    """The MLflow 3 LoggedModel id behind a model URI, so metrics can be linked to the model."""
    return mlflow.models.get_model_info(model_uri).model_id
