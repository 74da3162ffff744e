"""Golden runs: every algorithm on every enumerable task, 20 steps at a fixed seed, bitwise.

The refactor of issue 12 (a layered package, one run lifecycle) must not change a single
number. ``tests/golden/runs.json`` holds, for each case, the run's config hash (its run id)
and every row of its ``metrics.jsonl`` except wall-clock times, recorded on CPU before the
refactor. The comparison is exact (``==`` on floats, JSON round-trips them exactly): a
reordered sum or a generator drawn once more shows here.

Regenerate only for a deliberate change of the numbers, in its own commit, and say why::

    HF_HUB_OFFLINE=1 .venv/bin/python tests/test_golden.py --regenerate

Bitwise equality holds on one machine type (same CPU kernels, one torch thread); another
CPU or torch build may differ in the last bits, which is why the file records both.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "runs.json"
TASKS = {
    "bandit": {"name": "bandit", "n_arms": 6, "n_contexts": 2},
    "sequence": {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2},
    "digit_sum": {"name": "digit_sum", "max_digit": 2, "max_len": 4, "max_target": 4},
    "tool_use": {"name": "tool_use", "n_keys": 1, "n_values": 2},
}
ALGOS = [
    "sft",
    "rm",
    "reinforce",
    "rloo",
    "ppo",
    "grpo",
    "dpo",
    "ipo",
    "online_dpo",
    "rft",
    "kto",
    "simpo",
    "orpo",
    "bon",
]
SMALL = {
    "model.n_layer": 1,
    "model.n_embd": 16,
    "model.n_head": 2,
    "steps": 20,
    "eval_every": 5,
    "probe_every": 10,
    "probe_minibatches": 4,
    "batch_size": 16,
    "group_size": 4,
    "lr": 1e-2,
    "seed": 3,
}
CASES: dict[str, tuple[dict, dict]] = {
    f"{algo}/{task}": ({"task": TASKS[task], "algo": {"name": algo}}, {}) for task in TASKS for algo in ALGOS
}
CASES["grpo/bandit/rlhf"] = (
    {"task": TASKS["bandit"], "algo": {"name": "grpo"}},
    {"sft_warmup_steps": 5, "reward_model": "fit", "rm_steps": 5, "rm_pairs": 64},
)
CASES["ppo/sequence/native"] = ({"task": TASKS["sequence"], "algo": {"name": "ppo"}}, {"model.impl": "native"})
TRL = {"backend": "trl", "steps": 6, "eval_every": 2, "probe_every": 0, "model.impl": "hf"}
CASES["grpo/sequence/trl"] = ({"task": TASKS["sequence"], "algo": {"name": "grpo"}}, TRL)
CASES["dpo/sequence/trl"] = (
    {"task": TASKS["sequence"], "algo": {"name": "dpo"}},
    {**TRL, "algo.labels": "sampled", "algo.batch_size": 8},
)
STACKED = {"grpo/sequence/stacked": ({"task": TASKS["sequence"], "algo": {"name": "grpo"}}, {"model.impl": "native"})}
STACKED_SEEDS = (3, 4)
SKIP = ("time/",)  # wall-clock: the only thing that may differ


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


def _train_case(name: str, tmp: Path) -> dict:
    from workbench.config import resolve
    from workbench.training import train

    raw, sets = CASES[name]
    res = resolve(raw, {**SMALL, **sets, "save_checkpoint": False})
    result = train(res, tmp / name.replace("/", "_"), progress=False)
    return {"config_hash": res.config_hash, "status": result["status"], "rows": _rows(tmp / name.replace("/", "_"))}


def _train_stacked(name: str, tmp: Path) -> dict:
    from workbench.config import resolve
    from workbench.training import train_seeds

    raw, sets = STACKED[name]
    reses = [resolve(raw, {**SMALL, **sets, "save_checkpoint": False, "seed": s}) for s in STACKED_SEEDS]
    outs = [tmp / f"{name.replace('/', '_')}_{s}" for s in STACKED_SEEDS]
    results = train_seeds(reses, outs)
    return {
        "config_hash": [r.config_hash for r in reses],
        "status": [r["status"] for r in results],
        "rows": [_rows(o) for o in outs],
    }


def _machine() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}


def _load() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: regenerate it (see the module docstring)")
    return _load()


def _assert_same(got, want, name: str) -> None:
    assert got["config_hash"] == want["config_hash"], f"{name}: the run id changed"
    assert got["status"] == want["status"], name
    assert len(got["rows"]) == len(want["rows"]), name
    for g, w in zip(got["rows"], want["rows"], strict=True):
        if isinstance(g, list):  # stacked: one list of rows per seed
            _assert_same({"config_hash": 0, "status": 0, "rows": g}, {"config_hash": 0, "status": 0, "rows": w}, name)
            continue
        assert g.keys() == w.keys(), f"{name} step {w.get('step')}: metric names {sorted(g.keys() ^ w.keys())}"
        diff = {k: (g[k], w[k]) for k in w if g[k] != w[k]}
        assert not diff, f"{name} step {w.get('step')}: got != golden for {diff}"


@pytest.mark.parametrize("name", list(CASES))
def test_run_equals_golden(name, golden, tmp_path):
    _assert_same(_train_case(name, tmp_path), golden["cases"][name], name)


@pytest.mark.parametrize("name", list(STACKED))
def test_stacked_seeds_equal_golden(name, golden, tmp_path):
    _assert_same(_train_stacked(name, tmp_path), golden["cases"][name], name)


def test_golden_covers_every_algorithm_on_every_enumerable_task(golden):
    from workbench.config import resolve
    from workbench.registry import BUILT_IN
    from workbench.registry import TASKS as REGISTERED

    enumerable = [t for t in REGISTERED if resolve({"task": {"name": t}, "algo": {"name": "sft"}}).task.enumerable]
    assert sorted(TASKS) == sorted(enumerable)
    assert sorted(ALGOS) == sorted(s.name for s in BUILT_IN)  # plugins (tests/test_toy_algorithm.py) aside
    assert set(golden["cases"]) == set(CASES) | set(STACKED)


def regenerate() -> None:
    import tempfile

    torch.set_num_threads(1)
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            cases[name] = _train_case(name, Path(tmp))
            print(name, cases[name]["status"], len(cases[name]["rows"]), "rows", flush=True)
        for name in STACKED:
            cases[name] = _train_stacked(name, Path(tmp))
            print(name, cases[name]["status"], flush=True)
    GOLDEN.write_text(json.dumps({"recorded_on": _machine(), "cases": cases}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --regenerate")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    regenerate()
