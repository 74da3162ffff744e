"""The native GPT-2 (``model.impl = "native"``) against transformers' ``GPT2LMHeadModel``.

Same weights -> same logits, hidden states and gradients; the KV cache gives the logits of
the full pass; checkpoints convert both ways; the policy built on it has the same initial
weights as the Hugging Face one of the same seed; the KV-cached prefix tree enumerates the
same log-probabilities as the teacher-forced enumeration.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.analysis.exact import exact_logprobs
from workbench.config import resolve
from workbench.models.native_gpt2 import NativeGPT2
from workbench.models.policy import ModelConfig, build_model, build_policy
from workbench.toy_tasks.sequence import Sequence, SequenceConfig
from workbench.training import train

CPU = torch.device("cpu")
TOL = dict(rtol=0, atol=2e-6)


def hf_gpt2(seed=0, **kw) -> GPT2LMHeadModel:
    cfg = dict(
        vocab_size=11, n_positions=24, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**cfg, **kw})).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, so every parameter matters
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [{}, {"n_inner": 24, "n_layer": 3, "n_head": 4}])
def test_identical_logits_hidden_states_and_gradients(kw):
    hf = hf_gpt2(**kw)
    nat = NativeGPT2.from_hf(hf)
    assert list(nat.state_dict()) == list(hf.state_dict())  # same names, same order
    assert all(nat.state_dict()[k].shape == v.shape for k, v in hf.state_dict().items())
    assert nat.lm_head.weight is nat.transformer.wte.weight  # tied, as in GPT2LMHeadModel
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    a = hf(input_ids=ids, output_hidden_states=True)
    b = nat(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    assert len(b.hidden_states) == len(a.hidden_states)
    for x, y in zip(b.hidden_states, a.hidden_states, strict=True):
        torch.testing.assert_close(x, y, **TOL)
    target = torch.randn_like(a.logits)
    ga = torch.autograd.grad((a.logits * target).sum(), list(hf.parameters()))
    gb = torch.autograd.grad((b.logits * target).sum(), list(nat.parameters()))
    for name, x, y in zip(dict(nat.named_parameters()), gb, ga, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_gelu_new_equals_transformers_activation_on_large_tensors():
    """``gelu_new`` computes x sigmoid(2u) above 2^18 elements: the same values and gradients as GPT-2's tanh form."""
    from workbench.models.native_gpt2 import gelu_new

    x = torch.randn(600, 600, requires_grad=True)
    g = torch.randn(600, 600)
    ours, ref = gelu_new(x), torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], **TOL)


def test_kv_cache_gives_the_full_pass_logits():
    nat = NativeGPT2.from_hf(hf_gpt2())
    ids = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
    full = nat(input_ids=ids).logits
    out = nat(input_ids=ids[:, :3], use_cache=True)  # prefill
    parts = [out.logits]
    out = nat(input_ids=ids[:, 3:5], cache=out.cache, use_cache=True)  # two tokens on top of a cache
    parts.append(out.logits)
    for t in range(5, 8):  # decode, one token at a time
        out = nat(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True)
        parts.append(out.logits)
    assert out.cache.length == 8
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    # logits_to_keep and head_ids select positions and tokens of the same logits
    some = torch.tensor([4, 1, 7])
    torch.testing.assert_close(nat(input_ids=ids, logits_to_keep=3, head_ids=some).logits, full[:, -3:, some], **TOL)


def test_checkpoints_convert_both_ways(tmp_path):
    hf = hf_gpt2(seed=3)
    ids = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = hf(input_ids=ids).logits
    hf.save_pretrained(tmp_path / "hf")  # Hugging Face writes, native reads
    nat = NativeGPT2.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(nat(input_ids=ids).logits, ref, **TOL)
    assert nat.lm_head.weight is nat.transformer.wte.weight
    nat.save_pretrained(tmp_path / "native")  # native writes, Hugging Face (and so TRL) reads
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "native", local_files_only=True).eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ref, **TOL)
    torch.testing.assert_close(nat.to_hf()(input_ids=ids).logits, ref, **TOL)


@pytest.fixture
def task():
    return Sequence(SequenceConfig(vocab_size=3, length=4, n_prompts=2))


def test_policy_same_weights_as_hf_sampling_and_round_trip(task, tiny_model_cfg, tmp_path):
    native_cfg = tiny_model_cfg.model_copy(update={"impl": "native"})
    nat = build_policy(task, native_cfg, 5, value_head=True, device=CPU)
    hf = build_policy(task, tiny_model_cfg, 5, value_head=True, device=CPU)
    assert isinstance(nat.model, NativeGPT2) and isinstance(hf.model, GPT2LMHeadModel)
    sn, sh = nat.model.state_dict(), hf.model.state_dict()
    assert sn.keys() == sh.keys() and all(torch.equal(sn[k], sh[k]) for k in sh)  # same seed, same weights
    g = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(16, g)
    comps, logp = nat.sample(prompts, g)
    out = nat(prompts, comps)
    torch.testing.assert_close(out.logp, logp, atol=1e-5, rtol=0)  # KV-cached sampler == teacher-forced pass
    torch.testing.assert_close(out.logp, hf(prompts, comps).logp, **TOL)
    torch.testing.assert_close(out.values, hf(prompts, comps).values, **TOL)
    nat.save(tmp_path / "ckpt")
    for impl in ("hf", "native"):  # a native checkpoint is a Hugging Face checkpoint
        loaded = build_policy(task, ModelConfig(path=str(tmp_path / "ckpt"), impl=impl), 0, value_head=True, device=CPU)
        torch.testing.assert_close(loaded(prompts, comps).logp, out.logp, **TOL)
        torch.testing.assert_close(loaded(prompts, comps).values, out.values, **TOL)


def test_prefix_tree_enumeration_equals_teacher_forced(task, tiny_model_cfg):
    nat = build_policy(task, tiny_model_cfg.model_copy(update={"impl": "native"}), 0, value_head=False, device=CPU)
    hf = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    assert nat.has_prefix_tree and not hf.has_prefix_tree
    tree = exact_logprobs(nat, task, chunk=5)  # small chunks: the split must keep the order
    torch.testing.assert_close(tree, exact_logprobs(hf, task), **TOL)
    torch.testing.assert_close(tree.exp().sum(-1), torch.ones(2), **TOL)
    with torch.enable_grad():  # differentiable, for the exact-gradient probes
        (g,) = torch.autograd.grad(exact_logprobs(nat, task)[0, 0], [nat.model.transformer.wte.weight])
    assert g.abs().sum() > 0


def test_native_llama_is_an_error(task, tiny_model_cfg):
    with pytest.raises(ValueError, match="native"):
        build_model(task, tiny_model_cfg.model_copy(update={"impl": "native", "arch": "llama"}), 0)


def test_training_with_the_native_model_matches_hf(tmp_path):
    """A few GRPO updates: the same metrics from both implementations (same weights, same samples)."""
    sets = {
        "model.n_layer": 1,
        "model.n_embd": 16,
        "model.n_head": 2,
        "steps": 3,
        "eval_every": 3,
        "batch_size": 8,
        "group_size": 4,
        "save_checkpoint": False,
    }
    finals = {}
    for impl in ("hf", "native"):
        res = resolve(
            {"task": {"name": "sequence", "vocab_size": 3, "length": 3}, "algo": {"name": "grpo"}},
            {**sets, "model.impl": impl},
        )
        finals[impl] = train(res, tmp_path / impl, progress=False)["final"]
    for key in ("reward/exact", "kl/exact", "entropy/exact"):
        assert finals["native"][key] == pytest.approx(finals["hf"][key], abs=1e-5)
