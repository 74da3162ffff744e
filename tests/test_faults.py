"""When something goes wrong (issue 11): a damaged index, a full disk, a read-only folder, unreadable
published files, `train --out` over an existing folder, a closed pipe, file modes.

Each fault is injected where it strikes (an ``OSError`` with its errno at a write point, a
SQLite error from the index, bytes overwritten in a file): the tests run as root here, where
``chmod`` does not stop a write. Every case checks the exit status, a one-line message naming
the path, no traceback, that no run is left 'running', and that the rerun ends with the
metrics of an uninterrupted run.
"""

import errno
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from workbench.cli import main
from workbench.results import LoadWarning, Store, StoreFault, load_metrics, load_runs, publish_text, storage_fault
from workbench.results import index as store_index
from workbench.studies import executors, format_summary, load_study, run_study, summarize
from workbench.studies.executors import InlineExecutor

STUDY = """
name = "faults"
claims = ["C6"]
seeds = [0]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 3
batch_size = 8

[settings]
eval_every = 2
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }

[[algorithms]]
name = "sft"
"""


def write_study(folder: Path, extra: str = "") -> Path:
    path = folder / "faults.toml"
    path.write_text(STUDY + extra)
    return path


def run_inline(path, results):
    return run_study(load_study(path), results, InlineExecutor(), progress=False, quiet=True)


def no_time(df: pd.DataFrame) -> pd.DataFrame:
    df = df[[c for c in df.columns if not c.startswith("time/")]]
    return df.sort_values(["run_id", "step"]).reset_index(drop=True)


def metrics(results) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadWarning)  # every run must load
        return no_time(load_metrics(results, "faults"))


