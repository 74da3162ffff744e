"""The one interval method: equal to scipy's t intervals, and calibrated on null data at n = 5.

The simulation is the reviewer's check of a verdict: with no real difference, a `greater`
rule may come out "supported" only at about the one-sided error rate (2.5% at level 0.95),
and the interval of a mean must cover the truth at close to its level, on normal data and
on skewed (log-normal, sigma 0.5) data.
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from workbench.core.stats import difference_interval, t_half_width
from workbench.reporting.verdicts import Statistics, VerdictRule, evaluate_rule

N_SETS = 2000
N = 5


def test_mean_interval_is_students_t():
    x = np.array([0.3, 1.2, 0.7, 0.9, 2.0])
    est, lo, hi = difference_interval(x)
    ref = sps.ttest_1samp(x, 0).confidence_interval(0.95)
    assert est == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    # by hand: t_{0.975, 4} = 2.7764451051977987
    assert hi - est == pytest.approx(2.7764451051977987 * x.std(ddof=1) / math.sqrt(5), rel=1e-12)


def test_paired_interval_is_paired_t():
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.0, 1.0, 1.0, 2.0, 3.0])
    est, lo, hi = difference_interval(a, b, paired=True)
    ref = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert est == pytest.approx(1.6) and (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_unpaired_interval_is_welch():
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.0, 1.0, 1.0, 2.0, 3.0, 9.0])
    est, lo, hi = difference_interval(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert est == pytest.approx(a.mean() - b.mean()) and (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_degenerate_inputs():
    assert all(math.isnan(v) for v in difference_interval([]))
    est, lo, hi = difference_interval([2.0])
    assert est == 2.0 and math.isnan(lo) and math.isnan(hi)
    assert difference_interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert difference_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    assert difference_interval([1.0, np.nan, 3.0])[0] == 2.0  # non-finite values are dropped
    with pytest.raises(ValueError, match="equal lengths"):
        difference_interval([1.0, 2.0], [1.0], paired=True)


def test_bca_is_seeded_and_brackets_the_estimate():
    x = np.array([0.3, 1.2, 0.7, 0.9, 2.0, 1.1, 0.4])
    first = difference_interval(x, method="bca")
    assert first == difference_interval(x, method="bca")
    est, lo, hi = first
    assert lo < est < hi


def test_vectorised_half_width_matches_the_scalar_interval():
    x = np.array([0.3, 1.2, 0.7, 0.9])
    est, lo, hi = difference_interval(x)
    assert t_half_width(x.std(ddof=1), len(x)) == pytest.approx(hi - est)
    assert np.isnan(t_half_width(1.0, 1))


def _draw(rng, dist, size):
    return rng.normal(0.0, 1.0, size) if dist == "normal" else rng.lognormal(0.0, 0.5, size)


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
@pytest.mark.parametrize("paired", [True, False])
def test_null_data_rarely_supports_a_greater_rule(dist, paired):
    """2,000 null data sets (both sides from one distribution), n = 5: false 'supported' at most 3.5%."""
    rng = np.random.default_rng(7)
    rule = VerdictRule(claim="C0", metric="m", kind="greater", a="a", b="b")
    seeds_b = np.arange(N) if paired else np.arange(N) + 100  # same seeds: the rule pairs them
    supported = 0
    for _ in range(N_SETS):
        if paired:  # a seed's two runs share its noise (same initial weights), plus their own
            shared = _draw(rng, dist, N)
            xa, xb = shared + _draw(rng, dist, N), shared + _draw(rng, dist, N)
        else:
            xa, xb = _draw(rng, dist, N), _draw(rng, dist, N)
        est, lo, hi = difference_interval(xa, xb, paired=paired)
        supported += lo > 0
    rate = supported / N_SETS
    assert rate <= 0.035, rate
    # the same decision through the verdict machinery, on a few of those data sets
    for _ in range(20):
        xa, xb = _draw(rng, dist, N), _draw(rng, dist, N)
        df = pd.DataFrame(
            {
                "algo_label": ["a"] * N + ["b"] * N,
                "seed": np.r_[np.arange(N), seeds_b],
                "m": np.r_[xa, xb],
                "task_label": "t",
                "grid": [{}] * (2 * N),
                "status": "done",
            }
        )
        r = evaluate_rule(df, rule, Statistics())
        assert r["paired"] == paired
        _, lo, hi = difference_interval(xa, xb, paired=paired)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
        assert (r["verdict"] == "supported") == (lo > 0)


@pytest.mark.parametrize("dist, floor", [("normal", 0.93), ("lognormal", 0.90)])
def test_the_interval_of_a_mean_covers_the_truth(dist, floor):
    rng = np.random.default_rng(11)
    truth = 0.0 if dist == "normal" else math.exp(0.5**2 / 2)
    covered = 0
    for _ in range(N_SETS):
        _, lo, hi = difference_interval(_draw(rng, dist, N))
        covered += lo <= truth <= hi
    assert covered / N_SETS >= floor, covered / N_SETS
