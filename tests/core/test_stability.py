"""The losses against PyTorch's own as the oracle, and the stability experiment's finding on real images."""

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from pipeline.core.losses import log_softmax, naive_cross_entropy, naive_softmax, stable_cross_entropy
from pipeline.core.stability import batches, scale_sweep
from pipeline.steps.stability import run_stability
from pipeline.study_config import StabilityConfig


def random_batch(scale: float, seed: int = 0, n: int = 64, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * scale
    labels = torch.randint(0, classes, (n,), generator=g)
    return logits, labels


def loss_and_grad(loss_fn, logits, labels):
    logits = logits.clone().requires_grad_(True)
    loss = loss_fn(logits, labels)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("loss_fn", [naive_cross_entropy, stable_cross_entropy], ids=["naive", "stable"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_losses_match_torch_values_and_gradients(loss_fn, scale):
    logits, labels = random_batch(scale)
    loss, grad = loss_and_grad(loss_fn, logits, labels)
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, logits, labels)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_softmax_and_log_softmax_match_torch():
    logits, _ = random_batch(3.0)
    torch.testing.assert_close(naive_softmax(logits), F.softmax(logits, dim=1))
    torch.testing.assert_close(log_softmax(logits), F.log_softmax(logits, dim=1))


def test_naive_breaks_at_large_scale_while_stable_matches_torch():
    logits, labels = random_batch(1000.0)  # logits in the thousands: exp overflows, probabilities underflow
    naive, naive_grad = loss_and_grad(naive_cross_entropy, logits, labels)
    stable, stable_grad = loss_and_grad(stable_cross_entropy, logits, labels)
    expected, expected_grad = loss_and_grad(F.cross_entropy, logits, labels)
    assert not torch.isfinite(naive)
    assert not torch.isfinite(naive_grad).all()
    torch.testing.assert_close(stable, expected)
    torch.testing.assert_close(stable_grad, expected_grad)


def test_naive_overflow_gives_nan_and_underflow_gives_inf():
    labels = torch.tensor([0])
    overflow = torch.tensor([[100.0, 0.0]])  # exp(100) = inf in float32; inf / inf = NaN
    underflow = torch.tensor([[-200.0, 0.0]])  # the true class's probability is 0; -log 0 = inf
    assert math.isnan(naive_cross_entropy(overflow, labels).item())
    assert naive_cross_entropy(underflow, labels).item() == math.inf
    assert stable_cross_entropy(overflow, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert stable_cross_entropy(underflow, labels).item() == pytest.approx(200.0)


def test_scale_sweep_counts_the_failures():
    logits = torch.tensor([[100.0, 0.0], [-200.0, 0.0], [1.0, 0.0]])
    sweep = scale_sweep(logits, torch.tensor([0, 0, 0]), scales=[1.0])
    row = sweep.iloc[0]
    assert row["naive_overflow_fraction"] == pytest.approx(1 / 3)
    assert row["naive_underflow_fraction"] == pytest.approx(1 / 3)
    assert row["naive_nan_fraction"] == pytest.approx(1 / 3)
    assert math.isfinite(row["stable_loss"])


def test_batches_cycle_through_epochs():
    drawn = list(batches(10, 4, steps=5, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in drawn] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat(drawn[:3]).tolist()) == list(range(10))  # the first epoch sees every image once


def test_stability_finding_on_real_images(real_slice, mlflow_store):
    splits, _ = real_slice
    cfg = StabilityConfig(images=300, steps=30, lr=1.0, fit_epochs=2)
    with mlflow.start_run() as run:
        result = run_stability(cfg, splits)
    summary, sweep, race = result["summary"], result["sweep"], result["race"]

    # the finding: the naive form breaks (at large logit scales, and within a few large-lr steps) ...
    assert not math.isfinite(sweep["naive_loss"].iloc[-1])  # scale 10^4
    assert summary["naive_first_nonfinite_scale"] <= 100
    assert 1 <= summary["naive_first_nan_step"] <= cfg.steps
    assert race["naive_loss"].isna().iloc[summary["naive_first_nan_step"] - 1:].all()  # and never recovers
    # ... while the stable one stays finite everywhere, and agrees with the naive one while both are finite
    assert sweep["stable_loss"].map(math.isfinite).all() and race["stable_loss"].map(math.isfinite).all()
    assert summary["stable_all_finite"] == 1.0
    both = sweep[sweep["naive_loss"].map(math.isfinite)]
    assert len(both) >= 1
    assert both["naive_loss"].tolist() == pytest.approx(both["stable_loss"].tolist(), rel=1e-4)

    # what the store holds is what was measured
    stored = MlflowClient().get_run(run.info.run_id)
    for key, value in summary.items():
        assert stored.data.metrics[key] == pytest.approx(value)
    history = MlflowClient().get_metric_history(run.info.run_id, "stable_train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, cfg.steps + 1))
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"loss_vs_scale.png", "training_loss.png", "loss_vs_scale.csv", "training_loss.csv"} <= artifacts


def test_stability_is_reproducible(real_slice, mlflow_store):
    splits, _ = real_slice
    cfg = StabilityConfig(images=100, steps=10, lr=1.0, fit_epochs=1)
    results = []
    for _ in range(2):
        with mlflow.start_run():
            results.append(run_stability(cfg, splits))
    assert results[0]["sweep"].equals(results[1]["sweep"])
    assert results[0]["race"].equals(results[1]["race"])


def test_bad_stability_config_is_named():
    with pytest.raises(ValueError, match="scales must be a non-empty list of positive numbers"):
        StabilityConfig(scales=(1.0, -2.0)).validate()
