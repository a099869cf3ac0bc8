"""Command ``serve``: a model the project logged, over HTTP, with MLflow's scoring-server protocol.

``mlflow models serve`` loads a model through its ``python_function`` flavor, which imports the module that
flavor names (from the model's own ``code`` folder, if it ships one), and it answers whatever the model
accepts: NaN, infinite or 0-255 pixels get HTTP 200 and predictions that mean nothing. Here the model is
loaded by the project's own loader (``pipeline.tracking.safe_loading``: its folder checked before anything
in it is read)
and handed to MLflow's own scoring server (``mlflow.pyfunc.scoring_server``: ``/ping``, ``/health``,
``/version``, ``/invocations``, the same JSON in and out), behind a ``predict`` that answers HTTP 400 to
anything but a batch of images: float (N, 1, 28, 28), finite, within [0, 1].
"""

import json

import click
import mlflow
import numpy as np
import torch
import uvicorn
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import scoring_server

from pipeline.config import IMAGE_SIZE, ModelInput, ServeConfig
from pipeline.runtime.signals import interrupts_raise_keyboard_interrupt
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.registry import described_version
from pipeline.tracking.safe_loading import checked_copy, load_checked

IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
INPUT_FORM = 'send {"inputs": images}, images a list of N nested lists shaped (1, 28, 28)'


class RefusedInput(MlflowException):
    """Input the model must not score: HTTP 400 with this message alone.

    MLflow's server puts the whole input in front of the message of an error raised by ``predict``
    (several kilobytes of numbers for one image): the answer sent is built from the message as raised.
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def checked_images(data) -> np.ndarray:
    """The request's images as float32 (N, 1, 28, 28); RefusedInput, with a short reason, for anything else."""
    if not isinstance(data, np.ndarray):
        raise RefusedInput(f"the input is a {type(data).__name__}, not an array of images; {INPUT_FORM}")
    if data.ndim != 4 or data.shape[1:] != IMAGE_SHAPE or len(data) == 0:
        raise RefusedInput(f"images must be shaped (N, 1, 28, 28), got {data.shape}; {INPUT_FORM}")
    if data.dtype == bool or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise RefusedInput(f"pixels must be real numbers in [0, 1], got {data.dtype}")
    with np.errstate(over="ignore"):  # a number beyond float32's range becomes inf, refused below
        images = data.astype(np.float32)
    if not np.isfinite(images).all():
        raise RefusedInput("pixels must be finite numbers in [0, 1]; the input holds NaN, infinity or a number "
                           "beyond float32's range")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        hint = "; divide 0-255 pixels by 255" if high > 1 else ""
        raise RefusedInput(f"pixels must lie in [0, 1], got values from {low:g} to {high:g}{hint}")
    return images


class ServedModel:
    """What MLflow's scoring server calls: ``metadata`` (the model's MLmodel, whose signature tells the
    server how to read JSON input) and ``predict`` (one row of 10 logits per image)."""

    def __init__(self, model: torch.nn.Module, metadata: mlflow.models.Model):
        self.model, self.metadata = model, metadata

    def predict(self, data) -> np.ndarray:
        images = torch.from_numpy(checked_images(data))
        with torch.no_grad():
            return self.model(images).numpy()


def load_served_model(model_uri: str) -> ServedModel:
    """The model at ``model_uri``, checked and loaded by the project's loader, with its MLmodel."""
    with checked_copy(model_uri) as folder:
        return ServedModel(load_checked(folder, model_uri), mlflow.models.Model.load(str(folder)))


@click.command("serve")
@options_from(ModelInput, ServeConfig)
def serve_command(model_uri, **options):
    """Input is refused with HTTP 400 unless it is float images (N, 1, 28, 28), finite, within [0, 1]."""
    cfg = make_config(ServeConfig, options)
    app = scoring_server.init(load_served_model(model_uri))
    held = described_version(model_uri)  # the champion names the model it holds
    click.echo(f"Serving {model_uri}{f' ({held})' if held else ''} on http://{cfg.host}:{cfg.port} "
               "(POST /invocations, GET /ping); Ctrl-C stops it", err=True)
    try:  # uvicorn stops at Ctrl-C or SIGTERM, then passes the signal on: both end the command quietly
        with interrupts_raise_keyboard_interrupt():
            uvicorn.run(app, host=cfg.host, port=cfg.port)
    except KeyboardInterrupt:
        pass
