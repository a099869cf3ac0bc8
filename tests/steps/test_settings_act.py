"""Every setting of ``main`` acts or is refused, and ``main`` records the settings of the model it delivers."""

import subprocess
import sys

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.names import (
    CHAMPION,
    MODEL_NAME,
    SPLIT_CHAMPION,
    STUDY_TAG,
    TRIAL_TAG,
    VAL_DIGEST_TAG,
    VERSION_VAL_DIGEST_TAG,
)
from tests.helpers import REPO, child_env

# ---------------------------------------------------------------------------------------------------
# 1. main: every setting acts or is refused


@pytest.mark.parametrize("args, message", [
    (["--lr", "0.5"], "lr would not act with trials=20: the study chooses lr, epochs and weight decay"),
    (["--lr", "0.1", "--patience", "3"], "lr, patience would not act with trials=20"),  # given, even if default
    (["--trials", "4", "--weight_decay", "0.01"], "weight_decay would not act with trials=4"),
    (["--trials", "0", "--study-name", "x"], "study_name would not act with trials=0"),
])
def test_main_refuses_settings_that_would_not_act(args, message, new_mlflow_store, tmp_path):
    result = CliRunner().invoke(cli, ["main", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "trials" in result.output.splitlines()[-1]
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was made


# ---------------------------------------------------------------------------------------------------
# main under `mlflow run`, end to end


# (main with trials=0 and -P lr=0.3: tests/steps/test_main.py's scenario,
# test_main_records_the_settings_it_trained_with)
SCENARIO = {"refused": ["lr=0.5"], "study": ["trials=2"]}


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
    """``mlflow run .`` (main) on 500 images per split, once per SCENARIO entry; its main run and output."""
    home = tmp_path_factory.mktemp("trust")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    seen = {}
    for name, params in SCENARIO.items():
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "-P", "limit=500",
                "-P", f"storage=sqlite:///{home / 'optuna.db'}"]
        for p in params:
            args += ["-P", p]
        done = subprocess.run(args, env=child_env(uri), capture_output=True, text=True, timeout=600, cwd=home)
        main = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"],
                                  filter_string="tags.`mlflow.project.entryPoint` = 'main'")[0]
        seen[name] = {"returncode": done.returncode, "output": done.stdout + done.stderr, "main": main}
    yield seen


@pytest.mark.slow
def test_mlflow_run_refuses_a_training_setting_with_a_study(main_runs):
    refused = main_runs["refused"]
    assert refused["returncode"] != 0
    assert "lr would not act with trials=20" in refused["output"]
    assert refused["main"].info.status == "FAILED"
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{refused['main'].info.run_id}'")
    assert children == []  # refused before any step ran


@pytest.mark.slow
def test_main_with_a_study_shows_the_delivered_settings_not_its_own(main_runs):
    study = main_runs["study"]
    assert study["returncode"] == 0, study["output"][-3000:]
    main = study["main"]
    params, tags = main.data.params, main.data.tags
    assert not {"lr", "epochs", "weight_decay", "patience", "augment"} & set(params)  # they did not act
    study_name = params["study_name"]
    assert tags[STUDY_TAG] == study_name and study_name.startswith("main-")

    # the filter docs/tuning.md gives finds the trials of the study main started
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.pipeline.study_name = '{study_name}' "
                                              "and tags.pipeline.trial_state = 'COMPLETE'")
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in trials) == [0, 1]

    best = mlflow.get_run(tags["pipeline.delivered_run_id"])
    assert best.info.run_id in {r.info.run_id for r in trials}
    for key in ("lr", "epochs", "weight_decay", "patience", "batch_size", "seed"):
        assert params[f"delivered_{key}"] == best.data.params[key]
    assert main.data.metrics["best_epoch"] == best.data.metrics["best_epoch"]
    assert main.data.metrics["best_val_accuracy"] == best.data.metrics["best_val_accuracy"]
    # registered as the best of its split (a limited one: never the champion, which follows the default split)
    digest = best.data.tags[VAL_DIGEST_TAG]
    held = MlflowClient().get_model_version_by_alias(MODEL_NAME, SPLIT_CHAMPION.format(digest))
    assert held.tags[VERSION_VAL_DIGEST_TAG] == digest
    assert CHAMPION not in MlflowClient().get_registered_model(MODEL_NAME).aliases
