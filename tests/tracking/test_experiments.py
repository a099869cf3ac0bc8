"""What a user sees in the MLflow UI: the named training experiment, meaningful model names, the datasets
each run used, and the system metrics of a study (real sqlite stores, real commands, real data slice)."""

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.core.splits import array_digest
from pipeline.names import DATASET_CONTEXTS, EXPERIMENT_KIND_TAG, EXPERIMENT_NAME, TRAINING_KIND, TRIAL_TAG
from tests.helpers import REPO


def dataset_inputs(run) -> dict[str, str]:
    """context ("training", ...) -> dataset digest, of a run's logged inputs."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset.digest
            for d in run.inputs.dataset_inputs}


def test_train_records_in_the_named_training_experiment(mlflow_store, data_slice):
    splits, prepared = data_slice
    out = CliRunner().invoke(cli, ["train", "--data", str(prepared), "--epochs", "2", "--lr", "0.2"])
    assert out.exit_code == 0, out.output
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    [run] = MlflowClient().search_runs([experiment.experiment_id])
    # the model's name says how it was trained, and runs:/<run>/<name> (printed by the command) finds it
    [model] = MlflowClient().search_logged_models([experiment.experiment_id])
    assert model.name == "softmax-lr0_2-wd0-ep2"
    assert f"runs:/{run.info.run_id}/{model.name}" in out.output
    assert mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{model.name}") is not None
    # the datasets it trained and chose its epoch on, identified by the full-array digests
    assert dataset_inputs(run) == {DATASET_CONTEXTS["train"]: array_digest(splits.train_x, splits.train_y),
                                   DATASET_CONTEXTS["val"]: array_digest(splits.val_x, splits.val_y)}


def test_environment_names_another_experiment_and_it_is_marked_too(mlflow_store, data_slice, monkeypatch):
    train = ["train", "--data", str(data_slice[1]), "--epochs", "1"]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    assert CliRunner().invoke(cli, train).exit_code == 0
    mine = mlflow.get_experiment_by_name("mine")
    assert mine.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert len(MlflowClient().search_runs([mine.experiment_id])) == 1
    assert mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None
    # an experiment given by id, whose kind the user chose: the run goes there, the kind is left alone
    other = MlflowClient().create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", other)
    assert CliRunner().invoke(cli, train).exit_code == 0
    assert len(MlflowClient().search_runs([other])) == 1
    assert mlflow.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_unknown_experiment_id_fails_in_one_line_before_any_run(mlflow_store, data_slice, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "12345")
    out = CliRunner().invoke(cli, ["train", "--data", str(data_slice[1]), "--epochs", "1"])
    assert out.exit_code == 1
    [error] = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: cannot record runs in MLFLOW_EXPERIMENT_ID=12345: ")
    assert "MLFLOW_EXPERIMENT_NAME" in error  # what to do
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_make_run_passes_the_project_experiment():
    """`mlflow run` creates its run before our code starts: only its --experiment-name can choose."""
    assert f"--experiment-name {EXPERIMENT_NAME}" in (REPO / "Makefile").read_text()


@pytest.mark.slow
def test_tune_records_system_metrics_and_trial_datasets(mlflow_store, data_slice, tmp_path, monkeypatch):
    splits, prepared = data_slice
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # 10 s by default
    out = CliRunner().invoke(cli, ["tune", "--data", str(prepared), "--storage", f"sqlite:///{tmp_path}/o.db",
                                   "--trials", "3", "--epochs-low", "2", "--epochs-high", "3", "--pruner", "none",
                                   "--test-best", "false"])
    assert out.exit_code == 0, out.output
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    runs = MlflowClient().search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if TRIAL_TAG not in r.data.tags]
    history = MlflowClient().get_metric_history(parent.info.run_id, "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 * 64 for m in history)
    assert parent.data.metrics["system/system_memory_usage_megabytes"] > 0
    trials = [r for r in runs if TRIAL_TAG in r.data.tags]
    assert len(trials) == 3
    for trial in trials:
        assert not any(key.startswith("system/") for key in trial.data.metrics)  # only the study's run
        assert dataset_inputs(trial)[DATASET_CONTEXTS["val"]] == array_digest(splits.val_x, splits.val_y)
    names = {m.name for m in MlflowClient().search_logged_models([experiment.experiment_id])}
    assert len(names) == 3 and all(n.startswith("softmax-lr") for n in names)
