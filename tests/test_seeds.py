"""Seeds as a batch dimension (``workbench.training.stacked.train_seeds``) against one ``train`` per seed."""

import json

import pytest

from workbench.config import ConfigError, resolve
from workbench.training import train, train_seeds

TASK = {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2}
SETS = {
    "model.n_layer": 1,
    "model.n_embd": 16,
    "model.n_head": 2,
    "model.impl": "native",
    "steps": 4,
    "eval_every": 2,
    "batch_size": 8,
    "group_size": 4,
    "lr": 1e-2,
    "beta": 0.04,
    "probe_every": 0,
}


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_batched_seeds_equal_separate_runs(algo, tmp_path):
    reses = [resolve({"task": TASK, "algo": {"name": algo}}, {**SETS, "seed": s}) for s in (0, 1, 5)]
    results = train_seeds(reses, [tmp_path / f"batched{s}" for s in (0, 1, 5)])
    assert [r["status"] for r in results] == ["done"] * 3
    for res in reses:
        s = res.run.seed
        assert train(res, tmp_path / f"alone{s}", progress=False)["status"] == "done"
        batched, alone = rows(tmp_path / f"batched{s}"), rows(tmp_path / f"alone{s}")
        assert [r["step"] for r in batched] == [r["step"] for r in alone]
        for a, b in zip(batched, alone, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if k != "time/elapsed_s":
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (s, a["step"], k)
        for f in ("config.json", "status.json", "samples.jsonl", "checkpoint/model.safetensors"):
            assert (tmp_path / f"batched{s}" / f).exists()
        cfg = json.loads((tmp_path / f"batched{s}" / "config.json").read_text())
        assert cfg["config_hash"] == res.config_hash and cfg["batched_seeds"] == [0, 1, 5]
    # the seeds really differ
    assert rows(tmp_path / "batched0")[-1]["reward/exact"] != rows(tmp_path / "batched1")[-1]["reward/exact"]


def test_what_cannot_be_batched_is_a_config_error():
    grpo = [resolve({"task": TASK, "algo": {"name": "grpo"}}, {**SETS, "seed": s}) for s in (0, 1)]
    with pytest.raises(ConfigError, match="differ in 'seed' alone"):
        train_seeds([grpo[0], resolve({"task": TASK, "algo": {"name": "grpo"}}, {**SETS, "lr": 0.1})], ["a", "b"])
    with pytest.raises(ConfigError, match="native"):
        train_seeds(
            [
                resolve({"task": TASK, "algo": {"name": "grpo"}}, {**SETS, "model.impl": "hf", "seed": s})
                for s in (0, 1)
            ],
            ["a", "b"],
        )
    with pytest.raises(ConfigError, match="not PPO"):
        train_seeds([resolve({"task": TASK, "algo": {"name": "ppo"}}, {**SETS, "seed": s}) for s in (0, 1)], ["a", "b"])


def test_measurements_do_not_change_stacked_training(tmp_path):
    """As for train(): the seeds' evaluation samples come from their own generators, so eval_every and
    probe_every leave every seed's training quantities unchanged."""

    def stacked(name, **sets):
        reses = [
            resolve({"task": TASK, "algo": {"name": "grpo"}}, {**SETS, "steps": 5, **sets, "seed": s}) for s in (0, 1)
        ]
        outs = [tmp_path / f"{name}{s}" for s in (0, 1)]
        assert [r["status"] for r in train_seeds(reses, outs)] == ["done", "done"]
        return [rows(o) for o in outs]

    a = stacked("a", eval_every=1, probe_every=0)
    b = stacked("b", eval_every=3, probe_every=2, probe_minibatches=2)
    for ra, rb in zip(a, b, strict=True):
        keys = set.intersection(*(set(r) for r in ra[:-1] + rb[:-1])) - {"time/elapsed_s"}
        assert {"reward/mean", "loss/policy", "grad/norm", "lr"} <= keys and "reward/eval" not in keys
        assert [{k: r[k] for k in keys} for r in ra[:-1]] == [{k: r[k] for k in keys} for r in rb[:-1]]
