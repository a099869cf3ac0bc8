"""The statistics against published and hand-computed values, never against the module's own formulas.

Oracles: Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
methods", Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no continuity correction);
scipy's independent Wilson implementation; the exact McNemar p-value summed by hand with math.comb.
"""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.stats import accuracy_with_interval, mcnemar, mcnemar_p_value, mean_and_sd, wilson_interval

# (successes, trials, published lower, published upper), four decimals as printed by Newcombe
NEWCOMBE_TABLE_I = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                    (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("k, n, low, high", NEWCOMBE_TABLE_I)
def test_wilson_matches_newcombes_published_intervals(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("k, n", [(8400, 10000), (9999, 10000), (3, 7), (500, 500)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_the_interval_is_about_0_7_points_at_ten_thousand_images():
    low, high = wilson_interval(8400, 10_000)
    assert 0.006 < (high - low) / 2 < 0.008  # "about +-0.7 points"


def test_accuracy_with_interval_counts_the_right_images():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    pred = y.copy()
    pred[:6] = (pred[:6] + 1) % 10  # 24 of 30 right
    metrics = accuracy_with_interval(y, pred)
    assert metrics["test_accuracy"] == 0.8
    ci = binomtest(24, 30).proportion_ci(method="wilson")
    assert (metrics["test_accuracy_ci_low"], metrics["test_accuracy_ci_high"]) == pytest.approx((ci.low, ci.high))


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError, match="correct <= total"):
        wilson_interval(k, n)


def exact_mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact p: twice the smaller binomial tail at 1/2, at most 1."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_p_values_by_hand():
    assert mcnemar_p_value(2, 8) == pytest.approx(112 / 1024)  # 2 * (1 + 10 + 45) / 2^10
    assert mcnemar_p_value(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p_value(5, 5) == 1.0
    assert mcnemar_p_value(0, 0) == 1.0
    for b, c in [(3, 17), (40, 62), (120, 171), (171, 120)]:
        assert mcnemar_p_value(b, c) == pytest.approx(exact_mcnemar_by_hand(b, c), rel=1e-9)


def test_mcnemar_counts_the_discordant_images():
    y = np.zeros(20, dtype=int)
    a = np.zeros(20, dtype=int)
    b = np.zeros(20, dtype=int)
    a[:3] = 1  # a wrong on 0..2
    b[2:10] = 1  # b wrong on 2..9: a alone right on 3..9 (7), b alone right on 0..1 (2)
    test = mcnemar(y, a, b)
    assert (test.only_a, test.only_b) == (7, 2)
    assert test.p_value == pytest.approx(exact_mcnemar_by_hand(7, 2))
    assert not test.significant  # 7 vs 2 is not enough: p = 0.18


def test_mcnemar_refuses_predictions_for_other_images():
    with pytest.raises(ValueError, match="same images"):
        mcnemar(np.zeros(10), np.zeros(10), np.zeros(9))


def test_mean_and_sample_sd():
    assert mean_and_sd([0.84, 0.85, 0.86]) == pytest.approx((0.85, 0.01))
    mean, sd = mean_and_sd([0.84])
    assert mean == 0.84 and math.isnan(sd)
