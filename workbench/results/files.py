"""The results folder and a run folder's files: where they are, how they are written, how one is read.

Owns the layout below (documented in ``docs/results.md``), the storage faults (``StoreFault``:
a full disk, a read-only folder, no permission), the reserve file, atomic publishing
(``publish``, ``publish_text``, ``publish_metrics``, ``publish_policy``) and the reads of one
run folder (``read_status``, ``read_progress``, ``published``, ``consumption``). The SQLite
index is ``workbench.results.index``'s; reading many runs is ``workbench.results.loader``'s.

Layout::

    <results>/                      --results, else $WORKBENCH_RESULTS, else ./results
      index.sqlite                  studies, runs, study_runs, events (WAL mode)
      studies/<study>.toml          the study file as last run
      studies/<study>.plan.json     the study as registered: its expanded runs (rebuilds the index)
      cache/reward_models/<key>.pt  reward models fitted inside runs (reward_model = "fit"), shared by the runs
                                    whose fit reads the same settings (workbench.training.pipeline)
      runs/<run_id>/                run_id = config hash of the resolved run config
        config.json                 written by train(): config, config_hash, model summary
        metrics.jsonl               appended line by line while the run trains
        metrics.parquet             published atomically once the run has ended
        samples.jsonl               a few rendered completions per evaluation
        status.json                 {"status": "done" | "diverged", "step", "reason"}
        checkpoint/                 safetensors weights + config + tokenizer
        error.txt                   the traceback of a failed run

``metrics.parquet`` is the commit point: a run whose folder holds it (and a ``status.json``
saying done or diverged) has finished, whatever the index says, so a process killed between
publishing and updating the index loses nothing.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

INDEX = "index.sqlite"
FINISHED = ("done", "diverged")  # a run in one of these is never run again


def results_dir(arg: str | os.PathLike | None = None) -> Path:
    """``--results``, else ``$WORKBENCH_RESULTS``, else ``./results``."""
    return Path(arg or os.environ.get("WORKBENCH_RESULTS") or "results")


# -- faults of the storage: full disk, read-only folder, no permission -----------------------------

# errors that are the storage's, not the run's: anywhere, and (permissions) inside the results folder
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
# SQLite primary result codes: PERM, READONLY, IOERR, FULL, CANTOPEN
_SQLITE_STORAGE = {3, 8, 10, 13, 14}
_SQLITE_STORAGE_WORDS = ("disk is full", "readonly database", "unable to open database", "disk i/o error")


class StoreFault(Exception):
    """The results folder cannot be written: a full disk, a read-only folder, no permission.

    ``str()`` is one line naming the path. Nothing is lost: what was written stays, the runs
    in flight are released, and ``workbench run`` resumes once the space or permission is back.
    """

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {self.path}: {reason}")


def storage_fault(exc: BaseException, path=None, root=None) -> StoreFault | None:
    """``exc`` as a ``StoreFault`` when the storage is at fault (it, or what it was raised from), else ``None``.

    A full disk, a quota, a read-only file system: anywhere. No permission (EACCES, EPERM):
    where ``root`` is given, only for a path inside it (a checkpoint the run cannot read is
    the run's problem). SQLite's full / read-only / cannot-open / I/O errors name ``path``.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StoreFault):
            return e
        if isinstance(e, OSError) and (e.errno in _SPACE_ERRNOS or e.errno in _PERMISSION_ERRNOS):
            where = e.filename if e.filename is not None else path
            inside = root is None or where is None or _inside(where, root)
            if e.errno in _SPACE_ERRNOS or inside:
                return StoreFault(where if where is not None else "?", e.strerror or str(e))
        if isinstance(e, sqlite3.OperationalError):
            code = getattr(e, "sqlite_errorcode", None)
            if (code is not None and code & 0xFF in _SQLITE_STORAGE) or any(
                w in str(e).lower() for w in _SQLITE_STORAGE_WORDS
            ):
                return StoreFault(path if path is not None else INDEX, str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in (exc, exc.__cause__, exc.__context__) if x is not None)
    for words in _SPACE_WORDS:  # errors that carry the OS error as text only (safetensors, torch's writers)
        if words in text:
            return StoreFault(path if path is not None else "?", words)
    return None


