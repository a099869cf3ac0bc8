"""Logging a trained model: pt2 format, a signature, a name that says how it was trained."""

import functools
import hashlib
from importlib.metadata import version

import mlflow
import numpy as np
from mlflow.models import ModelSignature, infer_signature

from pipeline.config import DEFAULT_MODEL, IMAGE_SIZE, MODELS, NUM_CLASSES
from pipeline.core.splits import to_tensor
from pipeline.names import MODEL_ARTIFACT, MODEL_FAMILY_TAG, WEIGHTS_DIGEST_TAG


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
    """A logged model's name that says what it is and how it was trained, e.g. ``softmax-lr0_1-wd0-ep10`` or
    ``mlp-hiddenunits256-dropout0_2-lr0_1-wd0-ep10`` (a model's own settings unless 0).

    MLflow refuses '.', '/', ':' and quotes in LoggedModel names, so 0.1 is written 0_1. Such a model
    is found as ``models:/<model_id>`` or ``runs:/<run_id>/<name>``.
    """
    own = [(name, getattr(cfg, name)) for name in MODELS[cfg.model].settings]
    parts = [cfg.model, *(f"{name.replace('_', '')}{value:.3g}" for name, value in own if value)]
    parts += [f"lr{cfg.lr:.3g}", f"wd{cfg.weight_decay:.3g}", f"ep{cfg.epochs}"]  # the params hold every digit
    if cfg.input_dropout:
        parts.append(f"indrop{cfg.input_dropout:.3g}")
    if cfg.augment:
        parts.append("augment")
    if cfg.keep_last:
        parts.append("last")
    return "-".join(parts).replace(".", "_")


def weights_digest(model) -> str:
    """SHA-256 of the model's parameters and buffers, by name: the same weights, the same digest."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def log_model(model, example_images: np.ndarray, step: int, name: str = MODEL_ARTIFACT,
              family: str = DEFAULT_MODEL):
    """Log the model (pt2 format, exported with a real batch of images) and return its ModelInfo.

    The logged model is tagged with its family (``config.MODELS``) and the digest of its weights, which the
    registry reads (``pipeline.tracking.registry``).
    """
    example = to_tensor(example_images).numpy()
    return mlflow.pytorch.log_model(
        model, name=name, signature=model_signature(), input_example=example,
        pip_requirements=pip_requirements(), step=step,
        tags={MODEL_FAMILY_TAG: family, WEIGHTS_DIGEST_TAG: weights_digest(model)},
    )


def logged_model_id(model_uri: str) -> str | None:
    """The MLflow 3 LoggedModel id behind a model URI, so metrics can be linked to the model."""
    return mlflow.models.get_model_info(model_uri).model_id
