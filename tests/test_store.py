"""The results store (atomic publishing, the SQLite index, claims) and the executors."""

import math
import operator
import os
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from workbench.results import (
    Owner,
    Store,
    is_stale,
    pid_alive,
    publish,
    publish_metrics,
    publish_text,
    read_progress,
    results_dir,
)
from workbench.studies.executors import InlineExecutor, LocalProcessExecutor, WorkerDied, WorkerError


def add_run(store: Store, run_id="r1", study="s", *more: str):
    """Register ``study`` with the run ``run_id`` (and the runs ``more``): one SFT seed on the bandit each."""
    store.register_study(
        study,
        f"{study}.toml",
        "",
        ["C1"],
        "h",
        [
            {
                "run_id": rid,
                "task": "bandit",
                "algo": "sft",
                "seed": 0,
                "steps": 3,
                "unit": "demos",
                "config": {},
                "task_label": "bandit",
                "algo_label": "sft",
                "grid": {},
            }
            for rid in (run_id, *more)
        ],
    )


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_publish_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "x.txt"
    publish_text(target, "old")
    with pytest.raises(RuntimeError):
        publish(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("killed mid-write"))))
    assert target.read_text() == "old"
    publish_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_index_is_sqlite_in_wal_mode_with_a_busy_timeout(tmp_path):
    with Store(tmp_path) as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
        add_run(store)
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert db.execute("SELECT status, attempts FROM runs").fetchall() == [("queued", 0)]
    with pytest.raises(sqlite3.IntegrityError):  # the status is one of five
        db.execute("UPDATE runs SET status='finished'")


def test_a_run_is_claimed_once(tmp_path):
    a, b = Store(tmp_path), Store(tmp_path)
    add_run(a)
    me, other = Owner.current(), Owner.current()
    assert a.claim("r1", me) == "claimed"
    assert b.claim("r1", other) == "busy"  # a live owner with a fresh heartbeat
    assert b.finish("r1", other, "done", 3, 9) is False  # only the holder can finish it
    assert a.heartbeat(me) == 1
    assert a.finish("r1", me, "done", 3, 9) is True
    assert b.states(["r1"])["r1"]["status"] == "done"


def test_a_dead_owners_run_is_reclaimed(tmp_path):
    store = Store(tmp_path)
    add_run(store)
    ghost = Owner("ghost", Owner.current().host, dead_pid())
    assert store.claim("r1", ghost) == "claimed"
    row = store.states(["r1"])["r1"]
    assert is_stale(row)  # same host, pid gone
    assert store.claim("r1", Owner.current()) == "claimed"
    assert store.states(["r1"])["r1"]["attempts"] == 2
    far = Owner("far", "another-host", os.getpid())  # another host: only the heartbeat tells
    row = {"host": far.host, "pid": far.pid, "heartbeat_at": time.time()}
    assert not is_stale(row) and is_stale({**row, "heartbeat_at": time.time() - 3600})
    assert not pid_alive(dead_pid()) and pid_alive(os.getpid())


def test_failed_runs_are_retried_by_one_process_only(tmp_path):
    store = Store(tmp_path)
    add_run(store)
    me = Owner.current()
    store.claim("r1", me)
    store.finish("r1", me, "failed", reason="boom")
    seen = store.states(["r1"])["r1"]["attempts"]  # both processes read attempts = 1 when they start
    assert store.claim("r1", me, expected_attempts=seen) == "claimed"
    store.finish("r1", me, "failed", reason="boom again")
    assert store.claim("r1", Owner.current(), expected_attempts=seen) == "failed"  # already retried


def test_a_published_run_is_recovered_not_rerun(tmp_path):
    """Killed after publishing metrics.parquet, before the index was updated."""
    store = Store(tmp_path)
    add_run(store)
    d = store.run_dir("r1")
    d.mkdir(parents=True)
    publish_text(d / "status.json", '{"status": "diverged", "step": 2, "reason": "non-finite loss nan"}')
    publish_text(d / "metrics.jsonl", '{"step": 0, "samples": 0}\n{"step": 1, "samples": 4}\n')
    publish_metrics(d)  # (a metrics.parquet that does not read is published again or the run redone: test_faults.py)
    assert store.claim("r1", Owner.current()) == "recovered"
    row = store.states(["r1"])["r1"]
    assert (row["status"], row["step"], row["samples"], row["attempts"]) == ("diverged", 2, 4, 0)
    assert store.claim("r1", Owner.current()) == "finished"


def test_read_progress_ignores_a_half_written_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert read_progress(tmp_path) == {"step": 1}
    assert read_progress(tmp_path / "nowhere") is None


