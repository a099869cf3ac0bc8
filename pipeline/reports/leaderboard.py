"""The report of an MLflow experiment: a leaderboard and the curves of every run, built as people would by hand.

``write_report(experiment)`` pulls the runs of one MLflow experiment with ``mlflow.search_runs``
(a pandas DataFrame, one row per run), adds what only the metric histories know, and writes
``reports/<experiment>/leaderboard.md``, ``leaderboard.csv`` and ``accuracy_curves.png``; the same
files are logged as artifacts of a run named "report" in that experiment.

Two test accuracies, and why: a run with the test curve on (``log_test_curve``) logs ``test_accuracy``
at every epoch (steps 1..N), and its evaluation (``pipeline.tracking.evaluation.evaluate_on_test``) logs the kept
model's ``test_accuracy`` without a step, i.e. at step 0. MLflow's "latest value" is the one with the
highest step, so ``search_runs`` shows the *last epoch's* value; the leaderboard reads the history and
reports both: ``test_accuracy`` (the kept, best-validation model: what the run delivers) and
``last_epoch_test_accuracy`` (what training to the end would have delivered: the overfitting lesson).

Uncertainty: every test accuracy comes with its 95% Wilson interval (``test_ci_low``, ``test_ci_high``);
when the runs repeat grid points over seeds, a second table shows each point's mean ± standard
deviation over seeds and McNemar's paired test against the seed recipe (``pipeline.reports.comparisons``).

The model class's limit: a converged ``convex_optimum`` run anywhere in the store holds the best validation
accuracy softmax regression reaches on its validation split (tag ``pipeline.val_digest``). A run chosen on
the same split that validates higher is flagged (``above_limit``): it shows that limit to be wrong.
"""

import datetime
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from pipeline.core import figures
from pipeline.core.stats import above
from pipeline.errors import PipelineError, short_repr
from pipeline.names import (
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    REPORT_CURVES,
    REPORT_FOLDER,
    ROLE_TAG,
    SEEDS_CSV,
    TRIAL_STATE_TAG,
    VAL_DIGEST_TAG,
)
from pipeline.reports import comparisons
from pipeline.tracking.runs import runs_killed_at_once

KEY_PARAMS = ("lr", "epochs", "weight_decay", "patience", "input_dropout", "augment", "batch_size", "seed")
EVALUATION_STEP = 0  # evaluate_on_test logs without a step; the test curve's steps are the epochs 1..N
SKIPPED_ROLES = ("experiment", "report")  # parent runs of experiment files and earlier reports


def find_runs(experiment_name: str) -> tuple[str, pd.DataFrame]:
    """The experiment's id and its runs (oldest first), without experiment-file parents and reports."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise PipelineError(f"no MLflow experiment named '{experiment_name}' in {mlflow.get_tracking_uri()} "
                            f"(experiments there: {names}); run `python -m pipeline experiment FILE` first "
                            "or set MLFLOW_TRACKING_URI to the store that holds it")
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id], order_by=["attributes.start_time ASC"])
    if f"tags.{ROLE_TAG}" in runs:
        runs = runs[~runs[f"tags.{ROLE_TAG}"].isin(SKIPPED_ROLES)]
    if runs.empty:
        raise PipelineError(f"experiment '{experiment_name}' has no runs to report on yet")
    return experiment.experiment_id, runs.reset_index(drop=True)


def curves(client: MlflowClient, run_id: str) -> dict:
    """The val and test accuracy curves of a run (lists of (epoch, value)) and its evaluation's test accuracy."""
    history = lambda key: sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))  # noqa: E731
    test = history("test_accuracy")
    evaluations = [m.value for m in test if m.step == EVALUATION_STEP]
    return {
        "val": [(m.step, m.value) for m in history("val_accuracy")],
        "test": [(m.step, m.value) for m in test if m.step != EVALUATION_STEP],
        "evaluated_test_accuracy": evaluations[-1] if evaluations else None,  # the latest evaluation
    }


def metric(runs: pd.DataFrame, name: str) -> pd.Series:
    """A metric column, all-missing when no run logged it."""
    return runs.get(f"metrics.{name}", pd.Series(float("nan"), index=runs.index))


def run_status(runs: pd.DataFrame) -> pd.Series:
    """MLflow's status, with Optuna's trial state where the run is a trial ("FINISHED (PRUNED)")."""
    state = runs.get(f"tags.{TRIAL_STATE_TAG}", pd.Series(None, index=runs.index, dtype=object))
    return runs["status"] + state.map(lambda s: f" ({s})" if isinstance(s, str) else "")


