"""How sure a test accuracy is: its 95% interval, the spread over seeds, and a paired test of two models.

- **Wilson score interval** for an accuracy k/n: unlike the textbook p +- 1.96 sqrt(p(1-p)/n) it stays
  inside [0, 1] and keeps its coverage near 0 and 1 (Newcombe 1998 compares eleven methods). At
  n = 10,000 and 0.84 it is about +-0.7 points: differences smaller than that are not findings.
- **McNemar's test** for two models on the *same* test images: only the images where exactly one of
  them is right (the discordant pairs, b and c) carry information; under "equally accurate" each such
  image is a fair coin, so b ~ Binomial(b + c, 1/2). The exact binomial p-value is valid at every count
  (the chi-square approximation is not for small b + c), and scipy computes it instantly.

Plain numpy and scipy, no tracking: ``pipeline.tracking.evaluation`` and ``pipeline.reports`` log and
show what these return.
"""

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SIGNIFICANCE = 0.05  # "better" is said only below this p-value


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the proportion ``correct / total``."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct} of {total}")
    p = correct / total
    z2n = z * z / total
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / total + z2n / (4 * total))
    return max(0.0, center - half), min(1.0, center + half)


TEST_METRICS = ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high")  # as the steps log them


def accuracy_with_interval(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy and its 95% Wilson interval, as the metrics ``TEST_METRICS``."""
    correct, total = int(np.sum(y_true == y_pred)), len(y_true)
    return dict(zip(TEST_METRICS, (correct / total, *wilson_interval(correct, total))))


def above(accuracy: float, limit: float) -> bool:
    """Whether ``accuracy`` is higher than ``limit``, both fractions of the same images: distinct values
    differ by 1/n at least (n <= 60,000), so the margin only absorbs how each was rounded (training logs
    float32 accuracies, 0.8382 as 0.83819997)."""
    return accuracy > limit + 1e-6


def format_interval(metrics: dict) -> str:
    """A test accuracy and its interval from the metrics ``TEST_METRICS``: ``0.8418 (95% CI 0.8345-0.8489)``."""
    accuracy, low, high = (metrics[name] for name in TEST_METRICS)
    return f"{accuracy:.4f} (95% CI {low:.4f}-{high:.4f})"


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test of model A against model B on the same images."""

    only_a: int  # images A gets right and B wrong (b)
    only_b: int  # images B gets right and A wrong (c)
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> PairedTest:
    """McNemar's exact (binomial) test; both prediction arrays must be for the images of ``y_true``."""
    if not len(y_true) == len(pred_a) == len(pred_b):
        raise ValueError(f"paired test needs predictions for the same images: {len(y_true)} labels, "
                         f"{len(pred_a)} and {len(pred_b)} predictions")
    right_a, right_b = pred_a == y_true, pred_b == y_true
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    return PairedTest(only_a, only_b, mcnemar_p_value(only_a, only_b))


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value from the discordant counts; 1.0 when the models never disagree."""
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest  # imported here: `main` uses this module only to format, without scipy

    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def mean_and_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value: one seed shows no spread)."""
    values = np.asarray(list(values), dtype=float)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), sd