def test_results_folder_from_flag_env_or_default(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_RESULTS", raising=False)
    assert str(results_dir()) == "results"
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path and str(results_dir("elsewhere")) == "elsewhere"


def test_inline_executor():
    ex = InlineExecutor()
    assert list(ex.map(abs, [-1, 2])) == [1, 2]
    assert isinstance(ex.submit(math.sqrt, -1).exception(), ValueError)


def test_local_process_executor_runs_each_call_in_a_fresh_process():
    with LocalProcessExecutor(max_workers=2) as ex:
        pids = [ex.submit(os.getpid) for _ in range(3)]
        assert list(ex.map(abs, [-2, 3, -4])) == [2, 3, 4]
        assert ex.submit(operator.mul, 6, 7).result(timeout=60) == 42
        pids = [f.result(timeout=60) for f in pids]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        err = ex.submit(math.sqrt, -1).exception(timeout=60)
        assert isinstance(err, WorkerError) and "ValueError: math domain error" in str(err)
        died = ex.submit(os._exit, 3).exception(timeout=60)
        assert isinstance(died, WorkerDied) and "exit status 3" in str(died)
        assert ex.submit(abs, -5).result(timeout=60) == 5  # the pool survives a dead worker


def test_register_study_writes_its_plan_and_the_index_is_rebuilt_from_it(tmp_path):
    """The plan manifest holds register_study's arguments; a rebuild reads it, a study file without one needs legacy."""
    import json
    import shutil

    import pandas as pd

    from workbench.results import load_runs, plan_path, rebuild_index

    def with_folder(root, run_id, algo):
        d = root / "runs" / run_id
        d.mkdir(parents=True)
        config = {"task": {"name": "bandit"}, "algo": {"name": algo}, "seed": 0, "steps": 3}
        (d / "config.json").write_text(json.dumps({"config": config}))

    old = tmp_path / "old"
    with Store(old) as s:
        add_run(s, "r1", "s")
    plan = json.loads(plan_path(old, "s").read_text())
    assert plan["name"] == "s" and plan["claims"] == ["C1"] and plan["runs"][0]["unit"] == "demos"
    with_folder(old, "r9", "sft")  # a run folder of no study
    (old / "studies" / "t.toml").write_text("")  # a study copy from before manifests

    new = tmp_path / "new"
    shutil.copytree(old / "studies", new / "studies")
    shutil.copytree(old / "runs", new / "runs")
    done = rebuild_index(new)
    assert done["studies"] == 1 and len(done["skipped"]) == 1 and "t.toml: no plan manifest" in done["skipped"][0]
    runs = load_runs(new).set_index("run_id")
    assert runs.loc["r1", "study"] == "s" and runs.loc["r1", "unit"] == "demos" and pd.isna(runs.loc["r9", "unit"])

    def legacy(path):
        if path.name != "t.toml":
            raise AssertionError(path)
        return {**plan, "name": "t", "path": str(path), "runs": [{**plan["runs"][0], "run_id": "r9"}]}

    again = tmp_path / "again"
    shutil.copytree(old / "studies", again / "studies")
    shutil.copytree(old / "runs", again / "runs")
    done = rebuild_index(again, legacy=legacy, unit_of=lambda algo: "pairs")
    assert done["studies"] == 2 and done["skipped"] == []
    assert plan_path(again, "t").exists()  # registered: its manifest written for the next rebuild
    runs = load_runs(again).set_index("study")
    assert runs.loc["t", "run_id"] == "r9" and runs.loc["s", "run_id"] == "r1"

    def refuses(path):
        raise ValueError("algorithms: required key is missing\n")

    last = tmp_path / "last"
    shutil.copytree(old / "studies", last / "studies")
    shutil.copytree(old / "runs", last / "runs")
    done = rebuild_index(last, legacy=refuses, unit_of=lambda algo: "pairs")
    assert done["skipped"] == ["t.toml: algorithms: required key is missing"]
    assert load_runs(last).set_index("run_id").loc["r9", "unit"] == "pairs"  # a run of no study: unit_of


def test_credit_records_of_many_runs_read_in_one_parse_equal_the_file_by_file_read(tmp_path, monkeypatch):
    """``load_credit`` reads every run's ``credit.jsonl`` in one pyarrow parse; the frame must be the one the file
    by file read gives (the path it falls back to: a run writing its file, a damaged file), which still drops a
    running run's half-written line and reports a damaged file."""
    import json

    from workbench.results import loader

    store = Store(tmp_path)
    ids = ["r1", "r2", "r3"]
    add_run(store, "r1", "s", "r2", "r3")
    owner = Owner.current()
    rows = {
        rid: [
            {"step": s, "method": f"m{i}", "position": t, "decisive": t == 1, "method_abs": 0.5 * t + s, "corr": None}
            for s in (0, 5)
            for t in range(2)
        ]
        for i, rid in enumerate(ids)
    }
    for rid in ids:
        assert store.claim(rid, owner) == "claimed"
        d = store.run_dir(rid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "credit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[rid]))
    store.finish("r1", owner, "done", 5, 10)
    store.finish("r2", owner, "done", 5, 10)  # r3 still running

    used = []
    columnar = loader._jsonl_columnar
    monkeypatch.setattr(loader, "_jsonl_columnar", lambda files: used.append(columnar(files)) or used[-1])
    fast = loader.load_credit(tmp_path, "s")
    assert used[-1] is not None and fast.attrs["issues"] == []
    assert len(fast) == 12 and list(fast.columns[:3]) == ["run_id", "step", "method"]
    assert fast.groupby("run_id")["method"].first().to_dict() == {"r1": "m0", "r2": "m1", "r3": "m2"}
    assert fast["corr"].isna().all() and fast["decisive"].sum() == 6
    monkeypatch.setattr(loader, "_jsonl_columnar", lambda files: None)
    slow = loader.load_credit(tmp_path, "s")
    pd.testing.assert_frame_equal(fast, slow)

    monkeypatch.setattr(loader, "_jsonl_columnar", lambda files: used.append(columnar(files)) or used[-1])
    with open(store.run_dir("r3") / "credit.jsonl", "a") as f:
        f.write('{"step": 10, "meth')  # the running run is writing its next line
    part = loader.load_credit(tmp_path, "s")
    assert used[-1] is None and part.attrs["issues"] == []
    pd.testing.assert_frame_equal(part, slow)
    (store.run_dir("r1") / "credit.jsonl").write_text('{"step": 0}\nnot json\n')  # a finished run's damaged file
    part = loader.load_credit(tmp_path, "s")
    assert used[-1] is None and [i["run_id"] for i in part.attrs["issues"]] == ["r1"]
    assert sorted(set(part["run_id"])) == ["r2", "r3"] and len(part) == 8
