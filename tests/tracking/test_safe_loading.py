"""Hostile models and model URIs: refused by every command that loads a model, before anything is read.

The attacks are real, in a real sqlite store under the champion alias: a module whose unpickling runs a
shell command, logged with MLflow's own API in its pickle format; and a model saved by MLflow in the
project's own format whose ``python_function`` flavor then names a loader module the model ships in its
``code`` folder (what ``mlflow models serve`` imports). Each creates a marker file when MLflow loads it.
The tests first prove a model is hostile (MLflow's own loader creates the marker), then run the project's
commands on it in subprocesses and check the marker never appears. System folders (``/usr/lib``,
``../../etc``) given as a model, directly or as a registered version's source, are refused before a byte
of them is copied.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.config import TrainConfig
from pipeline.core.models import build_model
from pipeline.names import CHAMPION, MODEL_NAME
from pipeline.tracking import safe_loading
from pipeline.tracking.logged_models import model_signature
from pipeline.tracking.safe_loading import load_model
from tests.fault_helpers import error_line, run_cli, run_in_process, run_statuses
from tests.helpers import free_port, make, stop_process_group

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
    env = {**subprocess_env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}  # MLflow's default
    subprocess.run([sys.executable, "-c", code], env=env, timeout=300, check=True)
    assert hostile_champion.exists()


@pytest.mark.slow
def test_evaluate_and_predict_refuse_the_hostile_champion_without_running_it(hostile_champion, subprocess_env,
                                                                             mlflow_store, data_slice):
    prepared = str(data_slice[1])
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
    with pytest.raises(safe_loading.PipelineError, match="refusing.*model.pth"):
        load_model(CHAMPION_URI)
    assert not hostile_champion.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"  # the library leaves the environment alone


def test_a_model_folder_shipping_code_is_refused(mlflow_store, tmp_path):
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "model.pt2").write_bytes(b"not read")
    (folder / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    code: code\n")
    with pytest.raises(safe_loading.PipelineError, match="ships its own code"):
        load_model(str(folder))


def test_the_projects_own_model_still_loads_with_pickle_disallowed(mlflow_store, data_slice):
    from pipeline.config import TrainConfig
    from pipeline.tracking.training import train

    with mlflow.start_run():
        result, info = train(TrainConfig(epochs=1), data_slice[0], progress=False)
    loaded = load_model(info.model_uri)  # goes through MLflow's check that the pt2 archive holds no pickle
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), result.model(x))


@pytest.mark.slow
def test_mlflows_check_is_on_in_every_command_and_never_skipped(mlflow_store, data_slice, subprocess_env,
                                                                monkeypatch):
    """MLflow reads its switch from the environment only: each command sets it at its start, whatever the
    user's environment says; a library caller that left the check off is refused, never loaded unchecked."""
    from pipeline.config import TrainConfig
    from pipeline.tracking.training import train

    with mlflow.start_run():
        _, info = train(TrainConfig(epochs=1), data_slice[0], progress=False)
    env = {**subprocess_env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    done = run_cli(env, "predict", "--model-uri", info.model_uri, "--data", str(data_slice[1]), "--test", "2")
    assert done.returncode == 0 and done.stdout.count("test[") == 2, done.stderr[-3000:]

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(safe_loading.PipelineError, match="check of its archive switched off"):
        load_model(info.model_uri)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"


# ---------------------------------------------------------------------------------------------------
# A model that ships the module MLflow's python_function loader imports


def save_our_model(folder: Path) -> Path:
    """A model saved by MLflow exactly as ``tracking.log_model`` logs one (pt2, our signature)."""
    mlflow.pytorch.save_model(build_model(TrainConfig()), str(folder), signature=model_signature(),
                              input_example=np.zeros((2, 1, 28, 28), np.float32), pip_requirements=[])
    return folder


def ship_loader_module(folder: Path, marker: Path) -> None:
    """Point the model's python_function flavor at a module in its own code/ folder, which creates
    ``marker`` when imported; the pytorch flavor and data/ stay as MLflow wrote them."""
    (folder / "code").mkdir()
    (folder / "code" / "hostile_loader.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    meta = mlflow.models.Model.load(str(folder))
    meta.flavors["python_function"].update(loader_module="hostile_loader", code="code")
    meta.save(str(folder / "MLmodel"))


@pytest.fixture
def code_shipping_champion(mlflow_store, tmp_path):
    """A model whose python_function flavor imports a module it ships (creating ``marker``), registered
    as champion; yields the marker."""
    marker, folder = tmp_path / "pwned-by-code", save_our_model(tmp_path / "hostile")
    ship_loader_module(folder, marker)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "model")
    register_as_champion(f"runs:/{run.info.run_id}/model")
    assert not marker.exists()
    return marker


@pytest.mark.slow
def test_the_code_shipping_model_really_runs_its_code_under_plain_mlflow(code_shipping_champion, subprocess_env):
    # The oracle that the attack is real: MLflow's python_function loader (what `mlflow models serve` uses)
    # imports the shipped module, with pickle deserialization switched off.
    code = f"import mlflow\ntry:\n    mlflow.pyfunc.load_model('{CHAMPION_URI}')\nexcept Exception:\n    pass"
    env = {**subprocess_env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=300, check=True)
    assert code_shipping_champion.exists()


def wait_for_exit(process: subprocess.Popen, seconds: float = 240) -> str:
    """The output of a process expected to stop by itself; one still running is stopped, and fails."""
    try:
        output, _ = process.communicate(timeout=seconds)
        return output
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        pytest.fail(f"still running after {seconds} s (serving?):\n{process.stdout.read()[-3000:]}")


@pytest.mark.slow
def test_serve_evaluate_and_predict_refuse_the_code_shipping_champion(code_shipping_champion, subprocess_env,
                                                                      mlflow_store, data_slice):
    served = make("serve", subprocess_env, SERVE_PORT=free_port())  # the champion, as `make serve` serves it
    output = wait_for_exit(served)
    assert served.returncode != 0 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "refusing to load model" in errors[0] and "'code'" in errors[0], output
    assert not code_shipping_champion.exists(), "make serve ran the model's code"
    prepared = str(data_slice[1])
    for args in (["evaluate", "--model-uri", CHAMPION_URI, "--data", prepared],
                 ["predict", "--model-uri", CHAMPION_URI, "--data", prepared, "--test", "3"]):
        done = run_cli(subprocess_env, *args)
        line = error_line(done)
        assert done.returncode == 1 and "refusing to load model" in line and "'code'" in line
        assert not code_shipping_champion.exists(), f"{args[0]} ran the model's code"
    assert sum(len(statuses) for statuses in run_statuses(mlflow_store).values()) == 1  # the one that logged it


# ---------------------------------------------------------------------------------------------------
# The allow-list: each change to a model MLflow saved in the project's format is refused, unread


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = save_our_model(tmp_path_factory.mktemp("saved") / "model")
    load_model(str(folder))  # as MLflow saved it, the project loads it
    return folder


def edit_mlmodel(folder: Path, change) -> None:
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    change(meta)
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))