def leaderboard(runs: pd.DataFrame, run_curves: list[dict]) -> tuple[pd.DataFrame, dict]:
    """One row per run, best val accuracy first; returns the table and the parameters all runs share."""
    params = [p for p in KEY_PARAMS if f"params.{p}" in runs]
    # A run that lacks a parameter (a tune parent run has no lr of its own) does not make it vary.
    varying = [p for p in params if runs[f"params.{p}"].nunique() > 1]
    given = {p: runs[f"params.{p}"].dropna() for p in params if p not in varying}
    common = {p: values.iloc[0] for p, values in given.items() if not values.empty}  # empty: only left-out runs had it
    # A tune run logs its best trial's test accuracy as best_test_accuracy instead of an evaluation.
    evaluated = pd.Series([c["evaluated_test_accuracy"] for c in run_curves], index=runs.index, dtype=float)
    table = pd.DataFrame({
        "run": runs.get("tags.mlflow.runName", runs["run_id"]),
        "run_id": runs["run_id"],
        **{p: runs[f"params.{p}"] for p in varying},
        "best_val_accuracy": metric(runs, "best_val_accuracy"),
        "test_accuracy": evaluated.fillna(metric(runs, "best_test_accuracy")),
        # the evaluation's 95% interval (a tune run: its best trial's, logged as best_test_accuracy_ci_*)
        **{f"test_ci_{end}": metric(runs, f"test_accuracy_ci_{end}").fillna(
            metric(runs, f"best_test_accuracy_ci_{end}")) for end in ("low", "high")},
        "last_epoch_test_accuracy": [c["test"][-1][1] if c["test"] else float("nan") for c in run_curves],
        "best_epoch": metric(runs, "best_epoch").astype("Int64"),
        "epochs_run": metric(runs, "epochs_run").astype("Int64"),
        "duration_s": (runs["end_time"] - runs["start_time"]).dt.total_seconds(),
        "status": run_status(runs),
    })
    table = table.sort_values("best_val_accuracy", ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True), common


def convex_limits() -> pd.DataFrame:
    """The model class's limit on each validation split (index: the split's digest): the best validation
    accuracy of a converged, finished ``convex_optimum`` run in any experiment of the store, and that run."""
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="metrics.optimum_converged = 1 AND attributes.status = 'FINISHED'")
    digest = f"tags.{VAL_DIGEST_TAG}"
    if runs.empty or digest not in runs:
        return pd.DataFrame(columns=["limit", "limit_run_id"])
    best = runs.dropna(subset=[digest]).sort_values("metrics.optimum_val_accuracy", ascending=False)
    best = best.drop_duplicates(digest).set_index(digest)
    return pd.DataFrame({"limit": best["metrics.optimum_val_accuracy"], "limit_run_id": best["run_id"]})


def flag_above_limit(table: pd.DataFrame, runs: pd.DataFrame, limits: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Column ``above_limit`` where a run's validation split has a limit, and a note per beaten limit."""
    digests = runs.get(f"tags.{VAL_DIGEST_TAG}", pd.Series(None, index=runs.index, dtype=object))
    digest = table["run_id"].map(dict(zip(runs["run_id"], digests)))
    limit = digest.map(limits["limit"])
    if limit.isna().all():
        return table, []
    table = table.assign(above_limit=[above(v, lim) if pd.notna(lim) and pd.notna(v) else None
                                      for v, lim in zip(table["best_val_accuracy"], limit)])
    notes = []
    for split, beating in table[table["above_limit"] == True].groupby(digest):  # noqa: E712 (None is neither)
        notes.append(f"{len(beating)} run{'s' if len(beating) > 1 else ''} ({', '.join(beating['run'].astype(str))}) "
                     f"validate{'' if len(beating) > 1 else 's'} above the model class's limit on the same validation "
                     f"split (val {limits.loc[split, 'limit']:.4f}, convex_optimum run "
                     f"{limits.loc[split, 'limit_run_id']}): that limit is wrong, a solve stopped short or its "
                     "weight-decay grid is too coarse; rerun convex_optimum with a finer grid or more max_iter")
    return table, notes


def cell(value, column: str) -> str:
    """Accuracies to 4 decimals, seconds to 1, parameters (logged as text) to 4 significant digits."""
    if pd.isna(value):
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column == "duration_s" else f"{value:.4f}"
    try:
        return f"{float(value):.4g}" if column in KEY_PARAMS and "." in value else str(value)
    except (TypeError, ValueError):
        return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' own needs the extra ``tabulate`` package); the CSV keeps full precision."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, table.columns)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def markdown_report(experiment_name: str, table: pd.DataFrame, common: dict, points: pd.DataFrame | None = None,
                    notes: list[str] = (), limit_notes: list[str] = ()) -> str:
    shown = table.drop(columns="run_id")
    lines = [f"# Report: {experiment_name}", "",
             f"{len(table)} run{'' if len(table) == 1 else 's'} in {mlflow.get_tracking_uri()}, generated "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}.", ""]
    if common:
        lines += ["Parameters shared by all runs: " + ", ".join(f"{k}={v}" for k, v in common.items()), ""]
    lines += [to_markdown(shown), "",
              "test_accuracy: the kept (best validation) model on the test split, test_ci_low..test_ci_high "
              "its 95% Wilson interval; last_epoch_test_accuracy: the test curve's last epoch, where the run "
              "logged one. Sorted by best_val_accuracy: nothing is chosen by test accuracy. Curves: "
              "accuracy_curves.png.", ""]
    if "above_limit" in table:
        lines += ["above_limit: whether the run validates higher than the model class's limit (the best converged "
                  "convex_optimum run in this store) on the same validation split; empty where that split has none.",
                  ""] + [f"- **{note}**" for note in limit_notes] + ([""] if limit_notes else [])
    if points is not None:
        lines += seeds_section(points, notes)
    return "\n".join(lines)


