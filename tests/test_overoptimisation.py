"""Reward-model over-optimisation (issue 16, item 4): the Gao et al. 2022 fits, the ``peaks`` verdict rule and the
report's section (workbench/reporting/overoptimisation.py, workbench/reporting/verdicts.py)."""

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from workbench.reporting.overoptimisation import (
    fit,
    fit_table,
    overoptimisation_points,
    overoptimisation_section,
    peak_summary,
    predict,
)
from workbench.reporting.verdicts import evaluate_rule, peak_columns, peak_frame
from workbench.studies.schema import Statistics, VerdictRule


def test_predict_by_hand():
    # d (alpha - beta log d) at d = e: e (1 - 0.5) ; at d = 0: 0 (d log d -> 0)
    assert predict("rl", 1.0, 0.5, [math.e, 0.0]) == pytest.approx([math.e * 0.5, 0.0])
    # d (alpha - beta d) at d = 2: 2 (1 - 0.5 * 2) = 0
    assert predict("bon", 1.0, 0.5, [2.0]) == pytest.approx([0.0])
    with pytest.raises(ValueError, match="unknown form"):
        predict("ppo", 1.0, 0.5, [1.0])


@pytest.mark.parametrize("form,alpha,beta", [("rl", 0.3, 0.2), ("bon", 0.25, 0.06), ("rl", 0.5, -0.1)])
def test_fit_recovers_known_parameters(form, alpha, beta):
    d = np.linspace(0.0, 4.0, 41)
    exact = fit(d, predict(form, alpha, beta, d), form)
    assert (exact.alpha, exact.beta, exact.r2, exact.n) == pytest.approx((alpha, beta, 1.0, 41), abs=1e-10)
    rng = np.random.default_rng(0)
    dd = np.repeat(d, 20)
    noisy = fit(dd, predict(form, alpha, beta, dd) + 0.01 * rng.standard_normal(len(dd)), form)
    assert noisy.alpha == pytest.approx(alpha, abs=0.01) and noisy.beta == pytest.approx(beta, abs=0.01)
    assert 0.9 < noisy.r2 < 1.0


def test_fit_peak_is_the_curves_maximum():
    f = fit(np.linspace(0, 5, 30), predict("rl", 0.3, 0.2, np.linspace(0, 5, 30)), "rl")
    assert f.peak_d == pytest.approx(math.exp(0.3 / 0.2 - 1))  # dR/dd = alpha - beta (log d + 1) = 0
    grid = np.linspace(0.01, 5, 5000)
    assert f.peak == pytest.approx(predict("rl", 0.3, 0.2, grid).max(), abs=1e-6)
    b = fit(np.linspace(0, 5, 30), predict("bon", 0.25, 0.05, np.linspace(0, 5, 30)), "bon")
    assert b.peak_d == pytest.approx(2.5) and b.peak == pytest.approx(2.5 * (0.25 - 0.05 * 2.5))
    rising = fit(np.linspace(0, 5, 30), predict("rl", 0.3, -0.1, np.linspace(0, 5, 30)), "rl")
    assert math.isnan(rising.peak_d) and math.isnan(rising.peak)  # beta <= 0: no maximum


def test_fit_r2_by_hand_and_degenerate_inputs():
    # points (1, 1), (2, 0): rl columns [d, -d log d] = [1, 0], [2, -2 log 2]: two equations, two unknowns: exact
    assert fit([1.0, 2.0], [1.0, 0.0], "rl").r2 == pytest.approx(1.0)
    # three points on the bon form's columns [d, -d^2]: R = d - d^2 exactly except the last, by hand
    d, r = np.array([1.0, 2.0, 3.0]), np.array([0.0, -2.0, -5.0])  # truth -6 at d = 3
    X = np.stack([d, -(d**2)], 1)
    coef = np.linalg.solve(X.T @ X, X.T @ r)
    res = r - X @ coef
    f = fit(d, r, "bon")
    assert (f.alpha, f.beta) == pytest.approx(tuple(coef))
    assert f.r2 == pytest.approx(1 - (res**2).sum() / ((r - r.mean()) ** 2).sum())
    assert math.isnan(fit([0.0, 0.0, 0.0], [0.0, 0.1, 0.2], "rl").alpha)  # no spread in d: no fit
    with pytest.raises(ValueError, match="sqrt"):
        fit([-1.0, 1.0], [0.0, 0.0], "rl")