def symlinked_data(folder: Path) -> None:
    elsewhere = folder.parent / "elsewhere.pt2"
    (folder / "data" / "model.pt2").rename(elsewhere)
    (folder / "data" / "model.pt2").symlink_to(elsewhere)


def oversized(folder: Path) -> None:
    with open(folder / "input_example.json", "wb") as f:  # sparse: takes no room on disk
        f.truncate(safe_loading.MAX_MODEL_BYTES + 1)


@pytest.mark.parametrize("change, expected", [
    (lambda f: edit_mlmodel(f, lambda m: m["flavors"]["python_function"].update(loader_module="this")),
     "python_function flavor's loader_module is 'this'"),
    (lambda f: edit_mlmodel(f, lambda m: m["flavors"]["python_function"].update(code="code")),
     "ships its own code"),
    (lambda f: edit_mlmodel(f, lambda m: m["flavors"]["python_function"].update(model_code_path="m.py")),
     "python_function flavor holds what the project does not write"),
    (lambda f: edit_mlmodel(f, lambda m: m["flavors"].update(sklearn={"pickled_model": "model.pkl"})),
     "it has a 'sklearn' flavor"),
    (lambda f: edit_mlmodel(f, lambda m: m.update(env_vars=["AWS_SECRET"])),
     "MLmodel file has keys the project does not write: ['env_vars']"),
    (lambda f: (f / "code").mkdir(), "it holds 'code'"),
    (lambda f: (f / "data" / "extra.pkl").write_bytes(b"x"), "it holds 'data/extra.pkl'"),
    (symlinked_data, "data/model.pt2 is a link or not a regular file"),
    (oversized, "it holds more than"),
])
def test_a_model_folder_unlike_ours_is_refused(saved_model, tmp_path, change, expected):
    folder = Path(shutil.copytree(saved_model, tmp_path / "model"))
    change(folder)
    with pytest.raises(safe_loading.PipelineError, match="refusing to load model") as refusal:
        load_model(str(folder))
    assert expected in refusal.value.message


