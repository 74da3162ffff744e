"""`workbench export` and the `report_to` setting: finished runs read back with each tracker's own reader.

A tiny study (2 runs, 4 steps) is exported to TensorBoard, W&B (offline), MLflow (SQLite store) and
trackio (local); each tracker's own reader must give back every metric of ``metrics.jsonl`` at
its steps, with its value (TensorBoard: as float32, its scalar type), and the grouping.
"""

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main
from workbench.config import ConfigError, resolve
from workbench.results import load_runs
from workbench.studies import load_study, run_study
from workbench.studies.executors import InlineExecutor

STUDY = """
name = "tiny_export"
claims = ["C6"]
seeds = [0]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 4
batch_size = 8

[settings]
eval_every = 2
probe_every = 0
save_checkpoint = false
model = { n_layer = 1, n_embd = 16, n_head = 2 }
{extra}
[[algorithms]]
name = "sft"

[[algorithms]]
name = "grpo"
"""


def _train(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_export.toml"
    path.write_text(STUDY.replace("{extra}", extra))
    out = run_study(load_study(path), folder / "results", InlineExecutor(), progress=False, quiet=True)
    assert out.ok and out.count("done") == 2
    return folder / "results"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("export"))


def logged(results: Path) -> dict[str, dict[str, dict[int, float]]]:
    """run id -> metric -> step -> value, straight from each run's metrics.jsonl (nulls left out)."""
    out = {}
    for rid in load_runs(results, "tiny_export")["run_id"]:
        per: dict = {}
        for line in (results / "runs" / rid / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            for k, v in row.items():
                if k != "step" and v is not None:
                    per.setdefault(k, {})[row["step"]] = float(v)
        out[rid] = per
    return out


def export(results: Path, tracker: str, dest: Path, capsys) -> str:
    code = main(["export", "tiny_export", "--to", tracker, str(dest), "--results", str(results)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_tensorboard_export_holds_every_metric_at_its_steps(results, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    dest = tmp_path / "tb"
    assert "2 run(s) exported to tensorboard" in export(results, "tensorboard", dest, capsys)
    want = logged(results)
    runs = load_runs(results, "tiny_export").set_index("run_id")
    for rid, metrics in want.items():
        logdir = dest / "tiny_export" / "bandit" / runs.loc[rid, "algo_label"] / f"seed0-{rid}"
        acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
        acc.Reload()
        assert set(acc.Tags()["scalars"]) == set(metrics)  # the metric names of metrics.jsonl, no other
        for name, by_step in metrics.items():
            got = {e.step: e.value for e in acc.Scalars(name)}
            assert got == {s: float(np.float32(v)) for s, v in by_step.items()}, name
    assert "reward/mean" in want[runs.index[runs["algo_label"] == "grpo"][0]]  # (an online metric was checked)

    again = export(results, "tensorboard", dest, capsys)  # a second export skips what is there
    assert "0 run(s) exported" in again and "2 exported there before" in again
    assert len(list(dest.rglob("events.out.tfevents.*"))) == 2


def _wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file: LevelDB log blocks (32 KiB; 7-byte chunk headers) after
    W&B's 7-byte file header, each a ``wandb_internal_pb2.Record`` (wandb no longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):  # full, first
            buf = chunk
        elif kind in (3, 4):  # middle, last
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_export_holds_every_metric_and_the_grouping(results, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # the export is offline whatever the environment says
    dest = tmp_path / "wandb"
    export(results, "wandb", dest, capsys)
    want = logged(results)
    runs = load_runs(results, "tiny_export").set_index("run_id")
    files = sorted(dest.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    for f in files:
        history: dict = {}
        run = None
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                step = items.pop("_step")
                history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
        rid = run.run_id
        algo = runs.loc[rid, "algo_label"]
        assert (run.project, run.run_group, run.job_type) == ("tiny_export", f"bandit/{algo}", algo)
        assert run.display_name == f"{algo}-bandit-seed0" and f"run_id={rid}" in run.tags
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["task.name"] == "bandit" and config["algo.name"] == algo and config["seed"] == 0
        got: dict = {}
        for step, vals in history.items():
            for k, v in vals.items():
                got.setdefault(k, {})[step] = v
        assert got == want[rid]  # full float64 values, every metric at its steps


def test_mlflow_export_reads_back_with_its_client(results, tmp_path, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    dest = tmp_path / "mlflow"
    export(results, "mlflow", dest, capsys)
    client = MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_export")
    found = client.search_runs([exp.experiment_id])
    want = logged(results)
    assert sorted(r.data.tags["workbench.run_id"] for r in found) == sorted(want)
    for r in found:
        rid, algo = r.data.tags["workbench.run_id"], r.data.tags["workbench.algorithm"]
        assert r.info.run_name == f"{algo}-bandit-seed0" and r.data.tags["group"] == f"bandit/{algo}"
        assert r.data.params["task.name"] == "bandit" and r.data.params["model.n_layer"] == "1"
        assert set(r.data.metrics) == set(want[rid])
        for name, by_step in want[rid].items():
            hist = client.get_metric_history(r.info.run_id, name)
            assert {m.step: m.value for m in hist} == by_step, name


def test_trackio_export_reads_back_from_its_local_store(results, tmp_path, capsys):
    if importlib.util.find_spec("trackio") is None:  # (not imported: trackio reads TRACKIO_DIR once, on import)
        pytest.skip("trackio is not installed (not in scripts/install.sh: it requires pillow<13, pyproject.toml)")
    if "trackio.utils" in sys.modules:
        pytest.skip("trackio was imported already (it reads TRACKIO_DIR once)")
    dest = tmp_path / "trackio"
    export(results, "trackio", dest, capsys)
    from trackio.sqlite_storage import SQLiteStorage

    want = logged(results)
    runs = load_runs(results, "tiny_export").set_index("run_id")
    for rid, metrics in want.items():
        logs = SQLiteStorage.get_logs("tiny_export", f"{runs.loc[rid, 'algo_label']}-bandit-seed0-{rid}")
        got: dict = {}
        for row in logs:
            for k, v in row.items():
                if k not in ("step", "timestamp") and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    got.setdefault(k, {})[row["step"]] = v
        assert got == metrics


@pytest.mark.parametrize(
    ("tracker", "package"),
    [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")],
)
def test_a_missing_tracker_package_exits_2_naming_the_extra(results, tmp_path, capsys, monkeypatch, tracker, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails: as if not installed
    code = main(["export", "tiny_export", "--to", tracker, str(tmp_path / "x"), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"pip install 'workbench[{tracker}]'" in err and f"exporting to {tracker}" in err
    assert not (tmp_path / "x").exists()  # said before anything was written


def test_export_of_an_unknown_or_unfinished_study_exits_2(results, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    assert main(["export", "nope", "--to", "tensorboard", str(tmp_path / "x"), "--results", str(results)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["export", "tiny_export", "--to", "tensorboard", str(tmp_path), "--results", str(tmp_path)]) == 2
    assert "no results at" in capsys.readouterr().err


def test_report_to_exports_each_run_as_it_finishes_and_changes_no_run(results, tmp_path):
    pytest.importorskip("tensorboard")
    live = _train(tmp_path, 'report_to = ["tensorboard"]\n')
    before, after = load_runs(results, "tiny_export"), load_runs(live, "tiny_export")
    assert sorted(before["run_id"]) == sorted(after["run_id"])  # report_to is not part of the run id
    want = logged(results)
    for rid, metrics in logged(live).items():  # the same trajectory (wall time apart)
        assert {k: v for k, v in metrics.items() if not k.startswith("time/")} == {
            k: v for k, v in want[rid].items() if not k.startswith("time/")
        }
    assert len(list((live / "trackers" / "tensorboard" / "tiny_export").rglob("events.out.tfevents.*"))) == 2
    assert sorted(
        p.name for p in (live / "trackers" / "tensorboard" / ".workbench-export" / "tensorboard").iterdir()
    ) == (sorted(want))


def test_report_to_names_the_trackers_on_a_typo():
    with pytest.raises(ConfigError, match="report_to") as e:
        resolve({"task": {"name": "bandit"}, "algo": {"name": "sft"}}, {"report_to": ["tensorbord"]})
    assert "tensorboard" in str(e.value) and "wandb" in str(e.value)


def test_train_with_report_to_exports_its_run_folder(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out = tmp_path / "run"
    sets = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "batch_size=8", "save_checkpoint=false"]
    argv = ["train", "--task", "bandit", "--algo", "sft", "--steps", "3", "--out", str(out), "--quiet"]
    argv += [a for s in [*sets, 'report_to=["tensorboard"]'] for a in ("--set", s)]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (logdir,) = {p.parent for p in (out / "trackers" / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss/sft")} == {
        r["step"]: float(np.float32(r["loss/sft"])) for r in rows if r.get("loss/sft") is not None
    }
    assert logdir.name == f"seed0-{json.loads((out / 'config.json').read_text())['config_hash']}"


def test_report_to_without_the_package_stops_the_study_before_it_trains(tmp_path, monkeypatch):
    from workbench.results.export import MissingExtra

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtra, match=r"pip install 'workbench\[wandb\]'"):
        _train(tmp_path, 'report_to = ["wandb"]\n')
    assert not list((tmp_path / "results" / "runs").iterdir())  # nothing trained
