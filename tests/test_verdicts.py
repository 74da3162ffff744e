"""Verdicts are computed from the data: synthetic final metrics where the answer is known."""

import math

import numpy as np
import pandas as pd
import pytest

from workbench.analysis.verdicts import (
    VerdictRule, bootstrap_ci, claim_verdicts, evaluate_rule, holm, pairwise, summarise,
)  # fmt: skip


def frame(groups: dict[str, list[float]], metric="m", grid=None) -> pd.DataFrame:
    rows = []
    for label, xs in groups.items():
        for seed, x in enumerate(xs):
            rows.append({"algo_label": label, "seed": seed, metric: x, "task_label": "t", "grid": grid or {}})
    return pd.DataFrame(rows)


SEP = frame({"a": [1.00, 1.02, 0.98, 1.01, 0.99], "b": [0.50, 0.52, 0.49, 0.51, 0.48]})
OVER = frame({"a": [1.0, 0.2, 0.7, 0.4, 0.9], "b": [0.8, 0.3, 0.6, 0.9, 0.1]})


@pytest.mark.parametrize(
    "rule, data, expected",
    [
        (dict(kind="greater", a="a", b="b"), SEP, "supported"),
        (dict(kind="less", a="a", b="b"), SEP, "contradicted"),
        (dict(kind="greater", a="a", b="b"), OVER, "inconclusive"),
        (dict(kind="less", a="a", b="b"), OVER, "inconclusive"),
        (dict(kind="below", a="b", threshold=0.6), SEP, "supported"),
        (dict(kind="below", a="a", threshold=0.6), SEP, "contradicted"),
        (dict(kind="above", a="a", threshold=0.6), SEP, "supported"),
        (dict(kind="below", a="a", threshold=0.6), OVER, "inconclusive"),
        (dict(kind="equivalent", a="a", b="a2", margin=0.1), frame({"a": [1.0, 1.01, 0.99, 1.0], "a2": [1.0, 1.0, 1.01, 0.99]}), "supported"),
        (dict(kind="equivalent", a="a", b="b", margin=0.1), SEP, "contradicted"),
        (dict(kind="equivalent", a="a", b="b", margin=0.1), OVER, "inconclusive"),
        (dict(kind="noninferior", a="a", b="b", margin=0.1), SEP, "supported"),  # better is not worse
        (dict(kind="noninferior", a="b", b="a", margin=0.1), SEP, "contradicted"),  # 0.5 worse, beyond 0.1
        (dict(kind="noninferior", a="b", b="a", margin=0.6), SEP, "supported"),  # 0.5 worse, within 0.6
        (dict(kind="noninferior", a="a", b="b", margin=0.05), OVER, "inconclusive"),
    ],
)
def test_rule_verdicts_follow_the_interval(rule, data, expected):
    r = evaluate_rule(data, VerdictRule(claim="C0", metric="m", **rule))
    assert r["verdict"] == expected, r
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]


def test_not_measured_is_never_a_verdict():
    r = evaluate_rule(SEP, VerdictRule(claim="C1", metric="grad/snr", kind="greater", a="a", b="b"))
    assert r["verdict"] == "not measured"
    assert claim_verdicts([r]) == {"C1": "not measured"}


def test_one_seed_is_inconclusive():
    r = evaluate_rule(frame({"a": [1.0], "b": [0.0]}), VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b"))
    assert r["verdict"] == "inconclusive" and r["estimate"] == 1.0


def test_where_selects_grid_points():
    df = pd.concat([frame({"a": [1, 1.1, 0.9], "b": [0, 0.1, -0.1]}, grid={"beta": 0.1}),
                    frame({"a": [0, 0.1, -0.1], "b": [1, 1.1, 0.9]}, grid={"beta": 1.0})])  # fmt: skip
    up = evaluate_rule(df, VerdictRule(claim="C", metric="m", kind="greater", a="a", b="b", where={"beta": 0.1}))
    down = evaluate_rule(df, VerdictRule(claim="C", metric="m", kind="greater", a="a", b="b", where={"beta": 1.0}))
    assert (up["verdict"], down["verdict"]) == ("supported", "contradicted")


def test_claim_combination():
    rs = [{"claim": "C1", "verdict": "supported"}, {"claim": "C1", "verdict": "inconclusive"},
          {"claim": "C2", "verdict": "supported"}, {"claim": "C2", "verdict": "supported"},
          {"claim": "C3", "verdict": "supported"}, {"claim": "C3", "verdict": "contradicted"},
          {"claim": "C4", "verdict": "not measured"}, {"claim": "C4", "verdict": "supported"}]  # fmt: skip
    assert claim_verdicts(rs) == {"C1": "inconclusive", "C2": "supported", "C3": "contradicted", "C4": "supported"}


def test_rule_validation():
    with pytest.raises(ValueError, match="threshold"):
        VerdictRule(claim="C1", metric="m", kind="below", a="a")
    with pytest.raises(ValueError, match="needs 'b'"):
        VerdictRule(claim="C1", metric="m", kind="greater", a="a")
    with pytest.raises(ValueError):
        VerdictRule(claim="C1", metric="m", kind="below", a="a", threshold=1, typo=3)
    with pytest.raises(ValueError, match="'noninferior' rule needs 'margin'"):
        VerdictRule(claim="C1", metric="m", kind="noninferior", a="a", b="b")


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.55])
    lo, hi = bootstrap_ci(x)
    assert (lo, hi) == bootstrap_ci(x)
    assert lo < x.mean() < hi and lo >= x.min() and hi <= x.max()
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([1.0])))