# ---------------------------------------------------------------------------------------------------
# Model URIs: system folders, unsupported schemes


def leftovers(tmp: Path) -> list[str]:
    """What the loader left in the temporary folder (its copies are named model-*)."""
    return [p.name for p in tmp.glob("model-*")]


@pytest.fixture
def env_with_tmp(subprocess_env, tmp_path):
    """The child's temporary folder, to see what it copies there and leaves behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**subprocess_env, "TMPDIR": str(tmp)}, tmp


@pytest.mark.slow
@pytest.mark.parametrize("folder, relative", [("/usr/lib", False), ("/etc", True)])
def test_a_system_folder_as_model_uri_is_refused_before_copying(env_with_tmp, mlflow_store, folder, relative):
    env, tmp = env_with_tmp
    uri = os.path.relpath(folder) if relative else folder  # relative: ../../../etc from this test's folder
    done = run_cli(env, "predict", "--model-uri", uri, "--test", "1")
    assert "it is not an MLflow model folder (it has no MLmodel file)" in error_line(done)
    assert leftovers(tmp) == []


@pytest.mark.slow
def test_a_registered_version_whose_source_is_a_system_folder_is_refused_before_copying(env_with_tmp,
                                                                                        mlflow_store):
    env, tmp = env_with_tmp
    MlflowClient().create_registered_model(MODEL_NAME)
    version = MlflowClient().create_model_version(MODEL_NAME, source="/etc").version
    MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    done = run_cli(env, "predict", "--model-uri", CHAMPION_URI, "--test", "1")
    assert "which the project's models do not" in error_line(done)
    assert leftovers(tmp) == []


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1/model", "https://example.org/model", "ftp://host/model",
                                 "s3://bucket/model", "file:///etc"])
def test_an_unsupported_uri_gets_one_line_naming_the_forms(mlflow_store, uri):
    line = error_line(run_in_process("predict", "--model-uri", uri, "--test", "1"))
    assert f"URIs are not supported; use {safe_loading.URI_FORMS}" in line and line.count("Error") == 1


# ---------------------------------------------------------------------------------------------------
# Interrupted while the model is being copied


@pytest.mark.slow
def test_sigterm_while_loading_removes_the_temporary_copy(mlflow_store, env_with_tmp, tmp_path):
    env, tmp = env_with_tmp
    folder = save_our_model(tmp_path / "model")
    # The signal arrives while the checked copy exists: as Ctrl-C would, it unwinds the load.
    code = textwrap.dedent(f"""
        import os, signal, time
        from pipeline.tracking.safe_loading import checked_copy
        try:
            with checked_copy({str(folder)!r}):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
        except KeyboardInterrupt as e:
            print("interrupted by", e)
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "interrupted by SIGTERM\n", done.stderr
    assert leftovers(tmp) == []
