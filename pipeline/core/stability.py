"""The chapter's first lesson, measured: softmax-then-log breaks, the log-sum-exp form does not.

Two measurements on real Fashion-MNIST images, in float32 like the model itself:

1. **Scaled logits.** A briefly trained model's logits for a few hundred validation images are
   multiplied by growing factors (a more confident model has larger logits). At each scale both losses
   from ``pipeline.core.losses`` are computed, and for the naive one we count how it fails, image by image:
   ``exp(o)`` overflows to inf once a logit passes ~88.7 (float32's limit), and inf / inf = NaN; or the
   true class's probability underflows to 0 when its logit lies ~104 below the largest, and log 0 = -inf.
2. **Training with a large learning rate.** Two copies of the same freshly initialised model take SGD
   steps on identical batches, one with each loss. A large step makes the logits large within a few
   steps; the naive loss then turns inf and its gradient NaN, which poisons the weights for good, while
   the stable copy keeps training. We record the first step with a non-finite and with a NaN loss.

``pipeline.steps.stability`` logs both to MLflow, with the figures of ``pipeline.core.figures``.
"""

import math

import pandas as pd
import torch

from pipeline.config import TrainConfig
from pipeline.core.losses import naive_cross_entropy, naive_softmax, stable_cross_entropy
from pipeline.core.models import build_model
from pipeline.core.training import Tensors, fit
from pipeline.study_config import StabilityConfig

LOSSES = {"naive": naive_cross_entropy, "stable": stable_cross_entropy}


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
    model = build_model(TrainConfig(seed=cfg.seed))  # the softmax regression
    if cfg.fit_epochs:
        model = fit(model, tensors, TrainConfig(epochs=cfg.fit_epochs, patience=0, seed=cfg.seed)).model
    with torch.no_grad():
        return model(tensors.val[0][: cfg.images])


# ---------------------------------------------------------------------------------------------------
# 2. Training with each loss, on the same batches


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` shuffled mini-batches of indices, reshuffling whenever an epoch is used up."""
    produced = 0
    while produced < steps:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if produced == steps:
                return
            produced += 1
            yield idx


def train_naive_and_stable(x: torch.Tensor, y: torch.Tensor, cfg: StabilityConfig) -> pd.DataFrame:
    """Train one model per loss from the same start on the same batches; the loss of each at each step."""
    models = {name: build_model(TrainConfig(seed=cfg.seed)) for name in LOSSES}
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
