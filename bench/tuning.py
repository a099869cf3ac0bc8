"""Benchmark 3: a fixed Optuna study with ``--workers 1`` and ``--workers 2``, timed end to end.

Each study runs ``python -m pipeline tune`` as its own process, on a fresh temporary sqlite MLflow
store and Optuna storage, and is timed from launch to exit (interpreter start and imports included).
Where the time went is read back from the records afterwards, without instrumenting anything:

- training: each trial's MLflow run from its start to its last logged epoch (the per-epoch
  ``log_metrics`` and pruner reports to the Optuna storage included; benchmark 1 times the former);
- tracking after training: from the last epoch to the run's end (curves figure, model, summary);
- Optuna outside the runs: each trial's Optuna duration less its MLflow run (sampling, storage);
- the rest of the worker-seconds: interpreter start, imports, data loading, study creation and the
  figures and trials table logged on the parent run at the end.

The same runs give the peak memory of ``tune`` (benchmark 4), sampled as in ``bench.memory``.

Each worker trains one trial at a time (``--side-by-side 1``): the sums above add up trial runs that
never overlap within a worker. Trials side by side overlap (8 runs open at once), which would make these
sums exceed the wall time; that mode has its own benchmark (``bench.side_by_side``).
"""

import tempfile
from pathlib import Path

import optuna
from mlflow import MlflowClient

from bench.common import Result, subprocess_env
from bench.memory import check_succeeded, run_sampled
from pipeline.config import DataConfig
from pipeline.core.splits import prepare_splits
from pipeline.names import RUN_ID_ATTR

STUDY = {"trials": 30, "epochs_low": 5, "epochs_high": 30, "sampler": "tpe", "pruner": "median", "seed": 0,
         "side_by_side": 1}
QUICK_STUDY = {**STUDY, "trials": 2, "epochs_low": 1, "epochs_high": 2}
TARGET_MINUTES = 3.0


def tune_command(study: dict, workers: int, data: Path, storage: str) -> list[str]:
    return ["python", "-m", "pipeline", "tune", "--data", str(data), "--storage", storage,
            "--study-name", "bench", "--workers", str(workers), "--trials", str(study["trials"]),
            "--epochs-low", str(study["epochs_low"]), "--epochs-high", str(study["epochs_high"]),
            "--sampler", study["sampler"], "--pruner", study["pruner"], "--seed", str(study["seed"]),
            "--side-by-side", str(study["side_by_side"]), "--test-best", "false"]


def where_time_went(tracking_uri: str, storage: str) -> dict:
    """Seconds summed over trials: training, tracking after training, Optuna outside the runs."""
    client = MlflowClient(tracking_uri)
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
    totals = {"trial_s": 0.0, "training_s": 0.0, "tracking_after_training_s": 0.0, "optuna_outside_runs_s": 0.0,
              "epochs_trained": 0, "pruned": 0, "completed": 0}
    for trial in trials:
        if trial.datetime_complete is None or RUN_ID_ATTR not in trial.user_attrs:
            continue
        run = client.get_run(trial.user_attrs[RUN_ID_ATTR]).info
        epochs = client.get_metric_history(run.run_id, "val_accuracy")
        last_epoch_ms = max(m.timestamp for m in epochs)
        trial_s = (trial.datetime_complete - trial.datetime_start).total_seconds()
        totals["trial_s"] += trial_s
        totals["training_s"] += (last_epoch_ms - run.start_time) / 1000
        totals["tracking_after_training_s"] += (run.end_time - last_epoch_ms) / 1000
        totals["optuna_outside_runs_s"] += trial_s - (run.end_time - run.start_time) / 1000
        totals["epochs_trained"] += len(epochs)
        totals["pruned"] += trial.state == optuna.trial.TrialState.PRUNED
        totals["completed"] += trial.state == optuna.trial.TrialState.COMPLETE
    return totals


def run_study(study: dict, workers: int, data: Path, tmp: Path, data_dir: str | None) -> dict:
    """One timed, memory-sampled ``tune`` process on fresh stores; its figures."""
    tmp.mkdir()
    tracking_uri, storage = f"sqlite:///{tmp / 'mlflow.db'}", f"sqlite:///{tmp / 'optuna.db'}"
    command = tune_command(study, workers, data, storage)
    sampled = run_sampled(command, tmp, subprocess_env(tracking_uri, data_dir))
    check_succeeded(sampled, " ".join(command))
    spent = where_time_went(tracking_uri, storage)
    return {
        "wall_s": sampled.wall_s, "trials_per_min": study["trials"] / (sampled.wall_s / 60),
        **spent,
        # compare with benchmark 1's epoch: the difference is per-epoch logging and pruner reports
        "training_s_per_epoch": spent["training_s"] / max(spent["epochs_trained"], 1),
        "other_worker_s": workers * sampled.wall_s - spent["trial_s"],
        "peak_tree_pss_mb": sampled.peak_tree_pss_mb, "largest_process_mb": sampled.largest_process_mb,
        "at_peak": sampled.at_peak,
    }


def run(quick: bool, data_dir: str | None) -> list[Result]:
    study = QUICK_STUDY if quick else STUDY
    with tempfile.TemporaryDirectory(prefix="bench-tuning-") as tmp:
        tmp = Path(tmp)
        data_cfg = DataConfig(data_dir=data_dir, limit=500 if quick else 0)
        prepared = prepare_splits(data_cfg, cache_root=tmp / "prepared")[1]
        by_workers = {w: run_study(study, w, prepared, tmp / f"workers-{w}", data_dir) for w in (1, 2)}

    metrics = {"trials": study["trials"], "max_epochs_per_trial": study["epochs_high"]}
    for w, figures in by_workers.items():
        metrics.update({f"workers{w}_{name}": value for name, value in figures.items() if name != "at_peak"})
    scaling = by_workers[2]["trials_per_min"] / by_workers[1]["trials_per_min"]
    metrics["scaling_2_over_1_workers_x"] = scaling
    best_minutes = min(f["wall_s"] for f in by_workers.values()) / 60
    result = Result("tuning", quick=quick, metrics=metrics, note=(
        f"`python -m pipeline tune` with {study['sampler']} sampler, {study['pruner']} pruner, seed "
        f"{study['seed']}, epochs {study['epochs_low']}-{study['epochs_high']}, one trial at a time per worker, "
        f"test_best false, on {'a 500-image slice' if quick else 'the full split'}, fresh sqlite MLflow store and "
        "Optuna storage per run; wall time includes interpreter start. 1 and 2 workers sample different "
        "trials, so compare epochs_trained too"
    ))
    result.check("study_time", best_minutes, TARGET_MINUTES, False,
                 f"the {study['trials']}-trial study in < {TARGET_MINUTES:g} minutes")
    tune_memory = Result("memory_tune", quick=quick, metrics={
        "workers2_peak_tree_pss_mb": by_workers[2]["peak_tree_pss_mb"],
        "workers2_largest_process_mb": by_workers[2]["largest_process_mb"],
        "workers1_peak_tree_pss_mb": by_workers[1]["peak_tree_pss_mb"],
    }, details={"PSS of each process at the peak, 2 workers (MB)": by_workers[2]["at_peak"]},
        note="peak memory of the tuning runs above, process tree sampled every 0.1 s from /proc")
    return [result, tune_memory]
