"""Smoke tests of the benchmarks (``bench/``), and a check of the memory sampler they use.

No timing is asserted anywhere: the machine is shared and a ``--quick`` run's figures mean nothing.
What is checked is that each benchmark runs on a tiny slice, prints its JSON line and its table, and
saves results whose figures agree with each other.
"""

import json
import subprocess
import sys

import pytest

from bench.memory import run_sampled
from bench.photos import BACKGROUNDS
from tests.helpers import REPO


def run_bench(only: list[str], tmp_path, env, data_dir) -> tuple[str, dict]:
    """``python -m bench --quick --only ...``; returns its stdout and the results file it wrote."""
    results = tmp_path / "latest.json"
    args = [arg for name in only for arg in ("--only", name)]
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", *args, "--data-dir", str(data_dir),
                           "--results", str(results)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(results.read_text())


def check_report(stdout: str, results: dict) -> None:
    """Every benchmark printed its JSON line (the same as the saved entry) and its table."""
    printed = {entry["benchmark"]: entry for entry in map(json.loads, (line for line in stdout.splitlines()
                                                                        if line.startswith("{")))}
    assert printed == results
    for name, entry in results.items():
        assert entry["quick"] is True and entry["machine"]["cores"] >= 1
        assert f"\n{name} (quick" in stdout  # the table's title
        for target in entry["targets"].values():
            assert isinstance(target["met"], bool) and target["target"]


def test_throughput_and_floor_benchmarks_run_on_a_slice(tmp_path, subprocess_env, real_data_dir):
    stdout, results = run_bench(["throughput"], tmp_path, subprocess_env, real_data_dir)
    assert set(results) == {"epoch_throughput", "compute_floor"}
    check_report(stdout, results)

    speed = results["epoch_throughput"]["metrics"]
    assert speed["train_images"] == speed["val_images"] == 1000  # both sides trained on the same slice
    assert speed["book_epochs_timed"] >= 2 and speed["project_epochs_timed"] >= 2
    assert speed["train_throughput_ratio_x"] == pytest.approx(
        speed["project_train_images_per_s"] / speed["book_train_images_per_s"])
    assert speed["tracking_cost_per_epoch_pct"] == pytest.approx(
        100 * (speed["project_epoch_tracked_s"] / speed["project_epoch_untracked_s"] - 1))
    assert speed["tracking_cost_per_run_s"] > 0  # logging the model alone takes time

    floor = results["compute_floor"]["metrics"]
    assert floor["full_batch_forward_backward_s"] > 0
    assert floor["epoch_over_floor_x"] == pytest.approx(
        floor["project_epoch_untracked_s"] / floor["full_batch_forward_backward_s"])
    assert set(results["compute_floor"]["targets"]) == {"floor"}


@pytest.mark.slow
def test_memory_and_tuning_benchmarks_run_on_a_slice(tmp_path, subprocess_env, real_data_dir):
    stdout, results = run_bench(["memory", "tuning"], tmp_path, subprocess_env, real_data_dir)
    assert set(results) == {"memory_main", "tuning", "memory_tune"}
    check_report(stdout, results)

    memory = results["memory_main"]["metrics"]
    assert 100 < memory["peak_tree_pss_mb"] <= memory["peak_tree_rss_mb"]  # torch alone is over 100 MB

    tuning = results["tuning"]["metrics"]
    for w in (1, 2):
        assert tuning[f"workers{w}_completed"] + tuning[f"workers{w}_pruned"] == tuning["trials"] == 2
        # read back from the records: each MLflow run lies inside its Optuna trial, each trial inside the study
        for part in ("training_s", "tracking_after_training_s", "optuna_outside_runs_s"):
            assert tuning[f"workers{w}_{part}"] >= -0.01  # (MLflow keeps milliseconds)
        assert 0 < tuning[f"workers{w}_trial_s"] < w * tuning[f"workers{w}_wall_s"]
        assert tuning[f"workers{w}_epochs_trained"] >= 2
    # two worker processes of their own: the tree holds more than the one-worker run's single process
    assert results["memory_tune"]["metrics"]["workers2_peak_tree_pss_mb"] > 100


