"""Results a researcher can trust, on real sqlite MLflow stores and real Optuna storages:

1. every setting of ``main`` acts or is refused, and ``main`` records the settings of the model it delivers;
2. validation accuracies are compared only on the same validation split (registry, resumed studies);
3. the study records what its trials used: conditional weight decay, a named objective, pruned trials'
   best-so-far, a seed trial within the space's epochs, a study findable by the tag main records.
"""

import subprocess
import sys
from dataclasses import replace

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import DataConfig, SearchSpace, TuneConfig
from pipeline.core.models import build_model
from pipeline.core.splits import array_digest, prepare_splits
from pipeline.core.training import Tensors
from pipeline.errors import PipelineError
from pipeline.names import (
    CHAMPION,
    MODEL_NAME,
    RUN_ID_ATTR,
    SPLIT_CHAMPION,
    STUDY_DATA_ATTRS,
    STUDY_TAG,
    TRIAL_TAG,
    VAL_DIGEST_TAG,
    VERSION_VAL_DIGEST_TAG,
)
from pipeline.tracking.logged_models import log_model
from pipeline.tracking.registry import promote_if_better
from pipeline.tuning.storage import open_storage
from pipeline.tuning.study import run_study
from pipeline.tuning.trials import Heartbeats, Worker, ask_trial, train_alone
from tests.helpers import REPO, child_env


def val_digest(splits) -> str:
    return array_digest(splits.val_x, splits.val_y)


@pytest.fixture(scope="module")
def tiny_split(real_data_dir, tmp_path_factory):
    """Another split of the real data: 5 images per split (too few to judge by)."""
    cfg = DataConfig(data_dir=str(real_data_dir), val_size=10_000, limit=5)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("tiny"))
    return splits, path


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
# 2. Like with like: the registry and resumed studies


def register(splits, val_accuracy: float, digest: str) -> dict:
    """A real logged model, offered to the registry as chosen on the split with ``digest``."""
    with mlflow.start_run():
        info = log_model(build_model(0), splits.val_x[:4], step=0)
        return promote_if_better(info.model_uri, val_accuracy, digest)


@pytest.mark.slow
def test_champion_is_compared_only_on_the_same_validation_split(real_slice, tiny_split, mlflow_store):
    big, small = real_slice[0], tiny_split[0]
    big_digest, small_digest = val_digest(big), val_digest(small)
    assert big_digest != small_digest
    client = MlflowClient()
    holder = lambda alias: int(client.get_model_version_by_alias(MODEL_NAME, alias).version)  # noqa: E731

    first = register(big, 0.67, big_digest)  # validated on 2,000 images
    assert first["promoted"] and holder(CHAMPION) == 1

    # 0.80 on 5 images must not take the alias from 0.67 on 2,000
    tiny = register(small, 0.80, small_digest)
    assert not tiny["promoted"] and holder(CHAMPION) == 1
    assert "chosen on another validation split" in tiny["reason"] and small_digest in tiny["reason"]
    assert tiny["split_promoted"] and holder(SPLIT_CHAMPION.format(small_digest)) == 2

    better = register(big, 0.70, big_digest)  # the same split: compared, and better
    assert better["promoted"] and holder(CHAMPION) == 3 == holder(SPLIT_CHAMPION.format(big_digest))
    worse = register(big, 0.60, big_digest)
    assert not worse["promoted"] and "does not beat champion version 3's 0.7000" in worse["reason"]
    assert holder(SPLIT_CHAMPION.format(big_digest)) == 3

    versions = {int(v.version): v.tags for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert versions[2][VERSION_VAL_DIGEST_TAG] == small_digest
    assert {versions[v][VERSION_VAL_DIGEST_TAG] for v in (1, 3, 4)} == {big_digest}


def one_epoch_study(storage: str, name: str = "s", trials: int = 1) -> TuneConfig:
    return TuneConfig(trials=trials, storage=storage, study_name=name, test_best=False, pruner="none")


ONE_EPOCH = SearchSpace(epochs_low=1, epochs_high=1)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:///optuna.db", "journal:///optuna.log"])
def test_a_study_refuses_to_resume_on_other_data(storage, real_slice, tiny_split, mlflow_store):
    cfg = one_epoch_study(storage)
    study = run_study(cfg, ONE_EPOCH, str(real_slice[1]))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]  # --trials 1 runs the seed trial
    trained_on = dict(study.user_attrs)
    assert {k: trained_on[k] for k in STUDY_DATA_ATTRS} == {
        "train_digest": array_digest(*real_slice[0].arrays("train")), "val_digest": val_digest(real_slice[0])}

    result = CliRunner().invoke(cli, ["tune", "--data", str(tiny_split[1]), "--storage", storage,
                                      "--study-name", "s", "--trials", "2", "--epochs-low", "1",
                                      "--epochs-high", "1", "--test-best", "false"])
    assert result.exit_code == 1, result.output
    assert "study 's' in" in result.output and "was run on other data" in result.output
    assert val_digest(tiny_split[0]) in result.output and "Pick another --study-name" in result.output
    refused = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="attributes.run_name = 'tune s'")
    assert [r.info.status for r in refused] == ["FAILED"]

    kept = optuna.load_study(study_name="s", storage=open_storage(cfg))
    assert len(kept.trials) == 1 and kept.user_attrs == trained_on  # nothing recorded was lost or changed
    resumed = run_study(replace(cfg, trials=2), ONE_EPOCH, str(real_slice[1]))  # its own data: resumes
    assert len(resumed.trials) == 2


