"""The policy interface over real transformers models: sampling, log-probs, values, checkpoints."""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from workbench.analysis.exact import exact_logprobs
from workbench.models.policy import ModelConfig, Policy, build_model, build_policy, build_reward_model, resolve_device
from workbench.toy_tasks.bandit import Bandit, BanditConfig
from workbench.toy_tasks.sequence import Sequence, SequenceConfig

CPU = torch.device("cpu")


@pytest.fixture
def task():
    return Sequence(SequenceConfig(vocab_size=3, length=3, n_prompts=2))


@pytest.mark.parametrize("arch,cls", [("gpt2", GPT2LMHeadModel), ("llama", LlamaForCausalLM)])
def test_real_hf_model_and_tokenizer(task, arch, cls, tiny_model_cfg):
    model, tok = build_model(task, tiny_model_cfg.model_copy(update={"arch": arch}), seed=0)
    assert isinstance(model, cls) and isinstance(tok, PreTrainedTokenizerFast)
    assert model.config.vocab_size == len(tok) == 4 + len(task.vocab)
    ids = tok("<bos> p1 s0 s2")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "p1", "s0", "s2"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampled_logp_equals_teacher_forced(task, arch, tiny_model_cfg):
    pol = build_policy(task, tiny_model_cfg.model_copy(update={"arch": arch}), 0, value_head=True, device=CPU)
    g = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(16, g)
    comps, logp = pol.sample(prompts, g)
    assert comps.shape == (16, 3) and comps.max() < task.n_actions
    out = pol(prompts, comps)
    torch.testing.assert_close(out.logp, logp, atol=1e-5, rtol=0)  # KV-cached sampler == full forward
    assert out.values.shape == (16, 3)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(16, 3))  # restricted to the action set


