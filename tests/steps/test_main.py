"""`main`: prepare -> train -> evaluate -> register as child runs, reusing finished steps."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.errors import PipelineError
from pipeline.steps.step_runs import step_parameters
from tests.helpers import REPO, child_env


def test_step_parameters_are_complete_strings_and_checked():
    params = step_parameters("train", {"lr": 0.5, "augment": True, "data": "runs:/x/prepared"})
    assert params["lr"] == "0.5" and params["augment"] == "true" and params["epochs"] == "10"
    with pytest.raises(PipelineError, match="no parameter"):
        step_parameters("train", {"learning_rate": 0.5})


def runs_of(entry_point):
    return mlflow.search_runs(search_all_experiments=True,
                              filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'")


SCENARIO = {"first": [], "second": [], "third": ["lr=0.3"], "forced": ["lr=0.3", "force=true"]}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """``main`` run four times on one store, as in SCENARIO; after each: its main run and the runs per step.

    Run once for the module, so that each test below checks one promise and a failure hides no other.
    """
    home = tmp_path_factory.mktemp("main")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = child_env(uri)
    mlflow.set_tracking_uri(uri)
    seen = {}
    for name, params in SCENARIO.items():
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
                "-P", "trials=0", "-P", "limit=1000", "-P", "epochs=2"]
        for p in params:
            args += ["-P", p]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=home)
        assert done.returncode == 0, done.stderr[-4000:]
        seen[name] = {"main": runs_of("main").iloc[0],  # the newest main run
                      **{step: len(runs_of(step)) for step in ("prepare", "train", "evaluate")}}
    seen["children"] = mlflow.search_runs(search_all_experiments=True,
                                          filter_string=f"tags.mlflow.parentRunId = '{seen['first']['main'].run_id}'")
    seen["aliases"] = MlflowClient().get_registered_model("fashion-mnist-softmax").aliases
    seen["train_runs"] = runs_of("train")
    yield seen


@pytest.mark.slow
def test_main_chains_three_child_steps(scenario):
    first = scenario["first"]["main"]
    children = scenario["children"]
    assert sorted(children["tags.mlflow.project.entryPoint"]) == ["evaluate", "prepare", "train"]
    assert (children.status == "FINISHED").all()
    assert first["metrics.test_accuracy"] > 0.6 and first["metrics.best_val_accuracy"] > 0.6
    # the headline's 95% interval is the evaluate step's, around its test accuracy
    evaluate = children[children["tags.mlflow.project.entryPoint"] == "evaluate"].iloc[0]
    for end in ("low", "high"):
        assert first[f"metrics.test_accuracy_ci_{end}"] == evaluate[f"metrics.test_accuracy_ci_{end}"]
    low, high = first["metrics.test_accuracy_ci_low"], first["metrics.test_accuracy_ci_high"]
    assert low < first["metrics.test_accuracy"] < high
    assert first["tags.pipeline.step.train.reused"] == "False"


@pytest.mark.slow
def test_data_travels_by_the_prepare_runs_artifact_uri(scenario):
    first = scenario["first"]["main"]
    train = scenario["train_runs"].iloc[-1]  # the oldest train run: the first main's
    assert train["params.data"] == f"runs:/{first['tags.pipeline.step.prepare']}/prepared"
    # a run on limited data is the best of its split, never the champion `make serve` serves
    assert "champion" not in scenario["aliases"] and len(scenario["aliases"]) == 1
    assert [int(v) for v in scenario["aliases"].values()] == [1]


@pytest.mark.slow
def test_an_identical_main_reuses_every_step(scenario):
    first, second = scenario["first"]["main"], scenario["second"]["main"]
    for step in ("prepare", "train", "evaluate"):
        assert scenario["second"][step] == 1, f"{step} ran again"
        assert second[f"tags.pipeline.step.{step}.reused"] == "True"
        assert second[f"tags.pipeline.step.{step}"] == first[f"tags.pipeline.step.{step}"]
    assert second["metrics.test_accuracy"] == first["metrics.test_accuracy"]
    assert "already is the champion" in second["tags.pipeline.champion_decision"]


@pytest.mark.slow
def test_a_changed_learning_rate_reruns_train_and_evaluate_only(scenario):
    third = scenario["third"]
    assert third["prepare"] == 1 and third["main"]["tags.pipeline.step.prepare.reused"] == "True"
    assert third["train"] == 2 and third["evaluate"] == 2
    assert third["main"]["tags.pipeline.step.train.reused"] == "False"


@pytest.mark.slow
def test_force_reruns_every_step(scenario):
    forced = scenario["forced"]
    assert forced["prepare"] == 2 and forced["train"] == 3
    assert forced["main"]["tags.pipeline.step.prepare.reused"] == "False"


@pytest.mark.slow
def test_main_records_the_settings_it_trained_with(scenario):
    """-P lr=0.3 (undeclared by MLproject's main) reaches train and is logged; the ones not given, too."""
    params = scenario["third"]["main"].filter(like="params.")
    assert params["params.lr"] == params["params.delivered_lr"] == "0.3"
    assert params["params.epochs"] == params["params.delivered_epochs"] == "2"
    assert params["params.patience"] == params["params.delivered_patience"] == "5"  # not given, but it acted
    assert pd.isna(params.get("params.study_name")) and pd.isna(params.get("params.storage"))  # no study ran
