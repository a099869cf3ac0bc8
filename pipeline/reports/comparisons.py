"""The report's statistics: each grid point over its seeds, and a paired test against the seed recipe.

An experiment file with ``seeds`` runs every grid point once per seed; the runs carry the point
(``pipeline.grid_point``) and the seed (``pipeline.seed``). ``by_point`` folds them into one row per
point: mean +- standard deviation over seeds of the validation and test accuracies.

``against_reference`` then asks of each point whether it beats the book's seed recipe, with McNemar's
exact test (``pipeline.core.stats``) on the *same* test images: the point's run with seed s against the
reference experiment's run with seed s, from the per-image predictions every evaluation logs
(``test_predictions.npz``). Runs whose test images differ (tag ``pipeline.test_digest``) are not paired.
A point is called "better" (or "worse") only when every seed's pair is significant (p < 0.05) in the
same direction; anything else is reported as "no significant difference".
"""

import json
import tempfile

import mlflow
import numpy as np
import pandas as pd

from pipeline.core.stats import PairedTest, mcnemar, mean_and_sd
from pipeline.names import POINT_TAG, SEED_TAG, TEST_DIGEST_TAG, TEST_PREDICTIONS

REFERENCE_EXPERIMENT = "seed_baseline"  # experiments/seed_baseline.yaml: the book's recipe, three seeds


def tag(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs.get(f"tags.{name}", pd.Series(None, index=runs.index, dtype=object))


def pm(values: pd.Series) -> str:
    """``0.8418 ± 0.0012`` over seeds (a single seed shows no spread)."""
    values = values.dropna()
    if values.empty:
        return ""
    mean, sd = mean_and_sd(values)
    return f"{mean:.4f}" if np.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def by_point(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame | None:
    """One row per grid point, mean ± sd over its seeds, best mean validation accuracy first; None when
    the runs carry no seeds."""
    seeds = tag(runs, SEED_TAG)
    if seeds.isna().all():
        return None
    per_run = table.set_index("run_id")
    finished = runs[runs["status"] == "FINISHED"]
    rows = []
    for point, group in finished.groupby(tag(finished, POINT_TAG), sort=False):
        scores = per_run.loc[group["run_id"]]
        rows.append({"point": point_label(point), "seeds": ", ".join(sorted(tag(group, SEED_TAG).dropna())),
                     "val_accuracy": pm(scores["best_val_accuracy"]), "test_accuracy": pm(scores["test_accuracy"]),
                     "last_epoch_test_accuracy": pm(scores["last_epoch_test_accuracy"]),
                     "_mean_val": scores["best_val_accuracy"].mean(), "_runs": dict(zip(tag(group, SEED_TAG),
                                                                                         group["run_id"]))})
    points = pd.DataFrame(rows).sort_values("_mean_val", ascending=False, kind="stable")
    return points.reset_index(drop=True)


def point_label(point_json: str) -> str:
    point = json.loads(point_json)
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(the file's params)"


def predictions(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) labels of a run's test evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_PREDICTIONS, dst_path=tmp)
        with np.load(path) as saved:
            return saved["predicted"], saved["labels"]


def reference_runs(experiment_name: str) -> dict[str, pd.Series]:
    """The reference experiment's latest finished run per seed (seed tag -> run row); {} if there is none."""
    if mlflow.get_experiment_by_name(experiment_name) is None:
        return {}
    runs = mlflow.search_runs(experiment_names=[experiment_name], order_by=["attributes.start_time DESC"],
                              filter_string="attributes.status = 'FINISHED'")
    runs = runs[tag(runs, SEED_TAG).notna()]
    return {seed: group.iloc[0] for seed, group in runs.groupby(tag(runs, SEED_TAG))}


def verdict(tests: list[PairedTest]) -> str:
    if tests and all(t.significant and t.only_a > t.only_b for t in tests):
        return "better"
    if tests and all(t.significant and t.only_a < t.only_b for t in tests):
        return "worse"
    return "no significant difference" if tests else ""


def against_reference(points: pd.DataFrame, runs: pd.DataFrame, reference: str = REFERENCE_EXPERIMENT) -> list[str]:
    """Adds ``vs_<reference>`` (per seed: images only this point gets right / only the reference, p) and
    ``verdict`` to ``points``; returns notes on what could not be paired."""
    references = reference_runs(reference)
    if not references:
        points["verdict"] = ""
        return [f"No paired test: the store has no finished seeded runs of experiment '{reference}' "
                f"(run experiments/{reference}.yaml in the same store)."]
    digests = dict(zip(runs["run_id"], tag(runs, TEST_DIGEST_TAG)))
    notes, column, verdicts = set(), [], []
    for point_runs in points["_runs"]:
        cells, tests = [], []
        for seed, run_id in sorted(point_runs.items()):
            ref = references.get(seed)
            if ref is None or ref.get(f"tags.{TEST_DIGEST_TAG}") != digests[run_id]:
                notes.add(f"seed {seed}: no '{reference}' run with that seed on the same test images")
                continue
            (pred, labels), (ref_pred, _) = predictions(run_id), predictions(ref["run_id"])
            test = mcnemar(labels, pred, ref_pred)
            tests.append(test)
            cells.append(f"s{seed}: {test.only_a}/{test.only_b} p={test.p_value:.2g}")
        column.append("; ".join(cells))
        verdicts.append(verdict(tests))
    points[f"vs_{reference}"], points["verdict"] = column, verdicts
    return sorted(notes)
