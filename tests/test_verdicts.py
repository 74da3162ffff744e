"""Verdicts are computed from the data: synthetic final metrics where the answer is known."""

import math

import numpy as np
import pandas as pd
import pytest

from workbench.reporting.verdicts import (
    Statistics,
    VerdictRule,
    aggregate,
    claim_verdict,
    claim_verdicts,
    evaluate_rule,
    holm,
    pairwise,
    summarise,
)

LOOSE = Statistics(min_seeds=3)  # for the small hand-made frames below


def frame(groups: dict[str, list[float]], metric="m", grid=None, status=None) -> pd.DataFrame:
    rows = []
    for label, xs in groups.items():
        for seed, x in enumerate(xs):
            rows.append(
                {
                    "algo_label": label,
                    "seed": seed,
                    metric: x,
                    "task_label": "t",
                    "grid": grid or {},
                    "status": (status or {}).get(label, "done"),
                }
            )
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
        (
            dict(kind="equivalent", a="a", b="a2", margin=0.1),
            frame({"a": [1.0, 1.01, 0.99, 1.0, 1.0], "a2": [1.0, 1.0, 1.01, 0.99, 1.0]}),
            "supported",
        ),
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
    assert claim_verdicts([r]) == {"C1": "incomplete"}


def test_too_few_seeds_decide_nothing():
    rule = VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b")
    r = evaluate_rule(frame({"a": [1.0], "b": [0.0]}), rule)
    assert r["verdict"] == "insufficient seeds" and r["estimate"] == 1.0
    three = frame({"a": [1.00, 1.02, 0.98], "b": [0.50, 0.52, 0.49]})  # clearly separated, but 3 seeds < 5
    assert evaluate_rule(three, rule)["verdict"] == "insufficient seeds"
    assert evaluate_rule(three, rule, LOOSE)["verdict"] == "supported"
    with pytest.raises(ValueError):
        Statistics(min_seeds=2)  # never below 3


def test_failed_runs_never_lend_a_value():
    """A diverged run's metric is the one logged before it diverged: it must not enter the verdict."""
    rule = VerdictRule(claim="C9", metric="m", kind="greater", a="a", b="b")
    df = frame({"a": [0.9, 0.91, 0.89, 0.9, 0.92, 0.1], "b": [0.5, 0.52, 0.49, 0.51, 0.48, 0.5]}, status=None)
    df.loc[(df.algo_label == "a") & (df.seed == 5), "status"] = "diverged"  # its 0.1 is the untrained policy's
    r = evaluate_rule(df, rule)
    assert r["failed_a"] == 1 and r["runs_a"] == 6 and r["n_a"] == 5
    assert r["estimate"] == pytest.approx(
        np.mean([0.9, 0.91, 0.89, 0.9, 0.92]) - np.mean([0.5, 0.52, 0.49, 0.51, 0.48])
    )
    assert r["verdict"] == "supported"  # 1 of 6 failed: at most a fifth
    df.loc[(df.algo_label == "a") & (df.seed == 4), "status"] = "failed"
    assert evaluate_rule(df, rule)["verdict"] == "unstable"  # 2 of 6 failed: more than a fifth


def test_an_arm_that_all_diverged_is_unstable_or_takes_the_worst_value():
    df = frame({"a": [0.4] * 5, "b": [0.5, 0.52, 0.49, 0.51, 0.48]}, status={"a": "diverged"})
    r = evaluate_rule(df, VerdictRule(claim="C9", metric="m", kind="less", a="a", b="b"))
    assert r["verdict"] == "unstable" and r["n_a"] == 0 and r["failed_a"] == 5
    worst = VerdictRule(claim="C8", metric="m", kind="less", a="a", b="b", failures="worst", worst=0.0)
    r = evaluate_rule(df, worst)
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(0.0 - 0.5)  # never the pre-divergence 0.4
    with pytest.raises(ValueError, match="worst"):
        VerdictRule(claim="C8", metric="m", kind="less", a="a", b="b", failures="worst")