def test_the_wrong_form_fits_worse():
    """Data made by one form is fitted better by it than by the other (what the report's R^2 columns compare)."""
    d = np.linspace(0, 6, 50)
    r = predict("rl", 0.4, 0.25, d)
    assert fit(d, r, "rl").r2 > fit(d, r, "bon").r2 + 0.01


def _curves(drops: dict[int, tuple[list[float], list[float]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A runs frame and a long metrics frame: per seed, (gold curve, proxy curve) over steps 0, 10, ..."""
    runs, rows = [], []
    for seed, (gold, proxy) in drops.items():
        rid = f"r{seed}"
        runs.append({"run_id": rid, "seed": seed, "algo_label": "ppo", "task_label": "t", "grid": {}, "status": "done"})
        for i, (g, p) in enumerate(zip(gold, proxy)):
            rows.append(
                {
                    "run_id": rid,
                    "step": 10 * i,
                    "reward/gold_gain": g,
                    "reward/proxy_gain": p,
                    "kl/exact": float(i) ** 2,
                }
            )
    runs = pd.DataFrame(runs)
    runs["group"] = runs["algo_label"]
    return runs, pd.DataFrame(rows)


RULE = dict(claim="C7", metric="reward/gold_gain", kind="peaks", a="ppo", margin=0.02, proxy="reward/proxy_gain")


def test_peak_frame_by_hand():
    runs, metrics = _curves({0: ([0.0, 0.2, 0.1, 0.05], [0.0, 0.1, 0.3, 0.4]), 1: ([0.0, 0.1, 0.2], [0.0, 0.2, 0.1])})
    rule = VerdictRule(**RULE)
    drop, rise = peak_columns(rule)
    out = peak_frame(runs, metrics, rule).set_index("seed")
    assert out.loc[0, drop] == pytest.approx(0.15) and out.loc[0, rise] == pytest.approx(0.3)
    assert out.loc[1, drop] == pytest.approx(0.0) and out.loc[1, rise] == pytest.approx(0.0)  # peak at the end
    no_proxy = peak_frame(runs, metrics.drop(columns="reward/proxy_gain"), rule)
    assert no_proxy[drop].isna().all()  # the rule's proxy was not logged: nothing measured


def _verdict(curves, **over):
    runs, metrics = _curves(curves)
    rule = VerdictRule(**{**RULE, **over})
    return evaluate_rule(peak_frame(runs, metrics, rule), rule, Statistics(min_seeds=3))


def test_peaks_rule_decides():
    up, down = [0.0, 0.1, 0.2, 0.3], [0.0, 0.2, 0.5, 0.6]  # proxy rising
    rise_fall = {s: ([0.0, 0.2 + 0.01 * s, 0.1, 0.05], up) for s in range(5)}
    r = _verdict(rise_fall)
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(np.mean([0.15 + 0.01 * s for s in range(5)]))
    assert r["proxy_ci_low"] > 0
    plateau = {s: ([0.0, 0.1, 0.2, 0.2 + 0.001 * s], up) for s in range(5)}
    assert _verdict(plateau)["verdict"] == "contradicted"  # the drop is 0 on every seed: below the margin
    proxy_falls = {s: ([0.0, 0.2, 0.1, 0.05], [0.0, 0.6, 0.3, 0.1 + 0.01 * s]) for s in range(5)}
    assert _verdict(proxy_falls)["verdict"] == "contradicted"  # gold fell, but so did the proxy
    mixed = {s: ([0.0, 0.2, 0.2 - 0.1 * (s % 2), 0.2 - 0.12 * (s % 2)], down) for s in range(5)}
    assert _verdict(mixed)["verdict"] == "inconclusive"
    assert _verdict({s: rise_fall[s] for s in range(2)})["verdict"] == "insufficient seeds"
    assert _verdict(rise_fall, a="grpo")["verdict"] == "not measured"
    assert _verdict(rise_fall, proxy=None)["verdict"] == "supported"  # the drop alone


def test_peaks_rule_is_checked():
    with pytest.raises(ValidationError, match="needs 'margin'"):
        VerdictRule(**{**RULE, "margin": None})
    with pytest.raises(ValidationError, match="no 'b'"):
        VerdictRule(**{**RULE, "b": "grpo"})
    with pytest.raises(ValidationError, match="no 'b', no 'step'"):
        VerdictRule(**{**RULE, "step": 10})
    with pytest.raises(ValidationError, match="'proxy' belongs"):
        VerdictRule(claim="C7", metric="reward/exact", kind="above", a="ppo", threshold=0.0, proxy="x")


def test_points_fits_and_section(tmp_path):
    """Points from a long metrics frame: d = sqrt(kl/exact); the fits recover a curve made by the RL form; the
    section writes its tables and figure."""
    d = np.arange(6, dtype=float)
    gold = predict("rl", 0.3, 0.2, d)
    runs, metrics = _curves({s: (list(gold), list(0.1 * d)) for s in (0, 1, 100)})
    pts = overoptimisation_points(metrics, runs)
    assert pts["d"].to_numpy()[:6] == pytest.approx(d) and len(pts) == 18
    fits = fit_table(pts).set_index(["reward", "form"])
    assert fits.loc[("gold", "rl"), ["alpha", "beta", "r2"]].to_numpy(float) == pytest.approx([0.3, 0.2, 1.0])
    assert fits.loc[("proxy", "bon"), ["alpha", "beta"]].to_numpy(float) == pytest.approx([0.1, 0.0], abs=1e-12)
    peaks = peak_summary(pts)
    assert peaks["peak_step"].tolist() == [10 * int(np.argmax(gold))] * 3
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables").mkdir()
    sec = overoptimisation_section(metrics, runs, tmp_path / "figures", tmp_path / "tables", seeds=[100])
    assert sec["seeds"] == [100] and sec["fits"]["n"].max() == 6
    assert (tmp_path / "figures" / "overoptimisation.png").stat().st_size > 0
    assert (tmp_path / "tables" / "overoptimisation_fits.csv").exists()
    unmeasured = overoptimisation_section(metrics, runs, tmp_path / "figures", tmp_path / "tables", seeds=[7])
    assert unmeasured["seeds"] == [0, 1, 100]  # no point of the deciding seeds yet: every seed


def test_best_of_n_runs_pool_into_one_curve_over_n(tmp_path):
    """Each bon run (one n) measures one policy, logged at its first and last step: it gives one point, and the runs
    of every n pool into one group whose R_bon fit recovers a curve made by the best-of-n form."""
    ns = [2, 4, 16, 64, 256]
    kl = {n: math.log(n) - (n - 1) / n for n in ns}  # best-of-n's KL for distinct rewards
    runs, rows = [], []
    for seed in (0, 100):
        for n in ns:
            rid = f"bon{n}-{seed}"
            runs.append({"run_id": rid, "seed": seed, "algo_label": "bon", "group": f"bon [algo.n={n}]"})
            d = math.sqrt(kl[n])
            gold = float(predict("bon", 0.5, 0.3, [d])[0])
            for step in (0, 150):  # the same policy twice
                rows.append(
                    {
                        "run_id": rid,
                        "step": step,
                        "kl/exact": kl[n],
                        "reward/gold_gain": gold,
                        "reward/proxy_gain": 0.4 * d,
                        "bon/n": n,
                    }
                )
    runs, metrics = pd.DataFrame(runs), pd.DataFrame(rows)
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables").mkdir()
    sec = overoptimisation_section(metrics, runs, tmp_path / "figures", tmp_path / "tables")
    fits = sec["fits"].set_index(["group", "reward", "form"])
    assert fits.index.get_level_values("group").unique().tolist() == ["bon"]  # one group over every n
    assert fits.loc[("bon", "gold", "bon"), "n"] == len(ns) * 2  # one point per run, not one per row
    assert fits.loc[("bon", "gold", "bon"), ["alpha", "beta", "r2"]].to_numpy(float) == pytest.approx([0.5, 0.3, 1.0])
    peaks = sec["peaks"]
    best = max(ns, key=lambda n: predict("bon", 0.5, 0.3, [math.sqrt(kl[n])])[0])
    assert peaks["peak_step"].tolist() == [best, best]  # the n at which the gold gain peaks
