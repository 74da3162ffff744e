"""`workbench run` as real processes: SIGKILL mid-study then resume, and two runners at once."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from workbench.results import load_metrics, load_runs

STUDY = """
name = "procs"
claims = ["C6"]
seeds = [0, 1]

[[tasks]]
name = "bandit"
n_arms = 8

[budget]
steps = 25
batch_size = 16

[settings]
eval_every = 5
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "sft"

[[algorithms]]
name = "grpo"

[[algorithms]]
name = "dpo"
"""
N_RUNS = 6


def cli(path: Path, results: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workbench.cli",
        "run",
        str(path),
        "--results",
        str(results),
        "--workers",
        "1",
        *extra,
    ]


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def final_metrics(results: Path) -> pd.DataFrame:
    df = load_metrics(results, "procs")
    assert not df.attrs["issues"]
    df = df[[c for c in df.columns if not c.startswith("time/")]]  # wall time is the one exception
    return df.sort_values(["run_id", "step"]).reset_index(drop=True)


def claims_per_run(results: Path) -> dict:
    with sqlite3.connect(results / "index.sqlite") as db:
        return dict(
            db.execute("SELECT run_id, count(*) FROM events WHERE event = 'claimed' GROUP BY run_id").fetchall()
        )


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_finishes_with_the_uninterrupted_metrics(tmp_path):
    path = tmp_path / "procs.toml"
    path.write_text(STUDY)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = subprocess.run(cli(path, ref, "--quiet"), capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 0, p.stderr

    proc = subprocess.Popen(
        cli(path, killed, "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()
    )
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int((load_runs(killed, "procs")["status"] == "done").sum())
        except FileNotFoundError:  # no index yet
            pass
        if done >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    assert 1 <= done < N_RUNS, f"the kill should land mid-study (done={done})"
    runs = load_runs(killed, "procs")
    assert set(runs["status"]) <= {"done", "running", "queued"} and (runs["status"] != "done").any()
    time.sleep(1.5)  # the worker died with its runner: it wrote nothing after the kill
    for _, r in runs[runs["status"] == "running"].iterrows():
        assert r["stale"]
        for f in Path(r["path"]).glob("*") if Path(r["path"]).exists() else []:  # absent: killed before it began
            assert f.stat().st_mtime < killed_at + 0.5, f"{f} written after the kill"

    p = subprocess.run(cli(path, killed), capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 0, p.stderr
    assert "already done" in p.stderr
    runs = load_runs(killed, "procs")
    assert (runs["status"] == "done").all() and runs["owner"].isna().all()
    pd.testing.assert_frame_equal(final_metrics(killed), final_metrics(ref), check_exact=True)

    p = subprocess.run(cli(path, killed, "--quiet"), capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 0 and "trained now: 0" in p.stdout  # a third call has nothing left to do


@pytest.mark.slow
def test_two_runners_on_one_study_never_run_a_run_twice(tmp_path):
    path = tmp_path / "procs.toml"
    path.write_text(STUDY)
    results = tmp_path / "results"
    procs = [
        subprocess.Popen(
            cli(path, results, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    trained = [int(re.search(r"trained now: (\d+)", out).group(1)) for out, _ in outs]
    assert sum(trained) == N_RUNS, outs
    runs = load_runs(results, "procs")
    assert len(runs) == N_RUNS and (runs["status"] == "done").all() and (runs["attempts"] == 1).all()
    assert runs["owner"].isna().all()
    assert claims_per_run(results) == {r: 1 for r in runs["run_id"]}
    assert final_metrics(results)["run_id"].nunique() == N_RUNS
    with sqlite3.connect(results / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM study_runs WHERE study = 'procs'").fetchone()[0] == N_RUNS
