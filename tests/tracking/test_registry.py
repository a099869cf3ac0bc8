"""The registry: one registered model per family; ``champion`` follows the default split; the same model is
registered once; moving an alias is safe when processes race (on a real PostgreSQL store too)."""

import subprocess
import sys
import textwrap
import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import TrainConfig
from pipeline.core.models import build_model
from pipeline.names import (
    CHAMPION,
    MODEL_NAME,
    REGISTERED_MODEL,
    SPLIT_CHAMPION,
    VERSION_MODEL_TAG,
    VERSION_VAL_ACCURACY_TAG,
    VERSION_VAL_DIGEST_TAG,
)
from pipeline.tracking.logged_models import log_model
from pipeline.tracking.registry import described_version, promote_if_better
from tests.fault_helpers import error_line, run_cli
from tests.helpers import child_env, postgres_server

FULL, SMOKE = "f" * 16, "5" * 16  # digests of two validation splits: the default one, and a smoke run's


def logged(splits, seed: int, model: str = "softmax") -> str:
    """A real logged model (its weights set by ``seed``), as a training run logs one; returns its URI."""
    with mlflow.start_run():
        cfg = TrainConfig(model=model, seed=seed)
        return log_model(build_model(cfg), splits.val_x[:4], step=0, family=model).model_uri


def register(splits, val_accuracy: float, digest: str, seed: int, model: str = "softmax") -> dict:
    return promote_if_better(logged(splits, seed, model), val_accuracy, digest, default_split=digest == FULL)


def holder(alias: str, name: str = MODEL_NAME) -> int:
    return int(MlflowClient().get_model_version_by_alias(name, alias).version)