def test_where_selects_grid_points():
    df = pd.concat(
        [
            frame({"a": [1, 1.1, 0.9], "b": [0, 0.1, -0.1]}, grid={"beta": 0.1}),
            frame({"a": [0, 0.1, -0.1], "b": [1, 1.1, 0.9]}, grid={"beta": 1.0}),
        ]
    )
    up = evaluate_rule(df, VerdictRule(claim="C", metric="m", kind="greater", a="a", b="b", where={"beta": 0.1}), LOOSE)
    down = evaluate_rule(
        df, VerdictRule(claim="C", metric="m", kind="greater", a="a", b="b", where={"beta": 1.0}), LOOSE
    )
    assert (up["verdict"], down["verdict"]) == ("supported", "contradicted")


def test_claim_combination():
    rs = [
        {"claim": "C1", "verdict": "supported"},
        {"claim": "C1", "verdict": "inconclusive"},
        {"claim": "C2", "verdict": "supported"},
        {"claim": "C2", "verdict": "supported"},
        {"claim": "C3", "verdict": "supported"},
        {"claim": "C3", "verdict": "contradicted"},
        {"claim": "C4", "verdict": "not measured"},
        {"claim": "C4", "verdict": "supported"},
        {"claim": "C5", "verdict": "insufficient seeds"},
        {"claim": "C5", "verdict": "contradicted"},
        {"claim": "C6", "verdict": "unstable"},
        {"claim": "C6", "verdict": "supported"},
    ]
    assert claim_verdicts(rs) == {
        "C1": "inconclusive",
        "C2": "supported",
        "C3": "contradicted",
        "C4": "incomplete",
        "C5": "incomplete",
        "C6": "unstable",
    }
    assert claim_verdict(["not measured"]) == "incomplete" and claim_verdict([]) == "not measured"


def test_a_claim_with_a_rule_nobody_measured_is_incomplete():
    rules = [
        VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b"),
        VerdictRule(claim="C1", metric="grad/snr", kind="greater", a="a", b="b"),
    ]
    rs = [evaluate_rule(SEP, r) for r in rules]
    assert [r["verdict"] for r in rs] == ["supported", "not measured"]
    assert claim_verdicts(rs) == {"C1": "incomplete"}


def test_rule_validation():
    with pytest.raises(ValueError, match="threshold"):
        VerdictRule(claim="C1", metric="m", kind="below", a="a")
    with pytest.raises(ValueError, match="needs 'b'"):
        VerdictRule(claim="C1", metric="m", kind="greater", a="a")
    with pytest.raises(ValueError):
        VerdictRule(claim="C1", metric="m", kind="below", a="a", threshold=1, typo=3)
    with pytest.raises(ValueError, match="'noninferior' rule needs 'margin'"):
        VerdictRule(claim="C1", metric="m", kind="noninferior", a="a", b="b")


def test_holm_by_hand():
    # p sorted: 0.01 (x3 -> 0.03), 0.02 (x2 -> 0.04), 0.04 (x1 -> 0.04, monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_pairwise_and_summary():
    pw = pairwise(SEP, "m", within=("task_label",))
    assert len(pw) == 1 and pw["p_holm"].iloc[0] < 1e-4 and pw["difference"].iloc[0] == pytest.approx(0.5)
    assert pw["test"].iloc[0] == "paired t"  # the same seeds on both sides
    from scipy.stats import ttest_rel

    a, b = (SEP[SEP.algo_label == k]["m"].to_numpy() for k in "ab")
    assert pw["p"].iloc[0] == pytest.approx(ttest_rel(a, b).pvalue)
    pw = pairwise(OVER, "m", within=("task_label",))
    assert pw["p_holm"].iloc[0] > 0.3