def test_memory_sampler_counts_the_whole_process_tree(tmp_path):
    """A child that allocates 200 MB inside a grandchild: the tree's peak must include it."""
    grandchild = "import time; block = bytearray(200 * 2**20); time.sleep(1.5)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    sampled = run_sampled([sys.executable, "-c", child], tmp_path, env=None, interval=0.05)
    assert sampled.returncode == 0
    assert sampled.peak_tree_pss_mb >= 200 and sampled.peak_tree_rss_mb >= 200
    assert sampled.largest_process_mb >= 200  # the kernel's figure for the grandchild, via wait4
    assert len(sampled.at_peak) == 2  # child and grandchild


@pytest.mark.slow
def test_side_by_side_benchmark_runs_on_a_slice(tmp_path, subprocess_env, real_data_dir):
    stdout, results = run_bench(["side_by_side"], tmp_path, subprocess_env, real_data_dir)
    assert set(results) == {"side_by_side_epoch", "side_by_side_study"}
    check_report(stdout, results)

    epoch = results["side_by_side_epoch"]["metrics"]
    assert epoch["fastest_k"] in (1, 2, 4, 8, 16, 32) and epoch[f"k{epoch['fastest_k']}_epoch_s_per_trial"] > 0
    study = results["side_by_side_study"]["metrics"]
    assert study["trials"] == 4 and study["k"] == 2
    for mode in ("sequential", "side_by_side"):
        assert study[f"{mode}_trials_per_min"] == pytest.approx(4 / (study[f"{mode}_wall_s_mean"] / 60))
        assert 0.1 < study[f"{mode}_best_val_accuracy_min"] <= study[f"{mode}_best_val_accuracy_max"] <= 1
    ratio = study["side_by_side_trials_per_min"] / study["sequential_trials_per_min"]
    assert study["speedup_x"] == pytest.approx(ratio)
    assert set(results["side_by_side_study"]["targets"]) == {"speedup", "quality"}


@pytest.mark.slow
def test_photos_benchmark_runs_on_a_slice(tmp_path, subprocess_env, real_data_dir):
    stdout, results = run_bench(["photos"], tmp_path, subprocess_env, real_data_dir)
    assert set(results) == {"photos"}
    check_report(stdout, results)

    entry = results["photos"]
    assert set(entry["details"]) == {"clean"} | {b.key for b in BACKGROUNDS}
    for key, row in entry["details"].items():  # every garment on every background, each counted once
        assert row["photos"] == entry["metrics"]["garments_per_background"] == 40
        assert entry["metrics"][f"{key}_accuracy"] == row["accuracy"]
    assert set(entry["targets"]) == {f"{b.key}_kept" for b in BACKGROUNDS} | {"confident_wrong"}
    assert "\n| flat grey | " in stdout  # the table for the docs


@pytest.mark.slow
def test_peer_benchmark_runs_on_a_slice(tmp_path, subprocess_env, real_data_dir):
    stdout, results = run_bench(["peer"], tmp_path, subprocess_env, real_data_dir)
    assert set(results) == {"peer"}
    check_report(stdout, results)

    peer = results["peer"]["metrics"]
    assert peer["trials"] == 4 and peer["mlp_trials"] == 2
    assert peer["train_images"] == peer["val_images"] == 500  # both studies read the same prepared slice
    for side in ("peer", "ours"):
        assert peer[f"{side}_completed"] + peer[f"{side}_pruned"] == peer["trials"]
        assert peer[f"{side}_trials_per_min"] == pytest.approx(4 / (peer[f"{side}_wall_s"] / 60))
        assert 0.1 < peer[f"{side}_best_val_accuracy"] <= 1  # both learned: better than chance
    assert peer["peer_mlflow_runs"] == 4  # the peer logged each trial to MLflow, as the example does
    assert peer["trials_per_min_ratio_x"] == pytest.approx(peer["ours_trials_per_min"] / peer["peer_trials_per_min"])
    assert peer["best_val_accuracy_gap"] == pytest.approx(peer["ours_best_val_accuracy"]
                                                          - peer["peer_best_val_accuracy"])
    assert peer["mlp_trials_per_min"] == pytest.approx(2 / (peer["mlp_wall_s"] / 60))
    assert 0 < peer["mlp_best_val_accuracy"] <= 1