def test_sampling_is_seeded_and_follows_the_policy(tiny_model_cfg):
    task = Bandit(BanditConfig(n_arms=4))
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    prompts = torch.zeros(20000, 1, dtype=torch.long)
    a1, _ = pol.sample(prompts, torch.Generator().manual_seed(5))
    a2, _ = pol.sample(prompts, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    freq = torch.bincount(a1[:, 0], minlength=4).float() / len(a1)
    probs = exact_logprobs(pol, task)[0].exp()
    assert (freq - probs).abs().max() < 0.015  # 20k draws: 3 sigma is about 0.01


def test_same_seed_same_initial_weights(task, tiny_model_cfg):
    a = build_policy(task, tiny_model_cfg, 7, value_head=False, device=CPU)
    b = build_policy(task, tiny_model_cfg, 7, value_head=True, device=CPU)
    c = build_policy(task, tiny_model_cfg, 8, value_head=False, device=CPU)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_reference_copy_is_frozen(task, tiny_model_cfg):
    pol = build_policy(task, tiny_model_cfg, 0, value_head=True, device=CPU)
    ref = pol.frozen_copy()
    assert ref.value_head is None and not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(pol.model.parameters()).add_(1.0)
    assert not torch.equal(next(pol.model.parameters()), next(ref.model.parameters()))


def test_checkpoint_directory_replaces_the_tiny_model(task, tiny_model_cfg, tmp_path):
    pol = build_policy(task, tiny_model_cfg, 3, value_head=True, device=CPU)
    with torch.no_grad():
        pol.value_head.bias.fill_(0.5)
    pol.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    loaded = build_policy(task, ModelConfig(path=str(tmp_path / "ckpt")), 99, value_head=True, device=CPU)
    g = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(8, g)
    comps = task.random_completions(8, g)
    a, b = pol(prompts, comps), loaded(prompts, comps)
    torch.testing.assert_close(a.logp, b.logp)
    torch.testing.assert_close(a.values, b.values)


def test_unknown_word_in_checkpoint_tokenizer_is_an_error(task, tiny_model_cfg, tmp_path):
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    pol.save(tmp_path / "ckpt")
    other = Sequence(SequenceConfig(vocab_size=5, length=3))  # has s3, s4: not in that tokenizer
    with pytest.raises(ValueError, match="not a single token"):
        build_policy(other, ModelConfig(path=str(tmp_path / "ckpt")), 0, value_head=False, device=CPU)


def test_reward_model_scores_and_round_trips(task, tiny_model_cfg, tmp_path):
    rm = build_reward_model(task, tiny_model_cfg, 0)
    g = torch.Generator().manual_seed(0)
    prompts, comps = task.sample_prompts(5, g), task.random_completions(5, g)
    s = rm(prompts, comps)
    assert s.shape == (5,)
    rm.save(tmp_path / "rm")
    rm2 = build_reward_model(task, tiny_model_cfg, 0, path=str(tmp_path / "rm"))
    torch.testing.assert_close(rm2(prompts, comps), s)


def test_device_auto():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_path(task, tiny_model_cfg):
    pol = build_policy(task, tiny_model_cfg, 0, value_head=True, device=torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = task.sample_prompts(8, torch.Generator().manual_seed(0)).cuda()
    comps, logp = pol.sample(prompts, g)
    torch.testing.assert_close(pol(prompts, comps).logp, logp, atol=1e-4, rtol=0)
    assert isinstance(pol, Policy)


def test_reference_prior_puts_mass_far_from_the_peak(tiny_model_cfg):
    task = Bandit(BanditConfig(n_arms=6, reward_shape="far_peak", prior="low_arms", prior_scale=1.0))
    pol = build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU)
    probs = exact_logprobs(pol, task)[0].exp()
    target = torch.softmax(-torch.arange(6.0), 0)  # 0.63, 0.23, 0.086, ...
    assert (probs - target).abs().max() < 0.01
    assert probs[-1] < 0.01  # the paying arm starts nearly unseen
    again = build_policy(task, tiny_model_cfg, 0, value_head=True, device=CPU)
    torch.testing.assert_close(exact_logprobs(again, task), exact_logprobs(pol, task))  # deterministic


def test_a_prior_fit_is_done_once_per_process_and_a_kept_one_is_the_same_bit_for_bit(tiny_model_cfg, monkeypatch):
    """fit_prior draws no random numbers, so its result is kept by a digest of its inputs: a second policy of the
    same seed gets the weights a fit computes (bitwise) without fitting; another seed fits its own."""
    import workbench.models.policy as policy_mod

    task = Bandit(BanditConfig(n_arms=6, reward_shape="far_peak", prior="low_arms", prior_scale=1.0))
    monkeypatch.setattr(policy_mod, "_PRIOR_FITS", type(policy_mod._PRIOR_FITS)())
    calls = []
    forward = Policy.forward
    monkeypatch.setattr(Policy, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def weights(p):
        return {n: t.detach().clone() for n, t in p.named_parameters() if not n.startswith("value_head")}

    rng = torch.get_rng_state()
    fitted = weights(build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU))
    assert len(calls) == 300 and torch.equal(rng, torch.get_rng_state())  # 300 Adam steps, no random draw
    kept = build_policy(task, tiny_model_cfg, 0, value_head=True, device=CPU)
    assert len(calls) == 300 and all(p.grad is None for p in kept.parameters())  # not fitted again
    assert all(torch.equal(fitted[n], t) for n, t in weights(kept).items())
    other = weights(build_policy(task, tiny_model_cfg, 1, value_head=False, device=CPU))
    assert len(calls) == 600 and len(policy_mod._PRIOR_FITS) == 2
    assert not torch.equal(other["model.transformer.wte.weight"], fitted["model.transformer.wte.weight"])
    policy_mod._PRIOR_FITS.clear()  # a fresh fit of seed 0 equals what was kept
    again = weights(build_policy(task, tiny_model_cfg, 0, value_head=False, device=CPU))
    assert len(calls) == 900 and all(torch.equal(fitted[n], t) for n, t in again.items())
