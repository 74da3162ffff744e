"""Probes in training (grad/..., credit/..., credit.jsonl) and `workbench probe` on a saved run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from workbench.analysis.probe import OBJECTIVES
from workbench.cli import main
from workbench.config import resolve
from workbench.training import train

TINY = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2}
SEQ = {"name": "sequence", "vocab_size": 3, "length": 3, "variant": "decisive", "decisive_position": 1}


def rows(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def run(tmp_path, algo, steps=3, task=None, **sets):
    res = resolve(
        {"task": task or SEQ, "algo": {"name": algo}},
        {**TINY, "steps": steps, "batch_size": 16, "group_size": 4, **sets},
    )
    out = tmp_path / f"{algo}-{sets.get('probe_every', 'default')}"
    assert train(res, out, progress=False)["status"] == "done"
    return rows(out), out


PROBE_KEYS = [
    "grad/norm_mean",
    "grad/total_var",
    "grad/snr",
    "grad/cos_true",
    "grad/cos_mean_true",
    "grad/exact_norm",
    "grad/cos_sft_rl",
    "grad/cos_dpo_rl",
    "time/probe_s",
]
CREDIT_KEYS = ["credit/corr", "credit/mse", "credit/decisive_share", "credit/decisive_share_exact"]


def test_training_logs_probes_at_their_interval_and_credit_heatmap_data(tmp_path):
    m, out = run(tmp_path, "grpo", steps=3, probe_every=2, probe_minibatches=3)
    probed = [r["step"] for r in m if "grad/total_var" in r]
    assert probed == [0, 2, 3]  # every probe_every steps and the last
    for r in m:
        if r["step"] in probed:
            assert all(k in r for k in PROBE_KEYS + CREDIT_KEYS), sorted(set(PROBE_KEYS + CREDIT_KEYS) - set(r))
            assert 0 <= r["credit/decisive_share"] <= 1 and -1 <= r["grad/cos_true"] <= 1
    assert m[0]["grad/cos_true"] > 0  # at pi = pi_ref GRPO's update points along the RL gradient
    credit = [json.loads(line) for line in (out / "credit.jsonl").read_text().splitlines()]
    assert len(credit) == 3 * 3  # 3 probes x 3 positions
    assert {c["method"] for c in credit} == {"grpo"} and [c["position"] for c in credit[:3]] == [0, 1, 2]
    assert [c["decisive"] for c in credit[:3]] == [False, True, False]
    assert credit[2]["exact_abs"] == pytest.approx(0.0, abs=1e-9)  # after the decisive position
    doc = Path("docs/metrics.md").read_text()
    missing = sorted(k for r in m for k in r if f"`{k}`" not in doc)
    assert not missing, missing
    for k in credit[0]:
        assert f"`{k}`" in doc, k


def test_offline_run_probes_its_own_estimator_against_the_full_dataset_gradient(tmp_path):
    m, _ = run(tmp_path, "dpo", steps=2, probe_every=1, probe_minibatches=3, **{"algo.batch_size": 8})
    r = m[0]
    assert "credit/corr" not in r  # no per-token advantages offline
    assert r["grad/total_var"] > 0 and -1 <= r["grad/cos_true"] <= 1 and "grad/cos_dpo_rl" in r


def test_probes_do_not_change_the_training_trajectory(tmp_path):
    on, _ = run(tmp_path / "on", "ppo", steps=3, probe_every=1, probe_minibatches=2)
    off, _ = run(tmp_path / "off", "ppo", steps=3, probe_every=0)

    def strip(rs):  # the update's own grad/norm stays; the probe's figures and timings go
        return [
            {k: v for k, v in r.items() if k.split("/")[0] not in ("grad", "credit", "time") or k == "grad/norm"}
            for r in rs
        ]

    assert strip(on) == strip(off)
    assert not any("grad/total_var" in r for r in off) and not (tmp_path / "off" / "ppo-0" / "credit.jsonl").exists()


def training_rows(*runs):
    """Each run's rows as {step: training quantities}: the keys every update row of every run has (reward/mean,
    loss/..., kl/k*_..., grad/norm, lr, samples), not the measurements (*/exact, reward/eval, probes) or timings."""
    keys = set.intersection(*(set(r) for rs in runs for r in rs[:-1])) - {"time/elapsed_s"}
    return keys, [{r["step"]: {k: r.get(k) for k in keys} for r in rs} for rs in runs]


@pytest.mark.parametrize("algo, task", [("ppo", {"name": "bandit", "n_arms": 4, "n_contexts": 2}), ("grpo", SEQ)])
def test_measurements_do_not_change_the_training_trajectory(algo, task, tmp_path):
    """eval_every and probe_every only measure: the same seed trains the same way whatever they are (the
    evaluation samples from its own generator, as the probes do)."""
    a, _ = run(tmp_path / "a", algo, steps=6, task=task, eval_every=1, probe_every=0)
    b, _ = run(tmp_path / "b", algo, steps=6, task=task, eval_every=4, probe_every=3, probe_minibatches=2)
    assert [r["step"] for r in a if "reward/eval" in r] == list(range(7)) and [
        r["step"] for r in b if "reward/eval" in r
    ] == [0, 4, 6]
    keys, (ta, tb) = training_rows(a, b)
    assert {"reward/mean", "reward/std", "loss/policy", "grad/norm", "lr", "samples"} <= keys, sorted(keys)
    assert not any(k.endswith("/exact") or k == "reward/eval" or k.startswith("credit/") for k in keys)
    assert ta == tb
    assert ta[5]["reward/mean"] != ta[1]["reward/mean"]  # it did train


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    code = main(
        [
            "train",
            "--task",
            "sequence",
            "--algo",
            "grpo",
            "--steps",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.n_embd=16",
            "--set",
            "model.n_head=2",
            "--set",
            "task.vocab_size=3",
            "--set",
            "task.length=3",
            "--set",
            "task.variant=decisive",
            "--set",
            "batch_size=16",
            "--set",
            "group_size=4",
            "--set",
            "probe_every=0",
        ]
    )
    assert code == 0
    return out


def test_probe_gradients_on_a_checkpoint(saved_run, capsys):
    assert (
        main(
            [
                "probe",
                str(saved_run / "checkpoint"),
                "--what",
                "gradients",
                "--batch-sizes",
                "4",
                "8",
                "--minibatches",
                "3",
            ]
        )
        == 0
    )
    table = pd.read_parquet(saved_run / "probe_gradients.parquet")
    assert set(table["objective"]) == set(OBJECTIVES) and set(table["batch_size"]) == {4, 8}
    assert len(table) == 2 * len(OBJECTIVES)
    for col in [
        "norm_mean",
        "total_var",
        "total_var_se",
        "snr",
        "cos_true",
        "cos_mean_true",
        "true_norm",
        "truth",
        "true_cos_rl",
    ]:
        assert col in table.columns
    rl = table[table["algo"].isin(["reinforce", "rloo", "grpo", "ppo"])]
    assert (rl["truth"] == "exact").all() and (rl["true_cos_rl"] - 1).abs().max() < 1e-9
    assert (table[table["algo"].isin(["sft", "dpo"])]["truth"] == "exact_dataset").all()
    for B, t in table.groupby("batch_size"):  # claim C1 in miniature: fixed targets are far less noisy
        snr = t.set_index("objective")["snr"]
        assert snr["sft"] > snr[["reinforce", "reinforce_mean", "rloo", "grpo", "ppo"]].max(), (B, snr)
    out = capsys.readouterr().out
    assert "probe gradients: grpo on sequence" in out and "reinforce_mean" in out


def test_probe_credit_and_kl_on_a_run_folder(saved_run, capsys):
    assert main(["probe", str(saved_run), "--what", "credit", "--batch-sizes", "8", "--minibatches", "2"]) == 0
    t = pd.read_parquet(saved_run / "probe_credit.parquet")
    assert set(t["method"]) == {"reinforce", "reinforce_mean", "rloo", "grpo", "ppo"}
    assert set(t["position"]) == {-1, 0, 1, 2}
    summary = t[t["position"] == -1].set_index("method")
    assert summary.loc["grpo", "share"] == pytest.approx(1 / 3, abs=1e-6)  # a per-sequence constant: 1/L on position 0
    assert main(["probe", str(saved_run), "--what", "kl", "--batch-sizes", "8", "32", "--minibatches", "4"]) == 0
    k = pd.read_parquet(saved_run / "probe_kl.parquet")
    assert set(k["estimator"]) == {"k1", "k2", "k3"} and (k["truth"] == "exact").all()
    assert (k[k["estimator"] == "k3"]["negative_share"] == 0).all()
    out = capsys.readouterr().out
    assert "probe credit" in out and "probe kl" in out and re.search(r"k3\s+32", out)


@pytest.mark.parametrize("warmup", [0, 10])
def test_probe_of_an_unchanged_policy_sees_zero_kl(tmp_path, warmup):
    """The probe rebuilds the run's reference: its starting model, or the result of its SFT phase."""
    _, out = run(tmp_path, "reinforce", steps=0, probe_every=0, sft_warmup_steps=warmup)
    assert main(["probe", str(out), "--what", "kl", "--batch-sizes", "8", "--minibatches", "2"]) == 0
    k = pd.read_parquet(out / "probe_kl.parquet")
    assert k["exact"].abs().max() < 1e-6 and k["mean"].abs().max() < 1e-5


def test_probe_errors_are_messages(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope"), "--what", "kl"]) == 2
    assert "no run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_measurement_overhead_benchmark_stays_within_twice():
    """benchmarks/measurement_overhead.py: with the default probe_every, training with measurements on
    takes at most 2x the CPU time of training without (SFT: the cheapest steps; GRPO: a typical online run)."""
    import subprocess
    import sys

    cmd = [sys.executable, "benchmarks/measurement_overhead.py", "--algos", "sft", "grpo", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert "ratio on/off" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
