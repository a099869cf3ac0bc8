"""Benchmark: ``tune``'s default against the same study written as optuna-examples writes it.

The peer (``bench/peer_study.py``) is optuna-examples' ``pytorch/pytorch_simple.py`` for the softmax
regression: torch DataLoaders, one trial at a time with ``study.optimize``, each trial logged to MLflow
afterwards as its MLflow variant does. Ours is ``python -m pipeline tune`` with its defaults (trials side
by side, per-epoch curves and the model logged per trial), through ``side_by_side.run_study``. Both read
the same prepared split, search the same space with the same seed and pruner, and each is its own process
on fresh temporary stores (interpreter start included), so both are timed alike.

Figures: trials per minute and the best validation accuracy of each, their ratio and gap; and the time of
``tune --model mlp``'s study (one trial at a time: the MLP has no stacked training), ours only.

The full size is the issue's: 100 trials on the full split. ``BENCH_PEER_TRIALS``, ``BENCH_PEER_LIMIT``
and ``BENCH_PEER_MLP_TRIALS`` cut it for a machine that cannot spare the hours (docs/benchmarks.md says
which size was measured).
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import Result, subprocess_env
from bench.side_by_side import run_study
from pipeline.config import DataConfig
from pipeline.core.splits import prepare_splits
from pipeline.study_config import SearchSpace

SPACE = SearchSpace()
STUDY = {"trials": 100, "mlp_trials": 100, "seed": 0, "limit": 0,
         "epochs_low": SPACE.epochs_low, "epochs_high": SPACE.epochs_high}
QUICK_STUDY = {"trials": 4, "mlp_trials": 2, "seed": 0, "limit": 500, "epochs_low": 1, "epochs_high": 2}
CUTS = ("trials", "mlp_trials", "limit")  # what the BENCH_PEER_* variables may change


def sized(study: dict) -> dict:
    """``study`` with the sizes that ``BENCH_PEER_<NAME>`` variables set."""
    return {**study, **{name: int(os.environ[f"BENCH_PEER_{name.upper()}"]) for name in CUTS
                        if f"BENCH_PEER_{name.upper()}" in os.environ}}


def run_peer(study: dict, data: Path, tmp: Path, data_dir: str | None) -> dict:
    """One timed peer process with its own MLflow store; its wall time and what its study reached."""
    tmp.mkdir()
    command = ["python", "-m", "bench.peer_study", "--data", str(data), "--trials", str(study["trials"]),
               "--seed", str(study["seed"]), "--epochs-low", str(study["epochs_low"]),
               "--epochs-high", str(study["epochs_high"])]
    start = time.perf_counter()
    done = subprocess.run(command, env=subprocess_env(f"sqlite:///{tmp / 'mlflow.db'}", data_dir),
                          capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"wall_s": wall_s, **json.loads(done.stdout.splitlines()[-1])}


def run(quick: bool, data_dir: str | None) -> list[Result]:
    study = QUICK_STUDY if quick else sized(STUDY)
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        tmp = Path(tmp)
        splits, prepared, _ = prepare_splits(DataConfig(data_dir=data_dir, limit=study["limit"]),
                                             cache_root=tmp / "prepared")
        peer = run_peer(study, prepared, tmp / "peer", data_dir)
        ours = run_study(study, 0, study["seed"], prepared, tmp / "ours", data_dir)  # 0: the model's own K
        mlp = run_study({**study, "trials": study["mlp_trials"]}, 1, study["seed"], prepared, tmp / "mlp",
                        data_dir, model="mlp")

    metrics = {"trials": study["trials"], "train_images": len(splits.train_y), "val_images": len(splits.val_y)}
    for name, result in (("peer", peer), ("ours", ours)):
        metrics.update({f"{name}_wall_s": result["wall_s"],
                        f"{name}_trials_per_min": study["trials"] / (result["wall_s"] / 60),
                        f"{name}_best_val_accuracy": result["best_val_accuracy"],
                        f"{name}_completed": result["completed"], f"{name}_pruned": result["pruned"]})
    metrics["peer_mlflow_runs"] = peer["mlflow_runs"]  # one per trial, as MLflowCallback logged them
    metrics["trials_per_min_ratio_x"] = metrics["ours_trials_per_min"] / metrics["peer_trials_per_min"]
    metrics["best_val_accuracy_gap"] = metrics["ours_best_val_accuracy"] - metrics["peer_best_val_accuracy"]
    metrics.update({"mlp_trials": study["mlp_trials"], "mlp_wall_s": mlp["wall_s"],
                    "mlp_trials_per_min": study["mlp_trials"] / (mlp["wall_s"] / 60),
                    "mlp_best_val_accuracy": mlp["best_val_accuracy"]})
    data_text = f"a {study['limit']}-image slice" if study["limit"] else "the full split"
    return [Result("peer", quick=quick, metrics=metrics, note=(
        f"{study['trials']} trials, seed {study['seed']}, epochs {study['epochs_low']}-{study['epochs_high']}, "
        f"median pruner, on {data_text}: `python -m bench.peer_study` (DataLoader, study.optimize, one MLflow "
        "run per trial) against `python -m pipeline tune --test-best false` (its default side by side); "
        f"then `tune --model mlp --side-by-side 1` with {study['mlp_trials']} trials; each its own process on "
        "fresh sqlite stores, wall time including interpreter start"))]