def test_pairwise_compares_within_a_condition_only_and_never_fakes_p0():
    df = pd.concat(
        [
            frame({"a": [1.0] * 5, "b": [0.0] * 5}).assign(task_label="x"),
            frame({"a": [0.3, 0.5, 0.4, 0.6, 0.2], "c": [0.1, 0.2, 0.0, 0.3, 0.1]}).assign(task_label="y"),
        ]
    )
    pw = pairwise(df, "m", within=("task_label",))
    assert sorted(zip(pw["task_label"], pw["a"], pw["b"])) == [("x", "a", "b"), ("y", "a", "c")]  # never across tasks
    flat = pw[pw.task_label == "x"].iloc[0]
    assert math.isnan(flat["p"]) and math.isnan(flat["p_holm"]) and "no spread" in flat["note"]
    s = summarise(SEP, ["m"], ["algo_label"])
    row = s[s.algo_label == "a"].iloc[0]
    assert row["n"] == 5 and row["mean"] == pytest.approx(1.0) and row["ci_low"] < 1.0 < row["ci_high"]


def test_a_where_and_b_where_compare_one_algorithm_across_tasks():
    process = frame({"rl": [0.9, 0.95, 0.85]}).assign(task_label="process")
    outcome = frame({"rl": [0.5, 0.55, 0.45]}).assign(task_label="outcome")
    df = pd.concat([process, outcome])
    rule = VerdictRule(
        claim="C5", metric="m", kind="greater", a="rl", b="rl", a_where={"task": "process"}, b_where={"task": "outcome"}
    )
    r = evaluate_rule(df, rule, LOOSE)
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(0.4) and r["n"] == 3
    assert r["a_where"] == {"task": "process"} and r["b_where"] == {"task": "outcome"}
    swapped = rule.model_copy(update={"a_where": {"task": "outcome"}, "b_where": {"task": "process"}})
    assert evaluate_rule(df, swapped, LOOSE)["verdict"] == "contradicted"
    # a side filter is merged over the shared 'where' and overrides it for that side only
    df2 = pd.concat(
        [
            process.assign(grid=[{"beta": 0.1}] * 3),
            outcome.assign(grid=[{"beta": 0.1}] * 3),
            process.assign(grid=[{"beta": 1.0}] * 3, m=0.0),
        ]
    )
    r = evaluate_rule(df2, rule.model_copy(update={"where": {"beta": 0.1}}), LOOSE)
    assert r["verdict"] == "supported" and r["estimate"] == pytest.approx(0.4)
    r = evaluate_rule(
        df2, rule.model_copy(update={"where": {"beta": 0.1}, "a_where": {"task": "process", "beta": 1.0}}), LOOSE
    )
    assert r["verdict"] == "contradicted" and r["estimate"] == pytest.approx(-0.5)


def test_same_groups_on_both_sides_is_an_error():
    with pytest.raises(ValueError, match="same runs"):
        VerdictRule(claim="C5", metric="m", kind="greater", a="rl", b="rl")
    with pytest.raises(ValueError, match="same runs"):
        VerdictRule(
            claim="C5", metric="m", kind="greater", a="rl", b="rl", a_where={"task": "x"}, b_where={"task": "x"}
        )
    with pytest.raises(ValueError, match="needs 'b'"):
        VerdictRule(claim="C5", metric="m", kind="above", a="rl", threshold=0, b_where={"task": "x"})


