"""``precision = "bf16"``: the policy's passes under autocast, float32 log-probs, exact metrics never autocast.

The run setting (``RunConfig.precision``, ``workbench.models.precision``) on CPU autocast, which
is what a CUDA run does with bfloat16 too: a bf16 run trains and is measured with finite
metrics, its forward differs from fp32 in the last bits only, its exact evaluation is bitwise
that of the fp32 policy with the same weights, and the setting leaves the run ids of
existing (fp32) runs unchanged.
"""

import json

import pytest
import torch

from workbench.analysis.exact import ExactEvaluator, exact_logprobs
from workbench.config import ConfigError, resolve
from workbench.models.policy import build_policy
from workbench.models.precision import full_precision
from workbench.studies import expand, load_study
from workbench.training import train

CPU = torch.device("cpu")
TASK = {"name": "sequence", "vocab_size": 3, "length": 3, "n_prompts": 2}
SETS = {
    "model.n_layer": 1,
    "model.n_embd": 16,
    "model.n_head": 2,
    "steps": 4,
    "eval_every": 2,
    "probe_every": 2,
    "probe_minibatches": 2,
    "batch_size": 8,
    "group_size": 4,
    "lr": 1e-2,
    "save_checkpoint": False,
}


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def policies(impl: str, value_head: bool = False):
    """The same weights (seed 0) as an fp32 and a bf16 policy."""
    res = resolve({"task": TASK, "algo": {"name": "grpo"}}, {**SETS, "model.impl": impl})
    fp32 = build_policy(res.task, res.run.model, 0, value_head, CPU)
    bf16 = build_policy(res.task, res.run.model, 0, value_head, CPU, precision="bf16")
    for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True):
        assert torch.equal(a, b)
    return res, fp32, bf16


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_bf16_run_trains_with_finite_metrics_and_float32_measurements(algo, tmp_path):
    raw = {"task": TASK, "algo": {"name": algo}}
    r32 = train(resolve(raw, {**SETS, "precision": "fp32"}), tmp_path / "fp32", progress=False)
    r16 = train(resolve(raw, {**SETS, "precision": "bf16"}), tmp_path / "bf16", progress=False)
    assert r32["status"] == r16["status"] == "done"
    a, b = rows(tmp_path / "fp32"), rows(tmp_path / "bf16")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for row in b:
        for k, v in row.items():
            assert v is None or isinstance(v, str) or torch.isfinite(torch.tensor(float(v))), (row["step"], k, v)
    assert "grad/snr" in b[0] and "reward/exact" in b[-1]
    # step 0 measures the same initial weights: exact metrics and probes in float32, bitwise the fp32 run's
    for k in ("reward/exact", "kl/exact_to_optimal", "reward/eval", "grad/snr", "grad/cos_true"):
        assert a[0][k] == b[0][k], k
    # training itself ran in bf16: its first update already differs from fp32's, by a little
    assert a[1]["loss/policy"] != b[1]["loss/policy"] and a[-1]["reward/exact"] != b[-1]["reward/exact"]
    assert b[-1]["reward/exact"] == pytest.approx(a[-1]["reward/exact"], abs=0.2)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["config"]["precision"] == "bf16"


@pytest.mark.parametrize("impl", ["hf", "native"])
def test_bf16_forward_and_sampling_return_float32_log_probs_near_fp32(impl):
    res, fp32, bf16 = policies(impl, value_head=True)
    prompts = res.task.eval_prompts()
    comps, logp = bf16.sample(prompts, torch.Generator().manual_seed(0))
    assert logp.dtype == torch.float32 and comps.dtype == torch.long
    o32, o16 = fp32(prompts, comps), bf16(prompts, comps)
    assert o16.logp.dtype == o16.logits.dtype == o16.values.dtype == torch.float32
    diff = (o32.logp - o16.logp).abs().max().item()
    assert 0 < diff < 0.02, diff  # bf16 rounding: 8 bits of mantissa in the matmuls
    torch.testing.assert_close(logp, o16.logp, rtol=0, atol=0.02)  # sampler and teacher forcing agree
    o16.logp.sum().backward()  # gradients and parameters stay float32
    assert all(
        p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in bf16.parameters()
    )


@pytest.mark.parametrize("impl", ["hf", "native"])
def test_exact_evaluation_of_a_bf16_policy_is_bitwise_the_fp32_one(impl):
    res, fp32, bf16 = policies(impl)
    task = res.task
    ev = ExactEvaluator(task, fp32.frozen_copy(), res.run.beta)
    assert ev.measure(bf16) == ev.measure(fp32)
    assert torch.equal(exact_logprobs(bf16, task), exact_logprobs(fp32, task))
    ev16 = ExactEvaluator(task, bf16.frozen_copy(), res.run.beta)  # a bf16 reference: pi_ref and pi* in float32 too
    assert torch.equal(ev16.ref_logp, ev.ref_logp) and torch.equal(ev16.opt_logp, ev.opt_logp)
    # what full_precision prevents: the same enumeration under the policy's own autocast is not bitwise equal
    prompts, comps = task.eval_prompts(), task.all_completions()[:5]
    p = prompts[:1].expand(len(comps), -1)
    with torch.no_grad():
        assert not torch.equal(bf16(p, comps).logp, fp32(p, comps).logp)
        with full_precision(CPU):
            assert torch.equal(bf16(p, comps).logp, fp32(p, comps).logp)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # an enclosing autocast is switched off as well
                assert torch.equal(bf16(p, comps).logp, fp32(p, comps).logp)


def test_the_default_precision_leaves_config_hashes_and_run_ids_unchanged():
    raw = {"task": {"name": "bandit"}, "algo": {"name": "grpo"}}
    assert resolve(raw).config_hash == "5953c9d4ad0b668d"  # computed before the setting existed
    assert resolve(raw, {"precision": "fp32"}).config_hash == "5953c9d4ad0b668d"
    raw = {"task": {"name": "sequence"}, "algo": {"name": "rloo"}}
    assert resolve(raw, {"model.impl": "native", "steps": 3}).config_hash == "82d093d4458bc040"
    assert resolve(raw, {"model.impl": "native", "steps": 3, "precision": "bf16"}).config_hash != "82d093d4458bc040"


def test_precision_is_a_study_setting_and_a_checked_value(tmp_path):
    path = tmp_path / "bf16.toml"
    path.write_text(
        'name = "bf16"\nclaims = ["C6"]\nseeds = [0]\n[[tasks]]\nname = "bandit"\nn_arms = 4\n'
        '[budget]\nsteps = 2\nbatch_size = 8\n[settings]\nprecision = "bf16"\n'
        '[[algorithms]]\nname = "grpo"\nsettings = { group_size = 4 }\n'
    )
    assert [r.res.run.precision for r in expand(load_study(path))] == ["bf16"]
    with pytest.raises(ConfigError, match="precision"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "grpo"}}, {"precision": "fp16"})
    with pytest.raises(ConfigError, match="workbench backend"):
        resolve({"task": {"name": "sequence"}, "algo": {"name": "grpo"}}, {"precision": "bf16", "backend": "trl"})
