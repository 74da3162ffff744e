"""Seeds as a batch dimension (``workbench.training.stacked.train_seeds``) against one ``train`` per seed."""

import json

import pytest

from workbench import training
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


def assert_same_runs(reses, batched_dir, alone_dir, results):
    """Every run of a stack wrote the files and the metrics (up to float rounding) of one ``train``."""
    assert [r["status"] for r in results] == ["done"] * len(reses)
    for i, res in enumerate(reses):
        assert train(res, alone_dir / str(i), progress=False)["status"] == "done"
        batched, alone = rows(batched_dir / str(i)), rows(alone_dir / str(i))
        assert [r["step"] for r in batched] == [r["step"] for r in alone]
        for a, b in zip(batched, alone, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                # at step 0 pi = pi_ref, so DPO's log-ratio difference h is 0 up to rounding and the share of h > 0
                # is the sign of rounding noise
                noise = k == "rewards/accuracies" and a["step"] == 0
                if k != "time/elapsed_s" and not noise:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (i, a["step"], k)
        for f in ("config.json", "status.json", "samples.jsonl", "checkpoint/model.safetensors"):
            assert (batched_dir / str(i) / f).exists()
        cfg = json.loads((batched_dir / str(i) / "config.json").read_text())
        assert cfg["config_hash"] == res.config_hash and cfg["stacked"]["runs"] == [r.config_hash for r in reses]
        assert cfg["batched_seeds"] == [r.run.seed for r in reses]


def stack(algo, sets_per_run, extra=None, task=TASK):
    return [resolve({"task": task, "algo": {"name": algo, **(extra or {})}}, {**SETS, **sets}) for sets in sets_per_run]


# every algorithm that stacks; PPO with its value head, 2 epochs x 2 minibatches, each run its own minibatch order
ALGOS = {
    "grpo": {},
    "rloo": {},
    "reinforce": {},
    "online_dpo": {"group_size": 2},
    "ppo": {"group_size": 1, "algo.epochs": 2, "algo.minibatches": 2},
    "sft": {},
    "dpo": {},
    "rft": {"algo.epochs": 2, "algo.minibatches": 2},  # weighted NLL on minibatches of the kept samples
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_batched_seeds_equal_separate_runs(algo, tmp_path):
    reses = stack(algo, [{**ALGOS[algo], "seed": s} for s in (0, 1, 5)])
    results = train_seeds(reses, [tmp_path / "batched" / str(i) for i in range(3)])
    assert_same_runs(reses, tmp_path / "batched", tmp_path / "alone", results)
    # the seeds really differ
    finals = [rows(tmp_path / "batched" / str(i))[-1] for i in range(3)]
    assert finals[0]["reward/exact"] != finals[1]["reward/exact"]
    if algo == "ppo":  # the critic trained, per run
        assert all("loss/value" in r for r in rows(tmp_path / "batched" / "0")[:-1])


def test_runs_that_differ_in_scalars_stack(tmp_path):
    """Grid points that change only scalars (lr, beta, max_grad_norm, weight decay, an online algorithm's float
    parameters) stack with seeds; each run applies its own (per-run AdamW learning rates: StackedAdamW)."""
    per_run = [
        {"seed": 0, "lr": 1e-2, "beta": 0.04, "algo.clip_eps": 0.2},
        {"seed": 0, "lr": 3e-3, "beta": 0.04, "algo.clip_eps": 0.2},
        {"seed": 1, "lr": 1e-2, "beta": 0.5, "max_grad_norm": 0.05, "algo.clip_eps": 0.05},
        {"seed": 2, "lr": 1e-2, "beta": 0.04, "weight_decay": 0.1, "algo.vf_coef": 1.0},
    ]
    reses = stack("ppo", [{**ALGOS["ppo"], **r} for r in per_run])
    assert len({training.stack_key(r) for r in reses}) == 1
    results = train_seeds(reses, [tmp_path / "batched" / str(i) for i in range(4)])
    assert_same_runs(reses, tmp_path / "batched", tmp_path / "alone", results)
    lrs = [rows(tmp_path / "batched" / str(i))[1]["lr"] for i in range(4)]
    assert lrs[0] == pytest.approx(1e-2 * (1 - 1 / 4)) and lrs[1] == pytest.approx(3e-3 * (1 - 1 / 4))
    # the same seed under two learning rates: the runs differ
    assert rows(tmp_path / "batched" / "0")[-1]["reward/exact"] != rows(tmp_path / "batched" / "1")[-1]["reward/exact"]


def test_a_hugging_face_gpt2_run_stacks_as_the_native_network(tmp_path):
    reses = stack("grpo", [{"model.impl": "hf", "seed": s} for s in (0, 3)])
    results = train_seeds(reses, [tmp_path / "batched" / str(i) for i in range(2)])
    assert_same_runs(reses, tmp_path / "batched", tmp_path / "alone", results)
    cfg = json.loads((tmp_path / "batched" / "0" / "config.json").read_text())
    assert cfg["config"]["model"]["impl"] == "hf" and "native" in cfg["stacked"]["model"]


def test_what_cannot_be_batched_is_a_config_error(tmp_path):
    grpo = stack("grpo", [{"seed": s} for s in (0, 1)])
    with pytest.raises(ConfigError, match="differ only in seed, lr, beta"):
        train_seeds([grpo[0], *stack("grpo", [{"steps": 5, "seed": 1}])], ["a", "b"])
    with pytest.raises(ConfigError, match="differ only in"):  # an offline algorithm's float parameter shapes its data
        train_seeds(stack("dpo", [{"algo.coverage": 1.0}, {"algo.coverage": 0.5, "seed": 1}]), ["a", "b"])
    with pytest.raises(ConfigError, match="the same run twice"):
        train_seeds([grpo[0], grpo[0]], ["a", "b"])
    with pytest.raises(ConfigError, match="arch 'gpt2'"):
        train_seeds(stack("grpo", [{"model.arch": "llama", "seed": s} for s in (0, 1)]), ["a", "b"])
    with pytest.raises(ConfigError, match="a policy algorithm"):
        train_seeds(stack("rm", [{"seed": s} for s in (0, 1)]), ["a", "b"])
    with pytest.raises(ConfigError, match="RLHF phases"):
        train_seeds(stack("ppo", [{"reward_model": "fit", "seed": s} for s in (0, 1)]), ["a", "b"])
    assert training.stack_key(grpo[0]) == training.stack_key(grpo[1])
    assert training.stack_key(stack("rm", [{}])[0]) is None


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