def test_at_step_reads_the_value_logged_at_that_step():
    from workbench.reporting.verdicts import at_step

    runs = pd.DataFrame(
        {
            "run_id": ["r0", "r1", "r2", "r3"],
            "algo_label": ["a", "a", "b", "b"],
            "seed": [0, 1, 0, 1],
            "task_label": "t",
            "grid": [{}] * 4,
            "m": [9.0, 9.0, 9.0, 9.0],
            "status": "done",
        }
    )
    metrics = pd.DataFrame(
        {
            "run_id": ["r0", "r0", "r1", "r1", "r2", "r2", "r3"],
            "step": [0, 10, 0, 10, 0, 10, 10],
            "samples": 0,
            "m": [1.0, 5.0, 1.2, 5.0, 0.1, 7.0, 7.0],
        }
    )
    df = at_step(runs, metrics, 0)
    assert df.set_index("run_id")["m"].to_dict() == pytest.approx(
        {"r0": 1.0, "r1": 1.2, "r2": 0.1, "r3": math.nan}, nan_ok=True
    )
    r = evaluate_rule(df, VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b", step=0))
    assert r["step"] == 0 and r["n"] == 1 and r["estimate"] == pytest.approx(1.1 - 0.1)
    r = evaluate_rule(at_step(runs, metrics, 10), VerdictRule(claim="C1", metric="m", kind="less", a="a", b="b"))
    assert r["estimate"] == pytest.approx(-2.0) and r["verdict"] == "insufficient seeds"
    assert (
        evaluate_rule(at_step(runs, metrics, 3), VerdictRule(claim="C1", metric="m", kind="less", a="a", b="b"))[
            "verdict"
        ]
        == "not measured"
    )


def test_aggregate_iqm_and_probability_of_improvement_by_hand():
    # two conditions; in x, a beats b on every pair; in y, a and b tie on every pair
    df = pd.concat(
        [
            frame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 0.0, 0.0, 0.0]}).assign(condition="x"),
            frame({"a": [5.0, 5.0, 5.0, 5.0], "b": [5.0, 5.0, 5.0, 5.0]}).assign(condition="y"),
        ]
    )
    iqm, imp = aggregate(df, "m", resamples=200)
    a = iqm.set_index("group").loc["a"]
    # a's 8 values sorted: 1 2 3 4 5 5 5 5; the middle 50% (trim 2 each side): 3 4 5 5 -> 4.25
    assert a["iqm"] == pytest.approx(4.25) and a["conditions"] == 2 and a["ci_low"] <= 4.25 <= a["ci_high"]
    row = imp.iloc[0]
    assert (row["a"], row["b"]) == ("a", "b") and row["p_a_greater"] == pytest.approx((1.0 + 0.5) / 2)
    assert row["ci_low"] <= 0.75 <= row["ci_high"]


def test_queued_runs_are_pending_not_failures_and_pooled_values_are_not_seeds():
    df = frame({"a": [0.9, 0.91, 0.92, 0.9, 0.93], "b": [0.5, 0.52, 0.49, 0.51, 0.48]})
    df.loc[(df.algo_label == "a") & (df.seed == 0), "status"] = "failed"
    df.loc[(df.algo_label == "a") & df.seed.isin([1, 2]), "status"] = "queued"
    r = evaluate_rule(df, VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b"))
    assert (
        r["verdict"] == "insufficient seeds" and r["failed_a"] == 1 and r["runs_a"] == 5
    )  # 1 of 5 failed: not unstable
    two_points = pd.concat(
        [
            frame({"a": [1.0, 1.1, 0.9], "b": [0.0, 0.1, -0.1]}, grid={"beta": 0.1}),
            frame({"a": [1.0, 1.1, 0.9], "b": [0.0, 0.1, -0.1]}, grid={"beta": 1.0}),
        ]
    )
    r = evaluate_rule(
        two_points, VerdictRule(claim="C1", metric="m", kind="greater", a="a", b="b"), Statistics(min_seeds=4)
    )
    assert r["n_a"] == 6 and r["verdict"] == "insufficient seeds"  # 6 values, 3 seeds


def test_a_step_rule_with_nothing_logged_still_sees_the_failed_runs():
    from workbench.reporting.verdicts import at_step

    runs = frame({"a": [0.4] * 5, "b": [0.5] * 5}, metric="reward/exact", status={"a": "diverged", "b": "diverged"})
    df = at_step(runs.assign(run_id=[f"r{i}" for i in range(10)]), pd.DataFrame(), 0)
    assert len(df) == 10 and df["reward/exact"].isna().all()  # kept, with nothing logged at the step
    r = evaluate_rule(df, VerdictRule(claim="C8", metric="reward/exact", kind="less", a="a", b="b", step=0))
    assert r["verdict"] == "unstable"


def test_bca_needs_many_seeds():
    with pytest.raises(ValueError, match="min_seeds >= 20"):
        Statistics(interval="bca")
    assert Statistics(interval="bca", min_seeds=20).interval == "bca"
