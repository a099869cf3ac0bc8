"""Seeds and uncertainty in the report, on a real sqlite store: every number is recomputed from the logged
models' own predictions on the real test images (scipy's Wilson interval and binomial test as oracles)."""

import textwrap

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from scipy.stats import binomtest

from pipeline.config import DataConfig
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import prepare_splits
from pipeline.experiment_files.spec import load_spec
from pipeline.names import MODEL_URI_TAG, POINT_TAG, SEED_TAG
from pipeline.reports.leaderboard import write_report
from pipeline.steps.experiment import run_experiment
from pipeline.tracking.safe_loading import load_model

LIMIT = 400
REFERENCE = """
    experiment: reference
    entry_point: train
    data: {limit: 400}
    params: {epochs: 2, patience: 0}
    seeds: [0, 1]
"""
POINTS = """
    experiment: points
    entry_point: train
    data: {limit: 400}
    params: {epochs: 2, patience: 0}
    grid: {lr: [0.1, 5.0]}
    seeds: [0, 1]
"""


def run_file(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return run_experiment(load_spec(path))


@pytest.mark.slow
def test_seeded_points_intervals_and_paired_tests(tmp_path, mlflow_store, real_data_dir):
    reference = run_file(tmp_path, "reference", REFERENCE)
    points = run_file(tmp_path, "points", POINTS)
    client = MlflowClient()
    runs = {r: client.get_run(r) for r in points["run_ids"]}
    assert sorted((r.data.tags[POINT_TAG], r.data.tags[SEED_TAG]) for r in runs.values()) == [
        ('{"lr": 0.1}', "0"), ('{"lr": 0.1}', "1"), ('{"lr": 5.0}', "0"), ('{"lr": 5.0}', "1")]
    assert all(r.data.params["seed"] == r.data.tags[SEED_TAG] for r in runs.values())  # the seed acted

    test_x, test_y = prepare_splits(DataConfig(limit=LIMIT))[0].arrays("test")

    def predicted(run):
        return predict_logits(load_model(run.data.tags[MODEL_URI_TAG]), test_x).argmax(1).numpy()

    # each run's interval: scipy's Wilson interval of its model's accuracy on the test images
    for run in runs.values():
        correct = int((predicted(run) == test_y).sum())
        ci = binomtest(correct, len(test_y)).proportion_ci(method="wilson")
        assert run.data.metrics["test_accuracy"] == correct / len(test_y)
        assert run.data.metrics["test_accuracy_ci_low"] == pytest.approx(ci.low)
        assert run.data.metrics["test_accuracy_ci_high"] == pytest.approx(ci.high)

    report = write_report("points", tmp_path / "reports", reference="reference")
    table = report["points"].set_index("point")
    assert set(table.index) == {"lr=0.1", "lr=5.0"}
    ref_runs = {client.get_run(r).data.tags[SEED_TAG]: client.get_run(r) for r in reference["run_ids"]}
    for point, lr in (("lr=0.1", "0.1"), ("lr=5.0", "5.0")):
        seeds = {r.data.tags[SEED_TAG]: r for r in runs.values() if r.data.params["lr"] == lr}
        accuracies = [seeds[s].data.metrics["test_accuracy"] for s in ("0", "1")]
        assert table.loc[point, "test_accuracy"] == f"{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}"
        # McNemar per seed, recomputed from the two models' predictions on the same images
        cells, significant_up, significant_down = [], [], []
        for seed in ("0", "1"):
            right, ref_right = predicted(seeds[seed]) == test_y, predicted(ref_runs[seed]) == test_y
            b, c = int((right & ~ref_right).sum()), int((ref_right & ~right).sum())
            p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
            cells.append(f"s{seed}: {b}/{c} p={p:.2g}")
            significant_up.append(p < 0.05 and b > c)
            significant_down.append(p < 0.05 and b < c)
        assert table.loc[point, "vs_reference"] == "; ".join(cells)
        expected = "better" if all(significant_up) else "worse" if all(significant_down) else \
            "no significant difference"
        assert table.loc[point, "verdict"] == expected
    # lr 0.1 for 2 epochs is the reference recipe itself: the same model, so no discordant image at all
    assert table.loc["lr=0.1", "vs_reference"] == "s0: 0/0 p=1; s1: 0/0 p=1"
    assert table.loc["lr=0.1", "verdict"] == "no significant difference"
    assert "## Over seeds" in report["markdown"] and "test_ci_low" in report["markdown"]
    assert (tmp_path / "reports" / "points" / "seeds.csv").is_file()


@pytest.mark.slow
def test_a_report_without_the_reference_says_so(tmp_path, mlflow_store, real_data_dir):
    run_file(tmp_path, "points", POINTS.replace("lr: [0.1, 5.0]", "lr: [0.1]"))
    report = write_report("points", tmp_path / "reports", reference="no-such-experiment")
    assert "No paired test: the store has no finished seeded runs of experiment 'no-such-experiment'" \
        in report["markdown"]
    assert list(report["points"]["verdict"]) == [""]
    assert mlflow.get_experiment_by_name("no-such-experiment") is None  # nothing was created for it
