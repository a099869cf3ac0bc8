"""Step ``stability`` (run from experiment files): the chapter's first lesson, measured and logged.

The measurements are ``pipeline.core.stability``'s: naive softmax-then-log against log-sum-exp, on
scaled logits and in training with a large learning rate. This step logs the per-scale and per-step
metrics, both tables and the figures ``loss_vs_scale.png`` and ``training_loss.png``.
"""

from dataclasses import asdict

import mlflow

from pipeline.core import figures
from pipeline.core.splits import Splits
from pipeline.core.stability import scale_sweep, summarize, train_naive_and_stable, trained_logits
from pipeline.core.training import Tensors
from pipeline.names import STABILITY_TABLES
from pipeline.study_config import StabilityConfig
from pipeline.tracking.runs import log_new_params, log_series


def run_stability(cfg: StabilityConfig, splits: Splits, tensors: Tensors | None = None) -> dict:
    """Measure both lessons and log them to the active run; returns the summary metrics and both tables."""
    cfg.validate()
    tensors = tensors or Tensors.from_splits(splits)
    log_new_params({**asdict(cfg), "scales": ",".join(f"{s:g}" for s in cfg.scales)})
    labels = tensors.val[1][: cfg.images]
    sweep = scale_sweep(trained_logits(tensors, cfg), labels, cfg.scales)
    race = train_naive_and_stable(*tensors.train_pixels(), cfg)
    summary = summarize(sweep, race)

    # MLflow steps must be integers, so the scales are logged by position; the table holds the scales.
    log_series(sweep.drop(columns="scale"), steps=sweep.index)
    log_series(race.rename(columns=lambda c: c.replace("_loss", "_train_loss")).drop(columns="step"),
               steps=race["step"])
    mlflow.log_metrics({**summary, "images": len(labels)})
    sweep_name, race_name = STABILITY_TABLES["sweep"], STABILITY_TABLES["race"]
    mlflow.log_table(sweep, artifact_file=f"{sweep_name}.json")
    mlflow.log_text(sweep.to_csv(index=False), f"{sweep_name}.csv")
    mlflow.log_text(race.to_csv(index=False), f"{race_name}.csv")
    mlflow.log_figure(figures.loss_vs_scale(sweep), f"{sweep_name}.png")
    mlflow.log_figure(figures.training_loss(race, cfg.lr, summary.get("naive_first_nan_step")), f"{race_name}.png")
    return {"summary": summary, "sweep": sweep, "race": race}
