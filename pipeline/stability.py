"""The chapter's first lesson, measured: softmax-then-log breaks, the log-sum-exp form does not.

Two measurements on real Fashion-MNIST images, in float32 like the model itself:

1. **Scaled logits.** A briefly trained model's logits for a few hundred validation images are
   multiplied by growing factors (a more confident model has larger logits). At each scale both losses
   from ``pipeline.losses`` are computed, and for the naive one we count how it fails, image by image:
   ``exp(o)`` overflows to inf once a logit passes ~88.7 (float32's limit), and inf / inf = NaN; or the
   true class's probability underflows to 0 when its logit lies ~104 below the largest, and log 0 = -inf.
2. **Training with a large learning rate.** Two copies of the same freshly initialised model take SGD
   steps on identical batches, one with each loss. A large step makes the logits large within a few
   steps; the naive loss then turns inf and its gradient NaN, which poisons the weights for good, while
   the stable copy keeps training. We record the first step with a non-finite and with a NaN loss.

Everything is logged to the active MLflow run: per-scale and per-step metrics, both tables and the
figures ``loss_vs_scale.png`` and ``training_loss.png``.
"""

import math
import time
from dataclasses import asdict, dataclass

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline import tracking
from pipeline.config import TrainConfig
from pipeline.data import Splits
from pipeline.losses import naive_cross_entropy, naive_softmax, stable_cross_entropy
from pipeline.model import build_model
from pipeline.train import Tensors, fit

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
LOSSES = {"naive": naive_cross_entropy, "stable": stable_cross_entropy}


