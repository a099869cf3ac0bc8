"""What the prepare and train steps record really lands in a (temporary sqlite) MLflow store."""

import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.cli import cli
from pipeline.config import DataConfig, TrainConfig
from pipeline.core.splits import array_digest
from pipeline.core.training import Tensors
from pipeline.names import MODEL_URI_TAG
from pipeline.steps.prepare import prepare
from pipeline.tracking.datasets import load_data
from pipeline.tracking.training import train
from tests.helpers import REPO


def test_train_step_logs_params_curves_and_model(mlflow_store, data_slice):
    splits = data_slice[0]
    cfg = TrainConfig(epochs=3, lr=0.2)
    with mlflow.start_run() as run:
        result, model_info = train(cfg, splits, progress=False)
    client = MlflowClient()
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["lr"] == "0.2" and stored.data.params["batch_size"] == "256"
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([h[key] for h in result.history])
    assert stored.data.metrics["best_epoch"] == result.best_epoch
    assert stored.data.metrics["best_val_accuracy"] == pytest.approx(result.best_val_accuracy)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "curves.png" in artifacts
    # the logged model is the best epoch's and predicts exactly like the in-memory one
    assert stored.data.tags[MODEL_URI_TAG] == model_info.model_uri
    loaded = mlflow.pytorch.load_model(model_info.model_uri)
    x = Tensors.from_splits(splits).val[0][:50]
    torch.testing.assert_close(loaded(x), result.model(x))
    logged = mlflow.get_logged_model(model_info.model_id)
    assert logged.source_run_id == run.info.run_id
    assert {m.key for m in logged.metrics} >= {"best_val_accuracy", "best_epoch"}


def test_prepare_step_logs_datasets_with_full_digests(mlflow_store, real_data_dir):
    cfg = DataConfig(data_dir=str(real_data_dir), limit=500)
    with mlflow.start_run() as run:
        splits = prepare(cfg)
    stored = MlflowClient().get_run(run.info.run_id)
    inputs = {d.tags[0].value: d.dataset for d in stored.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert inputs["validation"].digest == array_digest(splits.val_x, splits.val_y)
    assert stored.data.params["source"] == str(real_data_dir.resolve())
    assert stored.data.params["train_size"] == "500"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"prepared", "samples.png", "class_counts.json"} <= artifacts
    # the prepared artifact is what the next step loads, through the run's URI
    fetched = load_data(f"runs:/{run.info.run_id}/prepared")
    np.testing.assert_array_equal(fetched.test_x, splits.test_x)


@pytest.mark.parametrize("option, value", [("--lr", "0"), ("--epochs", "0"), ("--batch-size", "0"),
                                           ("--weight-decay", "-0.1"), ("--patience", "-1")])
def test_cli_rejects_bad_parameters_before_anything_runs(mlflow_store, option, value):
    result = CliRunner().invoke(cli, ["train", option, value])
    assert result.exit_code == 2
    assert option.lstrip("-").replace("-", "_") in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run was started


def test_diverging_run_fails_cleanly(mlflow_store, data_slice):
    _, prepared = data_slice
    result = CliRunner().invoke(cli, ["train", "--data", str(prepared), "--lr", "1e38", "--epochs", "2"])
    assert result.exit_code == 1
    assert "training diverged at epoch 1" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]
    assert "lower the learning rate" in runs["tags.pipeline.failure"][0]


def test_missing_prepared_data_is_a_clear_error(mlflow_store, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1
    assert "cannot fetch the prepared data" in result.output


@pytest.mark.slow
def test_mlflow_run_prepare_then_train_on_real_data(subprocess_env, mlflow_store):
    def mlflow_run(*args):
        return subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *args],
                              env=subprocess_env, capture_output=True, text=True, timeout=600)

    prep = mlflow_run("-e", "prepare", "-P", "limit=1000")
    assert prep.returncode == 0, prep.stderr[-3000:]
    prepare_run = mlflow.search_runs(search_all_experiments=True).iloc[0]
    train = mlflow_run("-e", "train", "-P", f"data=runs:/{prepare_run.run_id}/prepared",
                       "-P", "epochs=2", "-P", "lr=1e-1")
    assert train.returncode == 0, train.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="params.epochs = '2'")
    assert len(runs) == 1 and runs.status[0] == "FINISHED"
    assert runs["params.lr"][0] == "1e-1"  # as typed: our own param logging did not clash with it
    assert runs["metrics.best_val_accuracy"][0] > 0.6
    assert runs["metrics.val_accuracy"][0] > 0.6
