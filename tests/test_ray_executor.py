"""`workbench run --executor ray`: a study on a local Ray instance, its driver SIGKILLed mid-study and run again,
equals the process pool's, bitwise.

The driver (`workbench run STUDY --executor ray --workers 2`) starts its own Ray instance (`ray.init(num_cpus=2,
include_dashboard=False)`, on 127.0.0.1: `workbench/studies/ray_executor.py`). It is killed once a run is done,
then run again to the end; every run's final metrics (status, step, samples, every namespaced metric but
`time/`) must equal (==) those of the same study run by `--executor process`, and the runs finished before the
kill are not trained again. Every process the Ray runs started must be gone at the end (they carry a marker in
their environment; Ray's node agents exit on their own about a minute after their driver was SIGKILLed).
The executor in-process: an error in a task is a failed future naming the node, a killed task a
`WorkerDied`; `install` (no Ray) replaces a run folder whole. The Ray tests are skipped only when ray is
not installed (`pip install -e '.[ray]'`; `scripts/install.sh` installs it).
"""

from __future__ import annotations

import importlib.util
import operator
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from workbench.results import load_final, load_runs
from workbench.studies.executors import WorkerDied, WorkerError
from workbench.studies.ray_executor import install

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: the `ray` extra (pip install -e '.[ray]'; scripts/install.sh) is needed",
)

STUDY = """
name = "raystudy"
claims = ["C6"]
seeds = [0, 1, 2]

[[tasks]]
name = "sequence"
vocab_size = 3
length = 3
n_prompts = 2

[budget]
steps = 20
batch_size = 8

[settings]
eval_every = 5
lr = 0.01
beta = 0.04
model = { n_layer = 1, n_embd = 16, n_head = 2, impl = "native" }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }

[[algorithms]]
name = "sft"
"""
N_RUNS = 6  # per algorithm (grpo, sft): a stacked unit of 2 seeds and a unit of 1
SKIP = ("time/",)  # wall time: the only part of a run that differs between two trainings on CPU


def cli(study: Path, results: Path, executor: str) -> list[str]:
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(study), "--results", str(results)]
    # --stack 2: each algorithm's 3 seeds train as a stack of 2 and a run alone, so the 4 units take two rounds on
    # 2 workers and the driver is killed with some runs done, never all (two stacks of 3 could both finish at once)
    return cmd + ["--executor", executor, "--workers", "2", "--stack", "2", "--quiet"]


def finals(results: Path):
    df = load_final(results, "raystudy").set_index("run_id").sort_index()
    metrics = [c for c in df.columns if "/" in c and not c.startswith(SKIP)]  # namespaced metrics
    return df[["algo", "seed", "status", "step", "samples", *metrics]]


def marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command) of every live process whose environment carries ``mark``: the ones this test started."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes():
                out.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]))
        except OSError:  # gone, or not ours to read
            pass
    return out


@pytest.fixture
def env():
    mark = f"WORKBENCH_RAY_TEST={secrets.token_hex(8)}"
    ray_tmp = tempfile.mkdtemp(prefix="wbray")  # short: Ray's socket paths live under it
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_TMPDIR=ray_tmp, TMPDIR=ray_tmp)
    e[mark.split("=")[0]] = mark.split("=")[1]
    yield e, mark
    left = marked(mark)
    for pid, _ in left:  # only if a test failed half-way: never leave our processes behind
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