_SPACE_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _inside(path, root) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except (ValueError, TypeError):
        return False


RESERVE = ".reserve"  # <results>/.reserve: space kept back so that a full disk still lets a runner release its runs
RESERVE_BYTES = 256 * 1024


def _keep_reserve(root: Path) -> None:
    """Write the reserve file if it is missing (quietly: no space is no reason to stop here)."""
    path = root / RESERVE
    if path.exists():
        return
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
    except OSError:
        path.unlink(missing_ok=True)


def free_reserve(results) -> bool:
    """Delete the reserve file (a full disk: the index can then record releases). Returns whether there was one."""
    try:
        (results_dir(results) / RESERVE).unlink()
        return True
    except OSError:
        return False


# -- atomic publishing ----------------------------------------------------------------------


def fsync_dir(d: Path, tolerant: bool = False) -> None:
    """Make a directory's entries (a rename, a new file) durable. Platforms without directory fds are
    skipped; ``tolerant``: a failing fsync is ignored too (filesystems that refuse it on directories)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        if not tolerant:
            raise
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def publish(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``write(f)`` fills a temporary file in the same folder; it is fsynced, the folder is
    fsynced, ``os.replace`` moves it into place and the folder is fsynced again.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600; published files read like their neighbours
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def store_root(run_dir: str | os.PathLike) -> Path | None:
    """The results folder that holds ``run_dir`` (``<results>/runs/<run_id>``), or None for a run folder outside
    a results folder (``workbench train --out DIR``)."""
    run_dir = Path(run_dir)
    root = run_dir.parent.parent
    return root if run_dir.parent.name == "runs" and (root / INDEX).exists() else None


def publish_text(path: str | os.PathLike, text: str) -> Path:
    return publish(path, lambda f: f.write(text.encode()))


def publish_metrics(run_dir: str | os.PathLike) -> Path:
    """Convert the finished run's ``metrics.jsonl`` to ``metrics.parquet``, atomically."""
    import pyarrow as pa  # heavy optional: pyarrow loads only where parquet is read or written
    import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

    run_dir = Path(run_dir)
    rows, problem = _read_jsonl(run_dir / "metrics.jsonl")
    if problem:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: {problem}")
    table = pa.Table.from_pandas(_metrics_frame(rows), preserve_index=False)
    return publish(run_dir / "metrics.parquet", lambda f: pq.write_table(table, f))


def _metrics_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows of ``metrics.jsonl`` -> a frame: ``step``, ``samples``, then metric names sorted; null -> NaN."""
    df = pd.DataFrame.from_records(rows)
    for c in ("step", "samples"):  # present even when nothing was logged (diverged at step 0)
        if c not in df:
            df[c] = pd.Series(dtype="int64")
    metrics = sorted(c for c in df.columns if c not in ("step", "samples"))
    df = df[[c for c in ("step", "samples") if c in df.columns] + metrics]
    return df.astype({c: "float64" for c in metrics})


def _read_jsonl(path: Path) -> tuple[list[dict], str | None]:
    """Complete rows, and what is wrong with the file (``None`` when nothing is).

    A last line without its newline is a write in progress or a truncation; any line that
    does not parse as a JSON object is corruption.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], "missing"
    return _parse_jsonl(data)


def _parse_jsonl(data: bytes) -> tuple[list[dict], str | None]:
    """``_read_jsonl`` of a file's bytes."""
    lines = data.split(b"\n")
    rows, problem = [], None
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        problem = f"truncated: line {len(lines)} has no end ({len(lines[-1])} bytes)"
        lines.pop()
    try:  # every line at once (one parser call: about 2x faster); line by line to find a bad one
        rows = json.loads(b"[" + b",".join(lines) + b"]")
        if len(rows) == len(lines) and all(isinstance(r, dict) for r in rows):
            return rows, problem
    except ValueError:
        pass
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return rows, f"line {i} is not a JSON object ({e})"
        rows.append(row)
    return rows, problem


