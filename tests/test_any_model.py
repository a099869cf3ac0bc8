"""Any model through the whole pipeline: the model is a setting (``config.MODELS``, ``core/models.py``).

A model defined here, in the test (a small convolutional network, which the project has never heard of), is
trained by ``train`` and ``tune`` (in this process: the builder lives here), then tested by ``evaluate``,
asked by ``predict`` and served by ``serve`` in other processes, which never see its code: a logged model is
a pt2 archive. Then the MLP of d2l §4.3 as the project ships it: its settings searched, trained one trial at
a time, registered beside the softmax regression, refused where it does not belong.
"""

import json
import re
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline import config
from pipeline.config import MODELS, ModelChoice, TrainConfig
from pipeline.core import models
from pipeline.core.models import BUILDERS, build_model, builder, parameter_count
from pipeline.core.splits import array_digest
from pipeline.errors import PipelineError
from pipeline.names import CHAMPION, PARAMETER_COUNT, REGISTERED_MODEL, SPLIT_CHAMPION, STUDY_MODEL_ATTR
from pipeline.steps.convex_optimum import load_study as convex_study
from pipeline.study_config import ConvexConfig, TuneConfig
from pipeline.tracking.safe_loading import load_model
from tests.fault_helpers import error_line, run_cli, run_in_process
from tests.helpers import free_port, stop_process_group, wait_for_url


@pytest.fixture
def tiny_cnn(monkeypatch):
    """A model added the way docs/models.md says: one builder function and one line in MODELS."""
    monkeypatch.setitem(BUILDERS, "tiny_cnn", None)  # the test's model is gone again after the test

    @builder
    def tiny_cnn(cfg: TrainConfig) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))

    monkeypatch.setitem(MODELS, "tiny_cnn", ModelChoice("tiny CNN"))
    return "tiny_cnn"


def test_every_model_has_a_builder_and_the_mlp_is_the_books():
    assert set(MODELS) == set(BUILDERS) and config.DEFAULT_MODEL == "softmax"
    mlp = build_model(TrainConfig(model="mlp"))
    layers = [type(m) for m in mlp]
    assert layers == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp[1].in_features, mlp[1].out_features, mlp[4].out_features) == (784, 256, 10)
    assert parameter_count(mlp) == 784 * 256 + 256 + 256 * 10 + 10
    assert parameter_count(build_model(TrainConfig())) == 7850
    assert 0.0095 < mlp[1].weight.std().item() < 0.0105  # N(0, 0.01^2), as the book initialises it
    torch.testing.assert_close(mlp[1].weight, build_model(TrainConfig(model="mlp"))[1].weight)  # seeded


def test_a_setting_of_another_model_is_refused_not_ignored():
    with pytest.raises(ValueError, match="hidden_units is a setting of model mlp; model softmax has none"):
        TrainConfig(hidden_units=64).validate()
    with pytest.raises(ValueError, match="model mlp has no stacked training"):
        TuneConfig(model="mlp", side_by_side=4).validate()
    assert TuneConfig(model="mlp").resolved().side_by_side == 1
    assert TuneConfig().resolved().side_by_side == MODELS["softmax"].side_by_side > 1
    assert TuneConfig(model="mlp").resolved().study_name == "fashion-mnist-mlp"
    assert models.__doc__ and "docs/models.md" in models.__doc__


def digest_of(splits) -> str:
    return array_digest(splits.val_x, splits.val_y)


