"""`main`: prepare -> train -> evaluate -> register as child runs, reusing finished steps."""

import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.config import DataConfig, TrainConfig
from pipeline.workflow import entry_point_defaults, step_parameters
from pipeline.errors import PipelineError
from tests.conftest import REPO


def test_mlproject_defaults_match_the_config_defaults():
    # MLproject and pipeline/config.py both state the defaults; they must never drift apart
    as_string = lambda v: str(v).lower() if isinstance(v, bool) else ("" if v is None else str(v))  # noqa: E731
    train = entry_point_defaults("train")
    assert {k: as_string(v) for k, v in TrainConfig().as_params().items()} == {k: train[k] for k in TrainConfig().as_params()}
    prepare = entry_point_defaults("prepare")
    assert {k: as_string(v) for k, v in DataConfig().__dict__.items()} == prepare
    main = entry_point_defaults("main")
    assert all(main[k] == v for k, v in {**prepare, **{k: train[k] for k in TrainConfig().as_params() if k in main}}.items())


def test_step_parameters_are_complete_strings_and_checked():
    params = step_parameters("train", {"lr": 0.5, "augment": True, "data": "runs:/x/prepared"})
    assert params["lr"] == "0.5" and params["augment"] == "true" and params["epochs"] == "10"
    with pytest.raises(PipelineError, match="no parameter"):
        step_parameters("train", {"learning_rate": 0.5})


def runs_of(entry_point):
    return mlflow.search_runs(search_all_experiments=True,
                              filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'")


@pytest.mark.slow
def test_main_chains_steps_and_reuses_finished_ones(subprocess_env, mlflow_store):
    def main(*params):
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
                "-P", "trials=0", "-P", "limit=1000", "-P", "epochs=2"]
        for p in params:
            args += ["-P", p]
        done = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return runs_of("main").iloc[0]  # the newest main run

    first = main()
    children = mlflow.search_runs(search_all_experiments=True,
                                  filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'")
    assert sorted(children["tags.mlflow.project.entryPoint"]) == ["evaluate", "prepare", "train"]
    assert (children.status == "FINISHED").all()
    assert first["metrics.test_accuracy"] > 0.6 and first["metrics.val_accuracy"] > 0.6
    assert first["tags.pipeline.step.train.reused"] == "False"
    # the data went from prepare to train through the prepare run's artifact URI
    train = runs_of("train").iloc[0]
    assert train["params.data"] == f"runs:/{first['tags.pipeline.step.prepare']}/prepared"
    assert int(MlflowClient().get_model_version_by_alias("fashion-mnist-softmax", "champion").version) == 1

    second = main()
    for step in ("prepare", "train", "evaluate"):
        assert len(runs_of(step)) == 1, f"{step} ran again"
        assert second[f"tags.pipeline.step.{step}.reused"] == "True"
        assert second[f"tags.pipeline.step.{step}"] == first[f"tags.pipeline.step.{step}"]
    assert second["metrics.test_accuracy"] == first["metrics.test_accuracy"]
    assert "already is the champion" in second["tags.pipeline.champion_decision"]

    third = main("lr=0.3")
    assert len(runs_of("prepare")) == 1 and third["tags.pipeline.step.prepare.reused"] == "True"
    assert len(runs_of("train")) == 2 and len(runs_of("evaluate")) == 2
    assert third["tags.pipeline.step.train.reused"] == "False"

    forced = main("lr=0.3", "force=true")
    assert len(runs_of("prepare")) == 2 and len(runs_of("train")) == 3
    assert forced["tags.pipeline.step.prepare.reused"] == "False"
