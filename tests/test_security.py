"""Hostile models: a pickled model registered as champion is refused by evaluate and predict, unread.

The attack is real: a module whose unpickling runs a shell command (creating a marker file), logged with
MLflow's own API in its pickle format, registered in a real sqlite store under the champion alias. The
test first proves the model is hostile (plain ``mlflow.pytorch.load_model`` runs the command), then runs
the project's CLI on it in subprocesses and checks the marker never appears.
"""

import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline.names import CHAMPION, MODEL_NAME
from pipeline.support import safe_models
from pipeline.support.tracking import load_model
from tests.fault_helpers import error_line, run_cli, run_statuses

CHAMPION_URI = f"models:/{MODEL_NAME}@{CHAMPION}"


class Hostile(torch.nn.Module):
    """Pickles as a call to os.system: whoever unpickles it runs the command."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def forward(self, x):
        return x

    def __reduce__(self):
        return (os.system, (self.command,))


def register_as_champion(model_uri: str) -> None:
    version = mlflow.register_model(model_uri, MODEL_NAME).version
    MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION, version)


@pytest.fixture
def hostile_champion(mlflow_store, tmp_path):
    """A pickled model whose loading would create ``marker``, registered as champion; yields the marker."""
    marker = tmp_path / "pwned"
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(Hostile(f"touch {marker}"), name="model",
                                        serialization_format="pickle", pip_requirements=[])
    register_as_champion(info.model_uri)
    assert not marker.exists()
    return marker


@pytest.mark.slow
def test_the_hostile_model_really_runs_its_command_under_plain_mlflow(hostile_champion, subprocess_env):
    # The oracle that the attack is real: MLflow's own loader, with its defaults, runs the command.
    code = f"import mlflow\ntry:\n    mlflow.pytorch.load_model('{CHAMPION_URI}')\nexcept Exception:\n    pass"
    subprocess.run([sys.executable, "-c", code], env=subprocess_env, timeout=300, check=True)
    assert hostile_champion.exists()


@pytest.mark.slow
def test_evaluate_and_predict_refuse_the_hostile_champion_without_running_it(hostile_champion, subprocess_env,
                                                                             mlflow_store, real_slice):
    prepared = str(real_slice[1])
    for args in (["evaluate", "--model-uri", CHAMPION_URI, "--data", prepared],
                 ["predict", "--model-uri", CHAMPION_URI, "--data", prepared, "--test", "3"]):
        done = run_cli(subprocess_env, *args)
        assert done.returncode == 1, done.stderr
        line = error_line(done)
        assert "refusing to load model" in line and "model.pth" in line and "pt2" in line
        assert not hostile_champion.exists(), f"{args[0]} ran the model's command"
    # Nothing was left behind as a run: evaluate refuses before opening one, predict never opens one;
    # the only run is the one that logged the hostile model.
    assert sum(len(statuses) for statuses in run_statuses(mlflow_store).values()) == 1


def test_refused_even_with_pickle_allowed_in_the_environment(hostile_champion, monkeypatch):
    # The user's environment cannot switch the check off: the folder is refused before MLflow sees it.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(safe_models.PipelineError, match="refusing.*model.pth"):
        load_model(CHAMPION_URI)
    assert not hostile_champion.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"  # restored after the load


def test_a_model_folder_shipping_code_is_refused(mlflow_store, tmp_path):
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "model.pt2").write_bytes(b"not read")
    (folder / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    code: code\n")
    with pytest.raises(safe_models.PipelineError, match="ships its own code"):
        load_model(str(folder))


def test_the_projects_own_model_still_loads_with_pickle_disallowed(mlflow_store, real_slice):
    from pipeline.config import TrainConfig
    from pipeline.steps.train import train

    with mlflow.start_run():
        result, info = train(TrainConfig(epochs=1), real_slice[0], progress=False)
    loaded = load_model(info.model_uri)  # goes through MLflow's check that the pt2 archive holds no pickle
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), result.model(x))