@dataclass(frozen=True)
class StabilityConfig:
    images: int = 500  # validation images whose logits are scaled
    scales: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 1000, 10000)
    fit_epochs: int = 2  # seed-recipe epochs that produce realistic logits; 0 = a freshly initialised model
    lr: float = 1.0  # the large learning rate of the side-by-side training (10x the seed recipe)
    steps: int = 100  # SGD steps of the side-by-side training
    batch_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.images < 1:
            problems.append(f"images must be >= 1, got {self.images}")
        if not self.scales or not all(s > 0 for s in self.scales):
            problems.append(f"scales must be a non-empty list of positive numbers, got {list(self.scales)}")
        if self.fit_epochs < 0:
            problems.append(f"fit_epochs must be >= 0, got {self.fit_epochs}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# 1. Scaled logits


def naive_failures(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fractions of images for which the naive form overflows, underflows or ends up NaN."""
    overflow = torch.isinf(torch.exp(logits)).any(dim=1)  # exp(o) = inf somewhere in the row
    target_prob = naive_softmax(logits)[torch.arange(len(labels)), labels]
    log_prob = torch.log(target_prob)
    return {
        "naive_overflow_fraction": overflow.float().mean().item(),
        "naive_underflow_fraction": (log_prob == -math.inf).float().mean().item(),  # p = 0, log p = -inf
        "naive_nan_fraction": torch.isnan(log_prob).float().mean().item(),  # inf / inf
    }


def scale_sweep(logits: torch.Tensor, labels: torch.Tensor, scales) -> pd.DataFrame:
    """Both losses (and the naive one's failures) for the logits multiplied by each scale."""
    rows = []
    for scale in scales:
        scaled = logits * scale
        losses = {f"{name}_loss": fn(scaled, labels).item() for name, fn in LOSSES.items()}
        rows.append({"scale": float(scale), **losses, **naive_failures(scaled, labels)})
    return pd.DataFrame(rows)


def trained_logits(tensors: Tensors, cfg: StabilityConfig) -> torch.Tensor:
    """Logits of the first ``cfg.images`` validation images from a model trained with the seed recipe."""
    model = build_model(cfg.seed)
    if cfg.fit_epochs:
        model = fit(model, tensors, TrainConfig(epochs=cfg.fit_epochs, patience=0, seed=cfg.seed)).model
    with torch.no_grad():
        return model(tensors.val[0][: cfg.images])


# ---------------------------------------------------------------------------------------------------
# 2. Training side by side


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` shuffled mini-batches of indices, reshuffling whenever an epoch is used up."""
    produced = 0
    while produced < steps:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if produced == steps:
                return
            produced += 1
            yield idx


def train_side_by_side(x: torch.Tensor, y: torch.Tensor, cfg: StabilityConfig) -> pd.DataFrame:
    """Train one model per loss from the same start on the same batches; the loss of each at each step."""
    models = {name: build_model(cfg.seed) for name in LOSSES}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=cfg.lr) for name, m in models.items()}
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for step, idx in enumerate(batches(len(x), cfg.batch_size, cfg.steps, generator), start=1):
        row = {"step": step}
        for name, loss_fn in LOSSES.items():
            loss = loss_fn(models[name](x[idx]), y[idx])
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()  # a non-finite naive loss gives NaN gradients: its weights stay NaN from here
            optimizers[name].step()
            row[f"{name}_loss"] = loss.item()
        rows.append(row)
    return pd.DataFrame(rows)


def first_step(losses: pd.Series, steps: pd.Series, bad) -> int | None:
    """The first step whose loss satisfies ``bad``, or None."""
    hits = steps[bad(losses)]
    return int(hits.iloc[0]) if len(hits) else None


# ---------------------------------------------------------------------------------------------------
# Figures and the whole experiment


def mark_nonfinite(ax, x, values: pd.Series, label: str, style: str = "o-", cross_size: float = 10) -> None:
    """Plot the finite values as a line and each inf/NaN as a red cross on the top edge of the axes."""
    finite = values.map(math.isfinite)
    ax.plot(x[finite], values[finite], style, color="tab:orange", label=label)
    if (~finite).any():
        top = ax.get_ylim()[1]
        ax.plot(x[~finite], [top] * int((~finite).sum()), "rx", markersize=cross_size, clip_on=False,
                label=f"{label}: inf / NaN")


def loss_vs_scale_figure(sweep: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(sweep["scale"], sweep["stable_loss"], "s-", label="stable (log-sum-exp)")
    mark_nonfinite(ax, sweep["scale"], sweep["naive_loss"], "naive (softmax, then log)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("logit scale factor")
    ax.set_ylabel("mean cross-entropy")
    ax.set_title("cross-entropy of scaled logits (float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def training_loss_figure(race: pd.DataFrame, lr: float, first_nan: int | None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(race["step"], race["stable_loss"], label="stable (log-sum-exp)")
    mark_nonfinite(ax, race["step"], race["naive_loss"], "naive (softmax, then log)", style="-", cross_size=4)
    if first_nan is not None:
        ax.axvline(first_nan, color="red", linestyle=":", label=f"first NaN: step {first_nan}")
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("training loss (batch)")
    ax.set_title(f"training with lr {lr:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def summarize(sweep: pd.DataFrame, race: pd.DataFrame) -> dict:
    """The findings as metrics. A step or scale the naive loss never failed at is left out, not faked."""
    nonfinite = lambda s: ~s.map(math.isfinite)  # noqa: E731
    broken_scales = sweep["scale"][nonfinite(sweep["naive_loss"])]
    stable_finite = not (nonfinite(sweep["stable_loss"]).any() or nonfinite(race["stable_loss"]).any())
    summary = {
        "naive_first_nonfinite_scale": float(broken_scales.min()) if len(broken_scales) else None,
        "naive_first_nonfinite_step": first_step(race["naive_loss"], race["step"], nonfinite),
        "naive_first_nan_step": first_step(race["naive_loss"], race["step"], pd.Series.isna),
        "stable_all_finite": float(stable_finite),
        "stable_final_train_loss": race["stable_loss"].iloc[-1],
    }
    return {k: v for k, v in summary.items() if v is not None}


def log_series(table: pd.DataFrame, steps) -> None:
    """Every column of ``table`` as a metric curve over ``steps``, in a few batched calls.

    One ``log_metrics`` call per step would cost a database round trip each (seconds for 100 steps).
    """
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step))
               for key in table.columns for value, step in zip(table[key], steps)]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        MlflowClient().log_batch(run_id, metrics=metrics[start: start + MAX_METRICS_PER_BATCH])


def run_stability(cfg: StabilityConfig, splits: Splits, tensors: Tensors | None = None) -> dict:
    """Measure both lessons and log them to the active run; returns the summary metrics and both tables."""
    cfg.validate()
    tensors = tensors or Tensors.from_splits(splits)
    tracking.log_new_params({**asdict(cfg), "scales": ",".join(f"{s:g}" for s in cfg.scales)})
    labels = tensors.val[1][: cfg.images]
    sweep = scale_sweep(trained_logits(tensors, cfg), labels, cfg.scales)
    race = train_side_by_side(*tensors.train, cfg)
    summary = summarize(sweep, race)

    # MLflow steps must be integers, so the scales are logged by position; the table holds the scales.
    log_series(sweep.drop(columns="scale"), steps=sweep.index)
    log_series(race.rename(columns=lambda c: c.replace("_loss", "_train_loss")).drop(columns="step"),
               steps=race["step"])
    mlflow.log_metrics({**summary, "images": len(labels)})
    mlflow.log_table(sweep, artifact_file="loss_vs_scale.json")
    mlflow.log_text(sweep.to_csv(index=False), "loss_vs_scale.csv")
    mlflow.log_text(race.to_csv(index=False), "training_loss.csv")
    mlflow.log_figure(loss_vs_scale_figure(sweep), "loss_vs_scale.png")
    mlflow.log_figure(training_loss_figure(race, cfg.lr, summary.get("naive_first_nan_step")), "training_loss.png")
    plt.close("all")
    return {"summary": summary, "sweep": sweep, "race": race}