def _jsonl_columnar(files: list[tuple[str, bytes]]) -> pd.DataFrame | None:
    """Many runs' JSON-lines files (run id, the file's bytes) in one pyarrow parse, ``run_id`` first (the runs'
    ids by their line counts): the same frame as reading them file by file, in less than half the time (the
    credit records of 250 runs x 205 lines: 0.25 s against 0.55 s, 2 cores).
    None where that is not sure to be the same: no file, a file without its final newline (a run writing it), a
    blank line, or anything pyarrow does not read as one row a line; the caller then reads file by file and
    reports what is wrong."""
    import pyarrow as pa  # heavy optional: pyarrow loads only where it is read
    import pyarrow.json as pj

    data = [d for _, d in files]
    if not data or any(not d.endswith(b"\n") or d.startswith(b"\n") or b"\n\n" in d for d in data):
        return None
    counts = [d.count(b"\n") for d in data]
    try:
        table = pj.read_json(pa.BufferReader(b"".join(data)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != sum(counts) or "run_id" in table.column_names:
        return None
    ids = np.repeat(np.array([rid for rid, _ in files], dtype=object), counts)
    return table.add_column(0, "run_id", pa.array(ids, pa.string())).to_pandas()


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The run folder's ``status.json``, or ``None`` when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def read_progress(run_dir: str | os.PathLike) -> dict | None:
    """The last complete row of a running run's ``metrics.jsonl`` (for progress bars), or ``None``."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[:-1]):  # the part after the last newline is incomplete
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def published(run_dir: str | os.PathLike, verify: bool = False) -> dict | None:
    """``status.json`` of a run that has finished and published its metrics, else ``None``.

    With ``verify``, ``metrics.parquet`` must also read whole; one that does not is
    published again from ``metrics.jsonl`` when that file is complete (``republished`` is
    then set in the returned dict), else the run counts as unpublished (it is run again).
    """
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if not (st and st.get("status") in FINISHED and (run_dir / "metrics.parquet").exists()):
        return None
    if verify and not _parquet_reads(run_dir / "metrics.parquet"):
        rows, problem = _read_jsonl(run_dir / "metrics.jsonl")
        if problem or (st["status"] == "done" and (not rows or rows[-1].get("step") != st.get("step"))):
            return None  # not the whole record of the run: run it again
        try:
            publish_metrics(run_dir)
        except (ValueError, OSError) as e:  # metrics.jsonl damaged too (or the folder is not writable): run it again
            if storage_fault(e) is not None:
                raise
            return None
        if not _parquet_reads(run_dir / "metrics.parquet"):
            return None
        st = {**st, "republished": True}
    return st


def _parquet_reads(path: Path) -> bool:
    import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

    try:
        pq.read_table(path)
        return True
    except Exception:  # noqa: BLE001  pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        return False


def consumption(run_dir: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(step, samples)`` of the last complete row a run logged (``metrics.jsonl``, else ``metrics.parquet``)."""
    run_dir = Path(run_dir)
    row = read_progress(run_dir)
    if row is None and (run_dir / "metrics.parquet").exists():
        import pyarrow.parquet as pq  # heavy optional: pyarrow loads only where parquet is read or written

        try:
            t = pq.read_table(run_dir / "metrics.parquet", columns=["step", "samples"]).to_pylist()
            row = t[-1] if t else None
        except Exception:  # noqa: BLE001
            row = None
    if not row:
        return None, None
    as_int = lambda v: int(v) if isinstance(v, (int, float)) and v == v else None  # noqa: E731
    return as_int(row.get("step")), as_int(row.get("samples"))


POLICY = "policy.npy"  # a run's final policy on an enumerable task: log pi(y|x), (P eval prompts, N completions)


def publish_policy(run_dir: str | os.PathLike, logp) -> Path:
    """Write a run's final exact log-probabilities ``(P, N)`` (float32) to ``policy.npy``, atomically."""

    arr = np.asarray(logp, dtype=np.float32)
    return publish(Path(run_dir) / POLICY, lambda f: np.save(f, arr))