@needs_ray
def test_killed_ray_driver_resumes_and_equals_the_process_pool(tmp_path, env):
    e, mark = env
    study = tmp_path / "raystudy.toml"
    study.write_text(STUDY)
    ray_results, pool_results = tmp_path / "ray", tmp_path / "pool"

    # 1. the Ray driver, killed (SIGKILL) once one run is done
    driver = subprocess.Popen(cli(study, ray_results, "ray"), env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, done_at_kill = time.monotonic() + 150, set()
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if (ray_results / "index.sqlite").exists():
                runs = load_runs(ray_results, "raystudy")
                if len(runs) and (runs["status"] == "done").any():
                    driver.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.2)
        else:
            out = driver.stdout.read().decode()[-3000:] if driver.poll() is not None else ""
            pytest.fail(f"no run finished before the driver ended or the deadline (exit {driver.poll()}):\n{out}")
    finally:
        driver.kill()
        driver.wait()
        driver.stdout.close()
    killed_at = time.monotonic()
    runs = load_runs(ray_results, "raystudy")
    done_at_kill = set(runs.loc[runs["status"] == "done", "run_id"])
    assert 1 <= len(done_at_kill) < N_RUNS, runs[["run_id", "status"]]

    # 2. the process pool, for reference (meanwhile the killed driver's Ray agents wind down)
    pool = subprocess.run(cli(study, pool_results, "process"), env=e, capture_output=True, text=True, timeout=300)
    assert pool.returncode == 0, pool.stderr[-3000:]

    # 3. the Ray driver again: it finishes only what is missing
    again = subprocess.run(cli(study, ray_results, "ray"), env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"(\d+) runs \((\d+) done.*trained now: (\d+), finished before: (\d+)", again.stdout)
    assert m, again.stdout
    total, done, trained, before = map(int, m.groups())
    assert (total, done) == (N_RUNS, N_RUNS) and trained + before == N_RUNS, again.stdout
    assert before >= len(done_at_kill) and trained <= N_RUNS - len(done_at_kill), again.stdout
    attempts = load_runs(ray_results, "raystudy").set_index("run_id")["attempts"]
    assert (attempts[sorted(done_at_kill)] == 1).all(), attempts  # a run done before the kill is never retrained
    assert not [p.name for p in (ray_results / "runs").iterdir() if p.name.startswith(".")]  # no half-installed

    # 4. the same numbers, bitwise, and the same files in every run folder
    a, b = finals(ray_results), finals(pool_results)
    assert list(a.index) == list(b.index) and len(a) == N_RUNS
    assert list(a.columns) == list(b.columns)
    assert (a["status"] == "done").all()
    for col in a.columns:
        same = (a[col] == b[col]) | (a[col].isna() & b[col].isna())
        assert same.all(), f"{col}: ray {a[col].tolist()} vs pool {b[col].tolist()}"
    for rid in a.index:
        files = {p.relative_to(ray_results / "runs" / rid) for p in (ray_results / "runs" / rid).rglob("*")}
        assert files == {p.relative_to(pool_results / "runs" / rid) for p in (pool_results / "runs" / rid).rglob("*")}
        assert (ray_results / "runs" / rid / "checkpoint" / "model.safetensors").read_bytes() == (
            pool_results / "runs" / rid / "checkpoint" / "model.safetensors"
        ).read_bytes()

    # 5. nothing left running: the clean run shut its Ray instance down; the killed one's agents exit on their own
    while (left := marked(mark)) and time.monotonic() < killed_at + 120:
        time.sleep(1)
    assert not left, f"processes left behind {time.monotonic() - killed_at:.0f} s after the kill: {left}"


@needs_ray
def test_errors_and_kills_come_back_as_failed_futures(tmp_path, monkeypatch):
    from workbench.studies.ray_executor import RayExecutor

    ray_tmp, mark = tempfile.mkdtemp(prefix="wbray"), secrets.token_hex(8)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("TMPDIR", ray_tmp)  # the workers' scratch folders
    monkeypatch.setenv("WORKBENCH_RAY_TEST", mark)  # inherited by every process Ray starts
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ex = RayExecutor(2)
    try:
        ok, bad = ex.submit(operator.add, 2, 3), ex.submit(operator.truediv, 1, 0)
        assert ok.result(timeout=120) == 5
        with pytest.raises(WorkerError, match=r"ZeroDivisionError[^\n]*\n\n\(on Ray node "):
            bad.result(timeout=120)
        slow = ex.submit(time.sleep, 120)
        time.sleep(2)
        t0 = time.monotonic()
        ex.shutdown(wait=True, kill=True)
        with pytest.raises(WorkerDied):
            slow.result(timeout=30)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(operator.add, 1, 1)
    finally:
        ex.shutdown(wait=True, kill=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    deadline = time.monotonic() + 30
    while (left := marked(f"WORKBENCH_RAY_TEST={mark}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind by ray.shutdown: {left}"


def test_install_replaces_a_run_folder_whole(tmp_path):
    run = tmp_path / "runs" / "abc"
    (run / "checkpoint").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("old")
    (run / "stale.txt").write_text("from an earlier attempt")
    (tmp_path / "runs" / ".abc.ray-dead").mkdir()  # a killed driver's half-installed folder
    (tmp_path / "runs" / ".abc.ray-dead" / "metrics.parquet").write_text("half")
    files = [("checkpoint", None), ("checkpoint/model.safetensors", b"w"), ("metrics.jsonl", b"new"), ("empty", None)]
    install(files, run)
    got = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert got == ["checkpoint", "checkpoint/model.safetensors", "empty", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["abc"]  # no hidden leftovers
    for evil in ("../escape", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="outside its folder"):
            install([(evil, b"x")], tmp_path / "runs" / "evil")
    assert not (tmp_path / "escape").exists() and [p.name for p in (tmp_path / "runs").iterdir()] == ["abc"]