def test_champion_is_chosen_on_the_default_split_only(data_slice, mlflow_store):
    splits = data_slice[0]
    # a smoke run registered first (0.80 on a few images) must not take champion...
    smoke = register(splits, 0.80, SMOKE, seed=1)
    assert not smoke["promoted"] and "not a candidate for champion" in smoke["reason"]
    assert smoke["split_promoted"] and holder(SPLIT_CHAMPION.format(SMOKE)) == 1
    assert MlflowClient().get_registered_model(MODEL_NAME).aliases.get(CHAMPION) is None
    # ...and the first full-data model takes it, though its number is lower
    full = register(splits, 0.67, FULL, seed=2)
    assert full["promoted"] and holder(CHAMPION) == 2 == holder(SPLIT_CHAMPION.format(FULL))
    assert not register(splits, 0.90, SMOKE, seed=3)["promoted"] and holder(CHAMPION) == 2
    better = register(splits, 0.70, FULL, seed=4)  # the same split: compared, and better
    assert better["promoted"] and holder(CHAMPION) == 4 == holder(SPLIT_CHAMPION.format(FULL))
    worse = register(splits, 0.60, FULL, seed=5)
    assert not worse["promoted"] and "does not beat champion version 4's 0.7000" in worse["reason"]
    versions = {int(v.version): v.tags for v in MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")}
    assert {versions[v][VERSION_VAL_DIGEST_TAG] for v in (1, 3)} == {SMOKE}
    assert {versions[v][VERSION_VAL_DIGEST_TAG] for v in (2, 4, 5)} == {FULL}


def test_a_champion_chosen_on_another_split_gives_way_to_the_default_split(data_slice, subprocess_env):
    splits = data_slice[0]
    register(splits, 0.95, SMOKE, seed=1)
    moved = run_cli(subprocess_env, "promote", "--model", "softmax", "--version", "1")  # by hand, on purpose
    assert moved.returncode == 0, moved.stderr
    assert "champion of fashion-mnist-softmax is now version 1" in moved.stdout and holder(CHAMPION) == 1
    taken = register(splits, 0.60, FULL, seed=2)  # the default split takes it back, whatever the numbers
    assert taken["promoted"] and "version 1 was chosen on another split" in taken["reason"] and holder(CHAMPION) == 2
    assert described_version(f"models:/{MODEL_NAME}@{CHAMPION}") == \
        "version 2, model softmax, chosen on the default split"
    line = error_line(run_cli(subprocess_env, "promote", "--version", "9"))
    assert line.startswith("Error: no version 9 of registered model fashion-mnist-softmax")


def test_the_same_model_is_registered_once(data_slice, mlflow_store):
    splits = data_slice[0]
    first = register(splits, 0.70, FULL, seed=1)
    # the same weights logged by another run (a study resumed with the same seed trains the same trial again)
    again = register(splits, 0.70, FULL, seed=1)
    assert first["new_version"] and not again["new_version"] and again["version"] == first["version"] == 1
    assert "already holds this model" in again["reason"]
    # the same weights chosen on another split are another registration (its accuracy means something else)
    assert register(splits, 0.70, SMOKE, seed=1)["version"] == 2
    assert len(MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")) == 2


def test_the_accuracy_a_version_holds_reads_as_measured(data_slice, mlflow_store):
    """float32's 0.9355 arrives as 0.9355000257492065: the tag reads 0.9355, and the same accuracy again is
    a tie, not a win."""
    measured = float(np.float32(0.9355))
    first = register(data_slice[0], measured, FULL, seed=1)
    assert MlflowClient().get_model_version(MODEL_NAME, "1").tags[VERSION_VAL_ACCURACY_TAG] == "0.9355"
    tie = register(data_slice[0], measured, FULL, seed=2)
    assert first["promoted"] and not tie["promoted"] and holder(CHAMPION) == 1


def test_each_model_family_has_its_own_champion(data_slice, mlflow_store):
    splits = data_slice[0]
    register(splits, 0.70, FULL, seed=1)
    mlp = register(splits, 0.95, FULL, seed=1, model="mlp")  # better, but another family: not compared
    assert mlp["model_name"] == REGISTERED_MODEL.format("mlp") and mlp["promoted"] and mlp["version"] == 1
    assert holder(CHAMPION) == 1 and holder(CHAMPION, REGISTERED_MODEL.format("mlp")) == 1
    champion = MlflowClient().get_model_version_by_alias(REGISTERED_MODEL.format("mlp"), CHAMPION)
    assert champion.tags[VERSION_MODEL_TAG] == "mlp"
    assert "model mlp" in described_version(f"models:/{REGISTERED_MODEL.format('mlp')}@{CHAMPION}")


# One process registering models, each at a given moment. Its link to the store is slow: each alias move
# waits `lag` seconds before it is sent, so that the two processes read, decide and write in each other's
# gaps, as over a network to a shared tracking server.
RACER = textwrap.dedent("""
    import sys, time
    import mlflow
    from mlflow import MlflowClient
    from pipeline.tracking.registry import promote_if_better
    mlflow.set_tracking_uri(sys.argv[1])
    start, lag = float(sys.argv[2]), float(sys.argv[3])
    move = MlflowClient.set_registered_model_alias
    def slow_move(*args):
        time.sleep(lag)
        return move(*args)
    MlflowClient.set_registered_model_alias = slow_move
    for i, (uri, accuracy) in enumerate(zip(sys.argv[4::2], sys.argv[5::2])):
        time.sleep(max(0.0, start + 4 * i - time.time()))  # both processes register together
        print(promote_if_better(uri, float(accuracy), "{full}", default_split=True)["reason"], flush=True)
""").replace("{full}", FULL)


@pytest.mark.slow
def test_two_processes_registering_at_once_on_postgresql(data_slice, tmp_path, monkeypatch):
    """Two processes register models at the same moments into a PostgreSQL store: neither fails, and the
    champion ends on the best of all, though the process with the worse models writes last each time (its
    move, decided before the other's better model was registered, is decided again)."""
    splits = data_slice[0]
    with postgres_server("mlflow") as server:
        url = server.replace("postgresql://", "postgresql+psycopg2://")  # the driver the project installs
        mlflow.set_tracking_uri(url)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("race", str(tmp_path / "artifacts")))
        rounds = 3
        uris = [[logged(splits, seed=10 * who + i) for i in range(rounds)] for who in range(2)]
        accuracies = [[0.50 + 0.01 * i + 0.001 * who for i in range(rounds)] for who in range(2)]
        start = time.time() + 20  # after both have imported MLflow
        racers = [subprocess.Popen(
            [sys.executable, "-c", RACER, url, str(start), str([0.8, 0.2][who]),
             *[str(x) for pair in zip(uris[who], accuracies[who]) for x in pair]],
            env=child_env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in range(2)]
        outcomes = [r.communicate(timeout=300) for r in racers]
        for racer, (out, err) in zip(racers, outcomes):
            assert racer.returncode == 0, err
            assert len(out.splitlines()) == rounds, out
        best = max(accuracies[0][-1], accuracies[1][-1])
        for alias in (CHAMPION, SPLIT_CHAMPION.format(FULL)):
            held = MlflowClient().get_model_version_by_alias(MODEL_NAME, alias)
            assert float(held.tags["val_accuracy"]) == best, alias
        assert len(MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")) == 2 * rounds
