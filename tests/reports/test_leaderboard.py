"""The report: a real store with a few small trainings, and a leaderboard that matches what it holds."""

import math
import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import DataConfig
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import prepare_splits
from pipeline.errors import PipelineError
from pipeline.experiment_files.spec import load_spec
from pipeline.names import MODEL_URI_TAG, ROLE_TAG
from pipeline.reports.leaderboard import write_report
from pipeline.steps.experiment import run_experiment
from pipeline.tracking.safe_loading import load_model

LIMIT = 400
SMALL = f"""
    experiment: small
    entry_point: train
    description: three short trainings, two of them with the test curve
    data: {{limit: {LIMIT}}}
    params: {{epochs: 3, patience: 0}}
    grid:
      - {{lr: [0.05, 0.5], log_test_curve: [true]}}
      - {{weight_decay: [0.001]}}
"""


@pytest.fixture
def small_experiment(tmp_path, mlflow_store, real_data_dir):
    path = tmp_path / "small.yaml"
    path.write_text(textwrap.dedent(SMALL))
    return run_experiment(load_spec(path))


def test_leaderboard_matches_the_store(small_experiment, tmp_path):
    report = write_report("small", tmp_path / "reports")
    table = report["table"].set_index("run_id")
    client = MlflowClient()
    runs = {run_id: client.get_run(run_id) for run_id in small_experiment["run_ids"]}
    assert set(table.index) == set(runs)  # every training run, and not the experiment's parent run

    # best validation accuracy first
    assert list(report["table"]["best_val_accuracy"]) == sorted(table["best_val_accuracy"], reverse=True)
    assert {"lr", "weight_decay"} <= set(table.columns) and "epochs" not in table.columns  # only what varies
    assert "epochs=3" in report["markdown"] and "patience=0" in report["markdown"]

    test_x, test_y = prepare_splits(DataConfig(limit=LIMIT))[0].arrays("test")
    for run_id, run in runs.items():
        row, metrics = table.loc[run_id], run.data.metrics
        assert row["run"] == run.info.run_name
        assert row["lr"] == run.data.params["lr"]
        assert row["best_val_accuracy"] == metrics["best_val_accuracy"]
        assert row["best_epoch"] == metrics["best_epoch"] and row["epochs_run"] == 3
        assert row["duration_s"] == pytest.approx((run.info.end_time - run.info.start_time) / 1000)
        assert row["status"] == "FINISHED"
        # the test accuracy is the kept model's: recompute it from the logged model
        model = load_model(run.data.tags[MODEL_URI_TAG])
        accuracy = float((predict_logits(model, test_x).argmax(1).numpy() == test_y).mean())
        assert row["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
        curve = client.get_metric_history(run_id, "test_accuracy")
        if run.data.params["log_test_curve"] == "True":
            last = max(curve, key=lambda m: m.step)
            assert last.step == 3 and row["last_epoch_test_accuracy"] == last.value
        else:
            assert math.isnan(row["last_epoch_test_accuracy"])

    # the files: markdown, a CSV holding the same table, the figure; and the same files as artifacts
    directory = tmp_path / "reports" / "small"
    csv = pd.read_csv(directory / "leaderboard.csv")
    assert list(csv["run_id"]) == list(report["table"]["run_id"])
    np.testing.assert_allclose(csv["test_accuracy"], report["table"]["test_accuracy"])
    for name in table["run"]:
        assert f"| {name} |" in (directory / "leaderboard.md").read_text()
    assert (directory / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(report["run_id"], "report")}
    assert logged == {f"report/{f}" for f in ("leaderboard.md", "leaderboard.csv", "accuracy_curves.png")}
    assert client.get_run(report["run_id"]).data.tags["pipeline.role"] == "report"


def test_a_second_report_leaves_the_first_out(small_experiment, tmp_path):
    first = write_report("small", tmp_path / "a")
    second = write_report("small", tmp_path / "b")
    assert first["run_id"] != second["run_id"]
    pd.testing.assert_frame_equal(first["table"], second["table"])


def test_unknown_and_empty_experiments_are_refused(mlflow_store, tmp_path):
    mlflow.create_experiment("empty")
    with pytest.raises(PipelineError, match=r"no MLflow experiment named 'nope'.*experiments there: .*empty"):
        write_report("nope", tmp_path)
    with pytest.raises(PipelineError, match="experiment 'empty' has no runs"):
        write_report("empty", tmp_path)


def test_a_parameter_that_only_left_out_runs_logged_is_not_reported(mlflow_store, tmp_path):
    # A run the report leaves out (an experiment file's parent, an earlier report) logged lr; the others did not.
    experiment_id = mlflow.create_experiment("mixed")
    with mlflow.start_run(experiment_id=experiment_id, run_name="parent", tags={ROLE_TAG: "experiment"}):
        mlflow.log_param("lr", 0.1)
    with mlflow.start_run(experiment_id=experiment_id, run_name="compared"):
        mlflow.log_metric("best_val_accuracy", 0.8)
    report = write_report("mixed", tmp_path / "reports")
    assert list(report["table"]["run"]) == ["compared"] and "lr" not in report["table"]
    assert "Parameters shared by all runs" not in report["markdown"]


TRAINED = """
    experiment: trained
    entry_point: train
    data: {{limit: {limit}}}
    params: {{epochs: 20, patience: 0}}
    grid:
      - {{lr: [0.5, 0.001]}}
"""
# a limit from a grid far too coarse: one heavy weight decay, solved exactly
COARSE_LIMIT = """
    experiment: limit
    entry_point: convex_optimum
    data: {limit: 400}
    params: {weight_decays: [1.0], finer_per_decade: 0, max_iter: 300}
"""


@pytest.mark.slow
def test_runs_above_the_limit_on_the_same_split_are_flagged(mlflow_store, real_data_dir, tmp_path):
    def run(name, text):
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return run_experiment(load_spec(path))["run_ids"]

    (limit_run,) = run("limit", COARSE_LIMIT)
    same, other = run("same", TRAINED.format(limit=400)), run("other", TRAINED.format(limit=401))
    metrics = MlflowClient().get_run(limit_run).data.metrics
    assert metrics["optimum_converged"] == 1
    limit = metrics["optimum_val_accuracy"]

    report = write_report("trained", tmp_path / "reports")
    table = report["table"].set_index("run_id")
    val = table["best_val_accuracy"]
    # lr 0.5 beats this limit and lr 0.001 does not, on 400 validation images and on 401 alike
    assert [val[r] > limit for r in same] == [val[r] > limit for r in other] == [True, False]
    assert [table.loc[r, "above_limit"] for r in same] == [True, False]
    assert all(table.loc[r, "above_limit"] is None for r in other)  # another validation split: no limit
    (note,) = [line for line in report["markdown"].splitlines() if "above the model class's limit" in line]
    assert f"val {limit:.4f}, convex_optimum run {limit_run}" in note and "that limit is wrong" in note
    assert pd.read_csv(tmp_path / "reports" / "trained" / "leaderboard.csv")["above_limit"].sum() == 1
