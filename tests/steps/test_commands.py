"""Commands the README gives, run as written from a shell without the venv on PATH."""

import json
import urllib.request

import mlflow
import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import array_digest
from pipeline.names import CHAMPION, MODEL_NAME
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.training import train
from tests.helpers import free_port, make, stop_process_group, wait_for_url

FRESH_SHELL_PATH = "/usr/local/bin:/usr/bin:/bin"  # no venv: `uvicorn`, `mlflow` are not found here


@pytest.mark.slow
def test_make_serve_answers_from_a_fresh_shell(mlflow_store, data_slice, subprocess_env):
    splits = data_slice[0]
    with mlflow.start_run():
        result, info = train(TrainConfig(epochs=2), splits, progress=False)
    promote_if_better(info.model_uri, result.best_val_accuracy, array_digest(splits.val_x, splits.val_y),
                      default_split=True)
    env = {**subprocess_env, "PATH": FRESH_SHELL_PATH}
    port = free_port()
    server = make("serve", env, SERVE_PORT=port)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/ping", server, server.stdout.read)
        images = (splits.test_x[:16] / 255.0).astype(np.float32)[:, None]  # (N, 1, 28, 28) in [0, 1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        served = np.asarray(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
        expected = predict_logits(result.model, splits.test_x[:16]).numpy()
        np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
    finally:
        stop_process_group(server)
    assert f"models:/{MODEL_NAME}@{CHAMPION}" in server.stdout.read()  # it served the champion