@pytest.mark.slow
def test_a_model_defined_in_a_test_goes_through_the_whole_pipeline(tiny_cnn, data_slice, subprocess_env, tmp_path):
    splits, data = data_slice
    trained = run_in_process("train", "--model", tiny_cnn, "--data", data, "--epochs", "2", "--lr", "0.05")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_id = re.search(r"runs:/(\w+)/", trained.stdout).group(1)
    params = mlflow.get_run(run_id).data.params
    assert params["model"] == tiny_cnn and int(params[PARAMETER_COUNT]) == 40 + 4 * 26 * 26 * 10 + 10
    assert "hidden_units" not in params  # another model's setting: it did not act, so it is not logged

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tuned = run_in_process("tune", "--model", tiny_cnn, "--data", data, "--trials", "2", "--storage", storage,
                           "--epochs-low", "1", "--epochs-high", "2", "--pruner", "none")
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert "model tiny_cnn (tiny CNN): one trial at a time" in tuned.stdout
    study = optuna.load_study(study_name="fashion-mnist-tiny_cnn", storage=storage)
    assert len(study.trials) == 2 and study.user_attrs[STUDY_MODEL_ATTR] == tiny_cnn
    name = REGISTERED_MODEL.format(tiny_cnn)
    uri = f"models:/{name}@{SPLIT_CHAMPION.format(digest_of(splits))}"
    assert MlflowClient().get_model_version_by_alias(name, SPLIT_CHAMPION.format(digest_of(splits))).tags[
        "model"] == tiny_cnn

    # the other commands run in processes that never saw the model's code
    evaluated = run_cli(subprocess_env, "evaluate", "--model-uri", uri, "--data", data)
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = re.search(r"test accuracy (0\.\d+) .* on 2000 images", evaluated.stdout)
    assert accuracy and float(accuracy.group(1)) > 0.2, evaluated.stdout  # it learnt: chance is 0.1
    predicted = run_cli(subprocess_env, "predict", "--model-uri", uri, "--data", data, "--test", "3")
    assert predicted.returncode == 0 and len(predicted.stdout.strip().splitlines()) == 3, predicted.stderr

    url, log = f"http://127.0.0.1:{free_port()}", tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model-uri", uri, "--port",
                                   url.rsplit(":", 1)[1]], env=subprocess_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for_url(f"{url}/ping", server, log.read_text)
        images = (splits.test_x[:4] / 255.0).astype(np.float32)[:, None]
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = np.asarray(json.loads(answer.read())["predictions"])
    finally:
        stop_process_group(server)
    with torch.no_grad():
        expected = load_model(uri)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert f"model {tiny_cnn}" in log.read_text()  # the server names the model it serves


@pytest.mark.slow
def test_the_mlp_is_tuned_one_at_a_time_and_registered_beside_the_softmax_regression(data_slice, subprocess_env,
                                                                                      tmp_path):
    splits, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--data", data, "--storage", storage, "--epochs-low", "1", "--epochs-high", "2", "--pruner", "none"]
    softmax = run_in_process("tune", "--trials", "2", *common)
    assert softmax.returncode == 0 and "trials side by side" in softmax.stdout, softmax.stdout + softmax.stderr
    mlp = run_in_process("tune", "--model", "mlp", "--trials", "3", "--hidden-units-high", "64", *common)
    assert mlp.returncode == 0, mlp.stdout + mlp.stderr
    assert "model mlp (MLP): one trial at a time in each worker (it has no stacked training)" in mlp.stdout

    study = optuna.load_study(study_name="fashion-mnist-mlp", storage=storage)
    for trial in study.trials:  # its own settings are searched, within the space given
        assert {"hidden_units", "dropout"} <= set(trial.params) and 32 <= trial.params["hidden_units"] <= 64
    # the seed trial: the book's MLP (256 hidden units, no dropout), its width held within the space
    assert study.trials[0].params["hidden_units"] == 64 and study.trials[0].params["dropout"] == 0
    alias = SPLIT_CHAMPION.format(digest_of(splits))
    for family in ("softmax", "mlp"):
        held = MlflowClient().get_model_version_by_alias(REGISTERED_MODEL.format(family), alias)
        assert held.tags["model"] == family
    best_run = mlflow.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    assert best_run.data.params["model"] == "mlp"
    assert int(best_run.data.params[PARAMETER_COUNT]) == parameter_count(build_model(TrainConfig(
        model="mlp", hidden_units=study.best_trial.params["hidden_units"])))
    assert CHAMPION not in MlflowClient().get_registered_model(REGISTERED_MODEL.format("mlp")).aliases

    # a study of the softmax regression resumed for another model: refused, its trials are not comparable
    line = error_line(run_cli(subprocess_env, "tune", "--model", "mlp", "--study-name",
                              "fashion-mnist-softmax", "--trials", "3", *common))
    assert "was run on other data or another model" in line


def test_the_convex_optimum_is_offered_for_the_softmax_regression_only(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="mlp-study", storage=storage, direction="maximize")
    study.set_user_attr(STUDY_MODEL_ATTR, "mlp")
    study.add_trial(optuna.trial.create_trial(value=0.8, params={}, distributions={},
                                              user_attrs={"model_uri": "models:/m-1"}))
    with pytest.raises(PipelineError, match="tunes model mlp; the convex optimum exists for the softmax regression "
                                            "only"):
        convex_study(ConvexConfig(study_name="mlp-study", study_storage=storage))