@pytest.mark.slow
def test_a_study_that_does_not_record_its_data_is_refused(real_slice, mlflow_store, tmp_path):
    """A study made before studies recorded their data: nothing says its trials are comparable."""
    cfg = one_epoch_study(f"sqlite:///{tmp_path / 'optuna.db'}", name="old")
    old = optuna.create_study(study_name="old", storage=open_storage(cfg), direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.8))
    with pytest.raises(PipelineError, match="was run on other data \\(train_digest not recorded"):
        run_study(cfg, ONE_EPOCH, str(real_slice[1]))
    assert len(optuna.load_study(study_name="old", storage=open_storage(cfg)).trials) == 1


# ---------------------------------------------------------------------------------------------------
# 3. What the study records is what it used


@pytest.mark.slow
def test_the_study_records_what_its_trials_used(real_slice, mlflow_store, tmp_path):
    cfg = replace(one_epoch_study(f"sqlite:///{tmp_path / 'optuna.db'}", trials=6), sampler="random", seed=1)
    space = SearchSpace(epochs_low=1, epochs_high=2)
    with mlflow.start_run() as parent:
        study = run_study(cfg, space, str(real_slice[1]))

    assert study.metric_names == ["val_accuracy"]
    # the seed recipe, within the space's epochs (a smoke run caps them to 2), and no weight decay drawn
    assert study.trials[0].params == {"lr": 0.1, "epochs": 2, "use_weight_decay": False}
    used = [t.params["use_weight_decay"] for t in study.trials]
    assert True in used and False in used, used  # both kinds, so the check below sees both
    for trial in study.trials:
        assert ("weight_decay" in trial.params) == trial.params["use_weight_decay"]
        run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert float(run.data.params["weight_decay"]) == trial.params.get("weight_decay", 0.0)
        assert run.data.metrics["epochs_run"] <= space.epochs_high
        assert run.data.tags[VAL_DIGEST_TAG] == val_digest(real_slice[0])
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/param_importances.png", "study/slice.png", "study/parallel_coordinate.png"} <= artifacts
    header = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study/trials.csv").splitlines()[0]
    assert "value_val_accuracy" in header.split(",")


@pytest.mark.slow
def test_a_pruned_trial_logs_its_best_so_far_and_where_it_stopped(real_slice, mlflow_store, tmp_path):
    splits, _ = real_slice
    cfg = replace(one_epoch_study(f"sqlite:///{tmp_path / 'optuna.db'}"), patience=0)
    space = SearchSpace(lr_low=0.05, lr_high=0.05, epochs_low=5, epochs_high=5)
    # a real pruner that stops every trial at epoch 3: no accuracy reaches 1.0
    study = optuna.create_study(study_name="p", storage=open_storage(cfg), direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.0, n_warmup_steps=3))
    storage = open_storage(cfg)
    study = optuna.load_study(study_name="p", storage=storage, pruner=study.pruner)
    with mlflow.start_run() as parent, Heartbeats(storage, cfg.heartbeat_interval) as heartbeats:
        worker = Worker(study, storage, cfg, space, splits, Tensors.from_splits(splits), parent.info,
                        lambda: None, heartbeats)
        train_alone(worker, ask_trial(worker))
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    curve = trial.intermediate_values
    metrics = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR]).data.metrics
    assert metrics["pruned_at_epoch"] == 3 == metrics["epochs_run"] == max(curve)
    assert metrics["best_val_accuracy"] == max(curve.values())
    assert curve[int(metrics["best_epoch"])] == max(curve.values())


# ---------------------------------------------------------------------------------------------------
# main under `mlflow run`, end to end


# (main with trials=0 and -P lr=0.3: tests/test_main.py's scenario, test_main_records_the_settings_it_trained_with)
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
    champion = MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert champion.tags[VERSION_VAL_DIGEST_TAG] == best.data.tags[VAL_DIGEST_TAG]
