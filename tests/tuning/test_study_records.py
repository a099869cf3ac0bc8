"""A study records what its trials used, and resumes only on its own data."""

from dataclasses import replace

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import DataConfig
from pipeline.core.splits import array_digest, prepare_splits
from pipeline.core.training import Tensors
from pipeline.errors import PipelineError
from pipeline.names import RUN_ID_ATTR, STUDY_DATA_ATTRS, VAL_DIGEST_TAG
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.storage import open_storage
from pipeline.tuning.study import run_study
from pipeline.tuning.trial_state import Heartbeats, Worker
from pipeline.tuning.trials import ask_trial, train_alone


def val_digest(splits) -> str:
    return array_digest(splits.val_x, splits.val_y)


@pytest.fixture(scope="module")
def tiny_split(real_data_dir, tmp_path_factory):
    """Another split of the real data: 5 images per split (too few to judge by)."""
    cfg = DataConfig(data_dir=str(real_data_dir), val_size=10_000, limit=5)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("tiny"))
    return splits, path


def one_epoch_study(storage: str, name: str = "s", trials: int = 1) -> TuneConfig:
    return TuneConfig(trials=trials, storage=storage, study_name=name, test_best=False, pruner="none")


ONE_EPOCH = SearchSpace(epochs_low=1, epochs_high=1)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:///optuna.db", "journal:///optuna.log"])
def test_a_study_refuses_to_resume_on_other_data(storage, data_slice, tiny_split, mlflow_store):
    cfg = one_epoch_study(storage)
    study = run_study(cfg, ONE_EPOCH, str(data_slice[1]))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]  # --trials 1 runs the seed trial
    trained_on = dict(study.user_attrs)
    assert {k: trained_on[k] for k in STUDY_DATA_ATTRS} == {
        "train_digest": array_digest(*data_slice[0].arrays("train")), "val_digest": val_digest(data_slice[0])}

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
    resumed = run_study(replace(cfg, trials=2), ONE_EPOCH, str(data_slice[1]))  # its own data: resumes
    assert len(resumed.trials) == 2


@pytest.mark.slow
def test_a_study_that_does_not_record_its_data_is_refused(data_slice, mlflow_store, tmp_path):
    """A study made before studies recorded their data: nothing says its trials are comparable."""
    cfg = one_epoch_study(f"sqlite:///{tmp_path / 'optuna.db'}", name="old")
    old = optuna.create_study(study_name="old", storage=open_storage(cfg), direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.8))
    with pytest.raises(PipelineError, match="was run on other data or another model \\(train_digest not recorded"):
        run_study(cfg, ONE_EPOCH, str(data_slice[1]))
    assert len(optuna.load_study(study_name="old", storage=open_storage(cfg)).trials) == 1


# ---------------------------------------------------------------------------------------------------
# 3. What the study records is what it used


@pytest.mark.slow
def test_the_study_records_what_its_trials_used(data_slice, mlflow_store, tmp_path):
    cfg = replace(one_epoch_study(f"sqlite:///{tmp_path / 'optuna.db'}", trials=6), sampler="random", seed=1)
    space = SearchSpace(epochs_low=1, epochs_high=2)
    with mlflow.start_run() as parent:
        study = run_study(cfg, space, str(data_slice[1]))

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
        assert run.data.tags[VAL_DIGEST_TAG] == val_digest(data_slice[0])
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/param_importances.png", "study/slice.png", "study/parallel_coordinate.png"} <= artifacts
    header = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study/trials.csv").splitlines()[0]
    assert "value_val_accuracy" in header.split(",")


@pytest.mark.slow
def test_a_pruned_trial_logs_its_best_so_far_and_where_it_stopped(data_slice, mlflow_store, tmp_path):
    splits, _ = data_slice
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