def test_holm_by_hand():
    # p sorted: 0.01 (x3 -> 0.03), 0.02 (x2 -> 0.04), 0.04 (x1 -> 0.04, monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_pairwise_and_summary():
    pw = pairwise(SEP, "m")
    assert len(pw) == 1 and pw["p_holm"].iloc[0] < 1e-4 and pw["difference"].iloc[0] == pytest.approx(0.5)
    pw = pairwise(OVER, "m")
    assert pw["p_holm"].iloc[0] > 0.3
    s = summarise(SEP, ["m"], ["algo_label"])
    row = s[s.algo_label == "a"].iloc[0]
    assert row["n"] == 5 and row["mean"] == pytest.approx(1.0) and row["ci_low"] < 1.0 < row["ci_high"]


def test_a_where_and_b_where_compare_one_algorithm_across_tasks():
    process = frame({"rl": [0.9, 0.95, 0.85]}).assign(task_label="process")
    outcome = frame({"rl": [0.5, 0.55, 0.45]}).assign(task_label="outcome")
    df = pd.concat([process, outcome])
    rule = VerdictRule(claim="C5", metric="m", kind="greater", a="rl", b="rl", a_where={"task": "process"}, b_where={"task": "outcome"})
    r = evaluate_rule(df, rule)
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(0.4) and r["n"] == 3
    assert r["a_where"] == {"task": "process"} and r["b_where"] == {"task": "outcome"}
    swapped = rule.model_copy(update={"a_where": {"task": "outcome"}, "b_where": {"task": "process"}})
    assert evaluate_rule(df, swapped)["verdict"] == "contradicted"
    # a side filter is merged over the shared 'where' and overrides it for that side only
    df2 = pd.concat([process.assign(grid=[{"beta": 0.1}] * 3), outcome.assign(grid=[{"beta": 0.1}] * 3),
                     process.assign(grid=[{"beta": 1.0}] * 3, m=0.0)])  # fmt: skip
    r = evaluate_rule(df2, rule.model_copy(update={"where": {"beta": 0.1}}))
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(0.4)
    r = evaluate_rule(df2, rule.model_copy(update={"where": {"beta": 0.1}, "a_where": {"task": "process", "beta": 1.0}}))
    assert r["verdict"] == "contradicted" and r["estimate"] == pytest.approx(-0.5)


def test_same_groups_on_both_sides_is_an_error():
    with pytest.raises(ValueError, match="same runs"):
        VerdictRule(claim="C5", metric="m", kind="greater", a="rl", b="rl")
    with pytest.raises(ValueError, match="same runs"):
        VerdictRule(claim="C5", metric="m", kind="greater", a="rl", b="rl", a_where={"task": "x"}, b_where={"task": "x"})
    with pytest.raises(ValueError, match="needs 'b'"):
        VerdictRule(claim="C5", metric="m", kind="above", a="rl", threshold=0, b_where={"task": "x"})


def test_at_step_reads_the_value_logged_at_that_step():
    from workbench.analysis.verdicts import at_step

    runs = pd.DataFrame({"run_id": ["r0", "r1", "r2", "r3"], "algo_label": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1],
                         "task_label": "t", "grid": [{}] * 4, "m": [9.0, 9.0, 9.0, 9.0]})  # fmt: skip
    metrics = pd.DataFrame({
        "run_id": ["r0", "r0", "r1", "r1", "r2", "r2", "r3"], "step": [0, 10, 0, 10, 0, 10, 10],
        "samples": 0, "m": [1.0, 5.0, 1.2, 5.0, 0.1, 7.0, 7.0],
    })  # fmt: skip
    df = at_step(runs, metrics, 0)
    assert df.set_index("run_id")["m"].to_dict() == pytest.approx({"r0": 1.0, "r1": 1.2, "r2": 0.1, "r3": math.nan}, nan_ok=True)
    r = evaluate_rule(df, VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b", step=0))
    assert r["step"] == 0 and r["n"] == 1 and r["estimate"] == pytest.approx(1.1 - 0.1)
    assert evaluate_rule(at_step(runs, metrics, 10), VerdictRule(claim="C1", metric="m", kind="less", a="a", b="b"))["verdict"] == "supported"
    assert evaluate_rule(at_step(runs, metrics, 3), VerdictRule(claim="C1", metric="m", kind="less", a="a", b="b"))["verdict"] == "not measured"