def statuses(results) -> dict:
    return dict(load_runs(results, "faults")[["run_id", "status"]].itertuples(index=False))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The study run once, uninterrupted: the metrics every rerun must reproduce."""
    folder = tmp_path_factory.mktemp("baseline")
    run_inline(write_study(folder), folder / "results")
    return metrics(folder / "results")


@pytest.fixture
def cli_inline(monkeypatch):
    """`workbench run` executing runs in this process (so that faults injected here strike)."""
    monkeypatch.setattr(executors, "LocalProcessExecutor", lambda n, preload=(): InlineExecutor())


def one_line_error(err: str, *fragments: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)


# -- 1: status with finished, diverged and failed runs -----------------------------------------------


def test_status_with_done_diverged_and_failed_runs(tmp_path, capsys, monkeypatch):
    import workbench.training as train_mod

    real = train_mod.train

    def train(res, out, progress=True):  # the ppo run fails with an exception
        if res.spec.name == "ppo":
            raise RuntimeError("boom: a run that fails")
        return real(res, out, progress)

    monkeypatch.setattr(train_mod, "train", train)
    extra = (
        '\n[[algorithms]]\nname = "sft"\nlabel = "sft-huge-lr"\nsettings = { lr = 1e12 }\n\n'
        '[[algorithms]]\nname = "ppo"\n'
    )
    path, results = write_study(tmp_path, extra), tmp_path / "results"
    out = run_inline(path, results)
    assert sorted(out.statuses.values()) == ["diverged", "done", "done", "failed"]
    capsys.readouterr()
    assert main(["status", "faults", "--results", str(results)]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    for word in ("done", "diverged", "failed", "boom: a run that fails", "non-finite", "24 completions"):
        assert word in cap.out, word
    assert main(["status", "--results", str(results)]) == 0 and "faults" in capsys.readouterr().out


# -- 2: a damaged index ------------------------------------------------------------------------------


def damage_random(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def damage_middle(path: Path) -> None:
    n = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(n // 2 - 1536)
        f.write(random.Random(1).randbytes(3072))


def is_damaged(path: Path) -> bool:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError:
        return True
    finally:
        db.close()


@pytest.mark.parametrize("damage", [damage_random, damage_middle])
def test_damaged_index_is_set_aside_and_rebuilt_with_consumption(damage, tmp_path, capsys, baseline, cli_inline):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    before = load_runs(results, "faults").set_index("run_id")[["status", "step", "samples", "unit"]]
    damage(results / "index.sqlite")
    assert is_damaged(results / "index.sqlite")
    capsys.readouterr()

    assert main(["status", "faults", "--results", str(results)]) == 0
    cap = capsys.readouterr()
    one_line_error(
        cap.err,
        f"{results / 'index.sqlite'} was damaged",
        "set it aside as index.sqlite.corrupt-",
        "rebuilt it from 1 study",
    )
    assert (
        "24 completions" in cap.out and "24 demos" in cap.out and "consumed" in cap.out
    )  # consumption from the run folders
    aside = [p.name for p in results.iterdir() if p.name.startswith("index.sqlite.corrupt-")]
    aside = [a for a in aside if not a.endswith(("-wal", "-shm"))]
    assert len(aside) == 1
    after = load_runs(results, "faults").set_index("run_id")[["status", "step", "samples", "unit"]]
    pd.testing.assert_frame_equal(after.sort_index(), before.sort_index(), check_dtype=False)

    assert main(["list", "--results", str(results), "--studies", str(tmp_path)]) == 0  # sound now: nothing to say
    cap = capsys.readouterr()
    assert cap.err == "" and "faults" in cap.out and "2/2" in cap.out
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 0
    assert "trained now: 0, finished before: 2" in capsys.readouterr().out
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


def test_damaged_index_found_by_run_and_list(tmp_path, capsys, cli_inline):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    damage_random(results / "index.sqlite")
    assert main(["list", "--results", str(results), "--studies", str(tmp_path)]) == 0
    assert "was damaged" in capsys.readouterr().err
    damage_random(results / "index.sqlite")
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "was damaged" in cap.err and "trained now: 0, finished before: 2" in cap.out
    assert len(list(results.glob("index.sqlite.corrupt-*"))) == 2


def test_damage_the_check_misses_is_caught_where_it_strikes(tmp_path, capsys, monkeypatch):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    damage_random(results / "index.sqlite")
    store_index._CHECKED.clear()
    real, calls = store_index.index_problem, []
    monkeypatch.setattr(
        store_index, "index_problem", lambda p: None if not calls.append(p) and len(calls) == 1 else real(p)
    )
    assert main(["status", "faults", "--results", str(results)]) == 0  # the first check sees nothing; the query fails
    cap = capsys.readouterr()
    one_line_error(cap.err, "was damaged", "running again")
    assert "24 completions" in cap.out


def test_deleted_index_recovers_runs_with_their_consumption(tmp_path, baseline):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    for p in results.glob("index.sqlite*"):
        p.unlink()
    out = run_inline(path, results)  # registers the study again: the published runs are recovered, not retrained
    assert out.executed == [] and len(out.already) == 2
    runs = load_runs(results, "faults").set_index("algo")
    assert runs.loc["grpo", "samples"] == 3 * 8 * 1 and runs.loc["sft", "samples"] == 3 * 8
    assert (runs["step"] == 3).all()
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


# -- 4: a full disk, a read-only folder ----------------------------------------------------------------


def assert_released(results) -> None:
    assert "running" not in statuses(results).values()


def test_full_disk_in_a_run_stops_releases_and_resumes_exactly(tmp_path, capsys, monkeypatch, baseline, cli_inline):
    import workbench.studies.execute as execute_mod  # execute_run looks publish_metrics up there

    real = execute_mod.publish_metrics

    def full(run_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(run_dir) / ".metrics.parquet.x.tmp"))

    monkeypatch.setattr(execute_mod, "publish_metrics", full)
    path, results = write_study(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 4
    one_line_error(
        capsys.readouterr().err,
        "cannot write",
        str(results / "runs"),
        "No space left on device",
        "1 run(s) in flight released",
        f"workbench run {path} --results {results}",
    )
    assert set(statuses(results).values()) == {"queued"}
    monkeypatch.setattr(execute_mod, "publish_metrics", real)  # the space is back
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 0
    assert "trained now: 2" in capsys.readouterr().out
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


def test_full_index_stops_releases_and_resumes_exactly(tmp_path, capsys, monkeypatch, baseline, cli_inline):
    real = Store.finish
    calls = []

    def finish(self, *a, **kw):  # SQLite's own words when the disk is full
        calls.append(a)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "finish", finish)
    path, results = write_study(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 4
    one_line_error(capsys.readouterr().err, f"cannot write {results / 'index.sqlite'}: database or disk is full")
    assert sorted(statuses(results).values()) == ["done", "queued"]  # the second was published, then released
    monkeypatch.setattr(Store, "finish", real)
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained now: 0, finished before: 2" in out  # recovered from its published files, not retrained
    assert (load_runs(results, "faults")["samples"] > 0).all()
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


def test_read_only_run_folder_stops_releases_and_resumes_exactly(tmp_path, capsys, monkeypatch, baseline, cli_inline):
    import workbench.training as train_mod

    real = train_mod.train
    denied = []

    def train(res, out, progress=True):
        if res.spec.name == "sft" and not denied:
            denied.append(out)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(out) / "metrics.jsonl"))
        return real(res, out, progress)

    monkeypatch.setattr(train_mod, "train", train)
    path, results = write_study(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 4
    one_line_error(capsys.readouterr().err, f"cannot write {Path(denied[0]) / 'metrics.jsonl'}: Permission denied")
    assert sorted(statuses(results).values()) == ["done", "queued"]
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 0
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


def test_read_only_results_folder_before_anything_runs(tmp_path, capsys, monkeypatch, cli_inline):
    import workbench.studies.execute as execute_mod  # run_study looks publish_text up there

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(execute_mod, "publish_text", read_only)
    path, results = write_study(tmp_path), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 4
    one_line_error(
        capsys.readouterr().err,
        f"cannot write {results / 'studies' / 'faults.toml'}: Read-only file system",
        "no run was in flight",
    )
    assert set(statuses(results).values()) == {"queued"}


def test_storage_faults_are_told_from_the_runs_own_errors(tmp_path):
    results = tmp_path / "results"
    inside, outside = str(results / "runs" / "x" / "f"), "/elsewhere/reward_model/config.json"
    assert storage_fault(OSError(errno.ENOSPC, "No space left on device", outside), root=results).path == outside
    assert storage_fault(PermissionError(errno.EACCES, "Permission denied", inside), root=results).path == inside
    assert storage_fault(PermissionError(errno.EACCES, "Permission denied", outside), root=results) is None
    assert storage_fault(ValueError("bad value")) is None
    assert storage_fault(sqlite3.OperationalError("database is locked")) is None
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    assert storage_fault(wrapped, path="ckpt").reason == "No space left on device"
    with Store(results) as s:  # a read-only index: one StoreFault naming it
        s.db.execute("PRAGMA query_only=1")
        with pytest.raises(StoreFault, match=f"cannot write {results / 'index.sqlite'}"):
            s.register_study("s", "s.toml", "", ["C1"], "h", [])
        s.db.execute("PRAGMA query_only=0")
        s.register_study("s", "s.toml", "", ["C1"], "h", [])  # the failed transaction was rolled back


def test_read_only_folder_can_still_be_read(tmp_path, capsys):
    """A WAL index in a folder nobody may write (no -shm file, none can be made) is opened as immutable."""
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    assert not (results / "index.sqlite-shm").exists()
    real = store_index._connect

    def read_only(p):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    store_index._CHECKED.clear()
    try:
        store_index._connect = read_only
        assert main(["status", "faults", "--results", str(results)]) == 0
    finally:
        store_index._connect = real
    out = capsys.readouterr().out
    assert "24 completions" in out and "24 demos" in out and "reward/exact" in out


# -- 5: unreadable published files ---------------------------------------------------------------------


def test_garbage_parquet_is_counted_unreadable_then_republished(tmp_path, baseline):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    d = Path(load_runs(results, "faults").set_index("algo").loc["grpo", "path"])
    (d / "metrics.parquet").write_bytes(b"PAR1 garbage PAR1")
    table = format_summary(summarize(results, "faults"))
    assert "0/1 1 unreadable" in table and "1/1" in table  # not '1/1 done' for a run that is not averaged
    out = run_inline(path, results)
    assert out.executed == [] and out.count("done") == 2  # published again from metrics.jsonl, not retrained
    runs = load_runs(results, "faults")
    assert (runs["attempts"] == 1).all()
    with sqlite3.connect(results / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM events WHERE event='republished'").fetchone()[0] == 1
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)
    assert "0/1" not in format_summary(summarize(results, "faults"))


def test_unreadable_parquet_and_jsonl_are_run_again(tmp_path, baseline):
    path, results = write_study(tmp_path), tmp_path / "results"
    run_inline(path, results)
    d = Path(load_runs(results, "faults").set_index("algo").loc["sft", "path"])
    (d / "metrics.parquet").write_bytes(b"garbage")
    (d / "metrics.jsonl").write_text('{"step": 0, "samples": 0}\n{"step": 1, "sam')
    out = run_inline(path, results)
    assert len(out.executed) == 1 and out.count("done") == 2
    assert load_runs(results, "faults").set_index("algo").loc["sft", "attempts"] == 2
    pd.testing.assert_frame_equal(metrics(results), baseline, check_exact=True)


# -- 3 and 11: `workbench train --out` --------------------------------------------------------------------

TRAIN = [
    "train",
    "--task",
    "bandit",
    "--algo",
    "sft",
    "--steps",
    "2",
    "--quiet",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=16",
    "--set",
    "model.n_head=2",
]


def test_train_refuses_an_existing_run_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    (out / "metrics.parquet").write_bytes(b"the old run's table")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*TRAIN, "--seed", "1", "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, f"--out {out}: already holds files", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost
    assert main([*TRAIN, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "metrics.parquet").exists()  # cleared first: no old file beside the new config
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    assert main([*TRAIN, "--out", str(other), "--overwrite"]) == 2
    assert "not a run folder" in capsys.readouterr().err and (other / "thesis.tex").exists()


def test_train_out_at_a_file_or_an_unwritable_folder_exits_2(tmp_path, capsys, monkeypatch):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main([*TRAIN, "--out", str(f)]) == 2
    one_line_error(capsys.readouterr().err, f"--out {f}: exists and is not a folder")
    assert main([*TRAIN, "--out", str(f / "sub")]) == 2
    one_line_error(capsys.readouterr().err, f"--out {f / 'sub'}: cannot write there")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: the refusal is injected where the folder is tried
        import workbench.cli as cli

        def denied(*a, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))

        monkeypatch.setattr(cli.tempfile, "TemporaryFile", denied)
    else:
        locked.chmod(0o555)
    assert main([*TRAIN, "--out", str(locked)]) == 2
    one_line_error(capsys.readouterr().err, f"--out {locked}: cannot write there (Permission denied)")
    assert not any(locked.iterdir())


# -- 12: a closed pipe ------------------------------------------------------------------------------------


def test_status_into_a_closed_pipe_exits_quietly(tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "status", "--results", str(tmp_path / "none")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and err == "", err


# -- 13: file modes ----------------------------------------------------------------------------------------


def test_published_files_get_the_mode_of_their_neighbours(tmp_path):
    old = os.umask(0o022)
    try:
        publish_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        os.umask(0o007)
        publish_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o660
        os.umask(0o022)
        path, results = write_study(tmp_path), tmp_path / "results"
        run_inline(path, results)
    finally:
        os.umask(old)
    d = Path(load_runs(results, "faults").set_index("algo").loc["grpo", "path"])
    mode = stat.S_IMODE((d / "config.json").stat().st_mode)
    assert mode == 0o644
    for f in (d / "metrics.parquet", d / "policy.npy", results / "studies" / "faults.toml"):
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