def seeds_section(points: pd.DataFrame, notes: list[str]) -> list[str]:
    reference = [c for c in points.columns if c.startswith("vs_")]
    lines = ["## Over seeds", "", to_markdown(points[[c for c in points.columns if not c.startswith("_")]]), "",
             "Each grid point's runs over its seeds: mean ± sample standard deviation, best mean validation "
             "accuracy first."]
    if reference:
        lines += [f"{reference[0]}: McNemar's exact test against the seed recipe's run with the same seed, on the "
                  "same test images: sN: images only this point gets right / only the seed recipe gets right, "
                  "and the two-sided p-value. verdict: \"better\" or \"worse\" only when every seed's test is "
                  "significant (p < 0.05) in that direction."]
    return lines + [""] + [f"- {note}" for note in notes] + ([""] if notes else [])


def inside(folder: Path, path: Path) -> Path:
    """``path`` with every link and '..' resolved; refused unless it lies below ``folder``.

    An MLflow experiment may be named anything ('/etc/x', '../../x': the UI takes any name), and a name
    or a link in the way must never make the report write elsewhere.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()) or resolved == folder.resolve():
        raise PipelineError(f"the report would write {short_repr(str(resolved), 200)}, which is not inside "
                            f"{folder}: the experiment's name or a link leads out of it; rename the experiment "
                            "(letters, digits, '-', '_', '.') or remove the link")
    return resolved


def write_report(experiment_name: str, out_root: Path = Path("reports"),
                 reference: str = comparisons.REFERENCE_EXPERIMENT) -> dict:
    """Build the leaderboard and figure, write them under ``out_root/<experiment>/`` and log them."""
    shown_directory = Path(out_root) / experiment_name
    directory = inside(Path(out_root), shown_directory)  # before anything is read or recorded
    experiment_id, runs = find_runs(experiment_name)
    client = MlflowClient()
    run_curves = {run_id: curves(client, run_id) for run_id in runs["run_id"]}
    table, common = leaderboard(runs, [run_curves[r] for r in runs["run_id"]])
    table, limit_notes = flag_above_limit(table, runs, convex_limits())
    points, notes = comparisons.by_point(runs, table), []
    if points is not None and experiment_name != reference:
        notes = comparisons.against_reference(points, runs, reference)
    directory.mkdir(parents=True, exist_ok=True)
    written = {name: inside(directory, directory / name) for name in (LEADERBOARD_MD, LEADERBOARD_CSV, SEEDS_CSV,
                                                                       REPORT_CURVES)}
    markdown = markdown_report(experiment_name, table, common, points, notes, limit_notes)
    written[LEADERBOARD_MD].write_text(markdown)
    table.to_csv(written[LEADERBOARD_CSV], index=False)
    if points is not None:
        points.drop(columns=["_runs"]).to_csv(written[SEEDS_CSV], index=False)
    figure = figures.accuracy_curves(list(table["run"]), [run_curves[r] for r in table["run_id"]],
                                     f"{experiment_name}: accuracy per epoch")
    figure.savefig(written[REPORT_CURVES], dpi=120, bbox_inches="tight")
    with (mlflow.start_run(experiment_id=experiment_id, run_name="report", tags={ROLE_TAG: "report"}) as run,
          runs_killed_at_once()):
        mlflow.log_artifacts(str(directory), artifact_path=REPORT_FOLDER)
    return {"table": table, "points": points, "markdown": markdown, "directory": shown_directory,
            "run_id": run.info.run_id}
