"""Benchmark 5: a study's trials one at a time against side by side (``tune --side-by-side K``).

Two parts:

1. Cost of an epoch per trial for K models stacked (``pipeline.core.stacked.fit_stacked``)
   against one model alone (``pipeline.core.training.fit``): what the default K is chosen from.
2. The same 100-trial study (default search space, sampler and pruner) run with ``--side-by-side 1``
   and ``--side-by-side K``, for 3 sampler seeds: wall time, trials per minute, and the best validation
   accuracy each study reached, so that search quality is compared as well as speed. Each study is its
   own ``python -m pipeline tune`` process on fresh temporary stores (interpreter start included); the
   two modes alternate seed after seed so that load from other processes falls on both.
"""

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import optuna

from bench.common import Result, subprocess_env
from pipeline.config import DEFAULT_MODEL, DataConfig, TrainConfig
from pipeline.core.models import build_model
from pipeline.core.splits import prepare_splits
from pipeline.core.stacked import fit_stacked
from pipeline.core.training import Tensors, fit
from pipeline.study_config import SearchSpace

SPACE = SearchSpace()
# K under test: where part 1's cost per trial-epoch stops falling fast (docs/benchmarks.md); the study
# would gain little from a larger K and lose feedback: K trials in flight are sampled and pruned without
# each other's results
STUDY = {"trials": 100, "seeds": (0, 1, 2), "k": 8, "limit": 0,
         "epochs_low": SPACE.epochs_low, "epochs_high": SPACE.epochs_high}
QUICK_STUDY = {"trials": 4, "seeds": (0,), "k": 2, "limit": 500, "epochs_low": 1, "epochs_high": 2}
STACK_SIZES = (1, 2, 4, 8, 16, 32)
TARGET_SPEEDUP = 4.0


def epoch_cost_per_trial(tensors: Tensors, epochs: int) -> dict:
    """Seconds per epoch per trial: one model with ``fit``, then K stacked; the minimum is the best K."""
    cfg = TrainConfig(epochs=epochs, patience=0)
    fit(build_model(cfg), tensors, TrainConfig(epochs=1))  # warm-up: torch.optim's first use imports more torch
    start = time.perf_counter()
    fit(build_model(cfg), tensors, cfg)
    costs = {"alone": (time.perf_counter() - start) / epochs}
    for k in STACK_SIZES:
        start = time.perf_counter()
        fit_stacked([cfg] * k, tensors)
        costs[k] = (time.perf_counter() - start) / epochs / k
    return costs


def run_study(study: dict, k: int, seed: int, data: Path, tmp: Path, data_dir: str | None,
              model: str = DEFAULT_MODEL) -> dict:
    """One timed ``tune`` process on fresh stores; its wall time and the best val accuracy it reached.
    ``k`` 0 is the model's own side by side (``TuneConfig.side_by_side``)."""
    tmp.mkdir()
    tracking_uri, storage = f"sqlite:///{tmp / 'mlflow.db'}", f"sqlite:///{tmp / 'optuna.db'}"
    command = ["python", "-m", "pipeline", "tune", "--data", str(data), "--storage", storage,
               "--study-name", "bench", "--trials", str(study["trials"]), "--seed", str(seed),
               "--epochs-low", str(study["epochs_low"]), "--epochs-high", str(study["epochs_high"]),
               "--side-by-side", str(k), "--model", model, "--test-best", "false"]
    start = time.perf_counter()
    done = subprocess.run(command, env=subprocess_env(tracking_uri, data_dir), capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    return {"wall_s": wall_s, "best_val_accuracy": max(t.value for t in trials if t.value is not None),
            "pruned": states.count(optuna.trial.TrialState.PRUNED),
            "completed": states.count(optuna.trial.TrialState.COMPLETE)}


def compare(study: dict, data_dir: str | None, quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="bench-side-by-side-") as tmp:
        tmp = Path(tmp)
        splits, prepared, _ = prepare_splits(DataConfig(data_dir=data_dir, limit=study["limit"]),
                                             cache_root=tmp / "prepared")
        costs = epoch_cost_per_trial(Tensors.from_splits(splits), epochs=1 if quick else 3)
        runs = {1: [], study["k"]: []}
        for seed in study["seeds"]:
            for k in runs:
                runs[k].append(run_study(study, k, seed, prepared, tmp / f"k{k}-seed{seed}", data_dir))

    stacked = {k: v for k, v in costs.items() if k != "alone"}
    best_k = min(stacked, key=stacked.get)
    epoch_cost = Result("side_by_side_epoch", quick=quick, metrics={
        "alone_epoch_s": costs["alone"], **{f"k{k}_epoch_s_per_trial": v for k, v in stacked.items()},
        "fastest_k": best_k, "fastest_over_alone_x": costs["alone"] / stacked[best_k]},
        note=f"one epoch of {len(splits.train_y):,} images, per trial: fit alone, then fit_stacked with K "
             "copies of the seed recipe; median-free single runs")

    metrics = {"trials": study["trials"], "seeds": len(study["seeds"]), "k": study["k"]}
    for k, name in ((1, "sequential"), (study["k"], "side_by_side")):
        walls = [r["wall_s"] for r in runs[k]]
        bests = [r["best_val_accuracy"] for r in runs[k]]
        metrics.update({f"{name}_wall_s_mean": statistics.mean(walls),
                        f"{name}_trials_per_min": study["trials"] / (statistics.mean(walls) / 60),
                        f"{name}_best_val_accuracy_mean": statistics.mean(bests),
                        f"{name}_best_val_accuracy_min": min(bests), f"{name}_best_val_accuracy_max": max(bests),
                        f"{name}_pruned_total": sum(r["pruned"] for r in runs[k])})
    speedup = metrics["side_by_side_trials_per_min"] / metrics["sequential_trials_per_min"]
    metrics["speedup_x"] = speedup
    # noise: how far the best accuracy of the same mode moves between sampler seeds
    noise = statistics.stdev(r["best_val_accuracy"] for r in runs[1]) if len(runs[1]) > 1 else 0.0
    gap = metrics["side_by_side_best_val_accuracy_mean"] - metrics["sequential_best_val_accuracy_mean"]
    metrics.update({"best_val_accuracy_gap": gap, "sequential_seed_stdev": noise})
    data_text = f"a {study['limit']}-image slice" if study["limit"] else "the full split"
    study_result = Result("side_by_side_study", quick=quick, metrics=metrics, details={
        f"best val accuracy per seed {study['seeds']}": {k: [round(r["best_val_accuracy"], 4) for r in v]
                                                         for k, v in runs.items()}},
        note=(f"`python -m pipeline tune --trials {study['trials']} --side-by-side 1|{study['k']}` with the "
              f"default tpe sampler and median pruner, epochs {study['epochs_low']}-{study['epochs_high']}, "
              f"seeds {study['seeds']}, test_best false, on "
              f"{data_text}; fresh sqlite "
              "stores per study; wall time includes interpreter start"))
    study_result.check("speedup", speedup, TARGET_SPEEDUP, True,
                       f"side by side >= {TARGET_SPEEDUP:g}x the trials per minute")
    study_result.check("quality", gap, -noise, True,
                       "mean best val accuracy over seeds no worse than sequential's, beyond one seed-to-seed stdev")
    return [epoch_cost, study_result]


def run(quick: bool, data_dir: str | None) -> list[Result]:
    return compare(QUICK_STUDY if quick else STUDY, data_dir, quick)
