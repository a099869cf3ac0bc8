"""The scoring server (``serve``, what ``make serve`` runs): MLflow's protocol, for images only.

A real server on 127.0.0.1, on a free port, started and stopped by the test, serves the champion trained on
a slice of the real data. Real test images get the logits of the same model loaded in-process; pixels
that are NaN, infinite, beyond float32's range or on the 0-255 scale, and batches of the wrong shape, get
HTTP 400 with a short message, never predictions.
"""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.core.splits import array_digest
from pipeline.names import CHAMPION, MODEL_NAME
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.safe_loading import load_model
from pipeline.tracking.training import train
from tests.helpers import free_port, stop_process_group, wait_for_url

CHAMPION_URI = f"models:/{MODEL_NAME}@{CHAMPION}"
SHORT = 300  # characters: a message a person reads, not the request echoed back


@pytest.fixture
def server(mlflow_store, data_slice, subprocess_env, tmp_path):
    """The champion served by the CLI on a free port; yields the server's URL."""
    splits = data_slice[0]
    with mlflow.start_run():
        result, info = train(TrainConfig(epochs=2), splits, progress=False)
    promote_if_better(info.model_uri, result.best_val_accuracy, array_digest(splits.val_x, splits.val_y),
                      default_split=True)
    url, log = f"http://127.0.0.1:{free_port()}", tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model-uri", CHAMPION_URI,
                                    "--port", url.rsplit(":", 1)[1]],
                                   env=subprocess_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_url(f"{url}/ping", process, log.read_text)
    yield url
    stop_process_group(process)


def ask(url: str, body: str) -> tuple[int, dict]:
    """POST ``body`` (JSON text) to /invocations: the HTTP status and the JSON answer."""
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refusal:
        return refusal.code, json.loads(refusal.read())


@pytest.mark.slow
def test_the_server_answers_images_like_the_model_and_refuses_bad_ones_in_a_line(server, data_slice):
    images = (data_slice[0].test_x[:8] / 255.0).astype(np.float32)[:, None]  # (N, 1, 28, 28) in [0, 1]
    status, answer = ask(server, json.dumps({"inputs": images.tolist()}))
    assert status == 200
    with torch.no_grad():
        expected = load_model(CHAMPION_URI)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-5, atol=1e-6)
    assert ask(server, json.dumps({"instances": images[:1].tolist()}))[0] == 200  # MLflow's other format

    def with_pixel(value) -> str:  # one pixel replaced, as JSON text (NaN, Infinity: Python's json writes them)
        bad = images.astype(np.float64)
        bad[3, 0, 14, 14] = value
        return json.dumps({"inputs": bad.tolist()})

    refused = {
        "NaN": (with_pixel(float("nan")), "finite"),
        "inf": (with_pixel(float("inf")), "finite"),
        "-inf": (with_pixel(float("-inf")), "finite"),
        "1e39": (with_pixel(1e39), "finite"),
        "0-255 pixels": (json.dumps({"inputs": (images * 255).tolist()}), "divide 0-255 pixels by 255"),
        "negative": (with_pixel(-0.5), "pixels must lie in [0, 1]"),
        "flat": (json.dumps({"inputs": images.reshape(8, 784).tolist()}), "got (8, 784)"),
        "no channel": (json.dumps({"inputs": images[:, 0].tolist()}), "got (8, 28, 28)"),
        "one image": (json.dumps({"inputs": images[0].tolist()}), "got (1, 28, 28)"),
    }
    for name, (body, reason) in refused.items():
        status, answer = ask(server, body)
        assert status == 400 and "predictions" not in answer, name
        assert reason in answer["message"] and len(answer["message"]) < SHORT, (name, answer["message"][:SHORT])
    with urllib.request.urlopen(f"{server}/health", timeout=10) as health:  # still up
        assert health.status == 200
