"""The ``tool_use`` environment (issue 15, C11): scripted policies, forced observations, and observation tokens
that carry no loss, no KL and no advantage in any method."""

import math

import pytest
import torch

from workbench.algorithms import dpo, grpo, ppo, reinforce, sft
from workbench.analysis.credit import ExactCredit
from workbench.analysis.exact import ExactEvaluator, exact_logprobs
from workbench.core.ops import gae
from workbench.core.types import PolicyOutput, Rollout
from workbench.models.policy import ModelConfig, build_policy
from workbench.toy_tasks.tool_use import ToolUse, ToolUseConfig

TINY = ModelConfig(n_layer=1, n_embd=16, n_head=2)


@pytest.fixture(scope="module")
def task():
    return ToolUse(ToolUseConfig())


def run_episodes(task, prompts, act):
    """Play ``act(prompts, prefix) -> (B,) action`` in the environment: forced observations, EOS padding."""
    B, T = len(prompts), task.completion_len
    y = torch.zeros(B, 0, dtype=torch.long)
    for _ in range(T):
        forced = task.observe(y)
        ended = (y == task.eos_action).any(-1)
        a = torch.where(forced >= 0, forced, act(prompts, y))
        y = torch.cat([y, torch.where(ended, task.eos_action, a)[:, None]], 1)
    return y


def caller(task):
    """Calls the tool for a lookup (with the prompt's key), copies the observation, ends; echoes otherwise."""

    def act(prompts, y):
        t, lookup = y.shape[1], task.needs_tool(prompts)
        key = task.first_key + prompts[:, 1] - 2
        echo = prompts[:, 1] - 2 - task.cfg.n_keys
        if t == 0:
            return torch.where(lookup, task.call_action, echo)
        if t == 1:
            return torch.where(lookup, key, task.eos_action)
        if t == 3:
            return y[:, 2]  # the observation, copied
        return torch.full((len(y),), task.eos_action)

    return act


def never_caller(task, guess: int):
    """Answers at once: the echoed value, or the value ``guess`` for a lookup, then ends."""

    def act(prompts, y):
        echo = prompts[:, 1] - 2 - task.cfg.n_keys
        if y.shape[1] == 0:
            return torch.where(task.needs_tool(prompts), guess, echo)
        return torch.full((len(y),), task.eos_action)

    return act


def test_scripted_caller_succeeds_and_never_caller_fails_where_the_tool_is_needed(task):
    ps = task.eval_prompts()
    need = task.needs_tool(ps)
    y = run_episodes(task, ps, caller(task))
    assert task.success(ps, y).tolist() == [1.0] * len(ps)
    torch.testing.assert_close(task.reward(ps, y), torch.where(need, 1.0 - task.cfg.call_cost, 1.0))
    assert torch.equal(y, task.demonstrations(ps))  # the scripted caller is the expert
    # every guess without the tool, even the right value, fails a lookup; an echo succeeds without it
    for guess in range(task.cfg.n_values):
        z = run_episodes(task, ps, never_caller(task, guess))
        assert task.success(ps, z)[need].sum() == 0 and task.success(ps, z)[~need].sum() == (~need).sum()
    stats = task.episode_stats(ps, y)
    assert stats["tool/calls_when_needed"] == 1.0 and stats["tool/calls_when_not_needed"] == 0.0
    assert stats["episode/turns_mean"] == pytest.approx(1 + need.float().mean().item())


def test_observation_is_the_table_value_and_the_best_episode_is_the_expert(task):
    # a call of key k is followed by table[k] whatever the key and the query; a wrong key's value does not pass
    ps = task.eval_prompts()
    for k in range(task.cfg.n_keys):
        y = torch.tensor([[task.call_action, task.first_key + k, 0, 0, 0]])
        assert task.observe(y[:, :1]).item() == -1 and task.observe(y[:, :0]).item() == -1
        assert task.observe(y[:, :2].roll(1, 1)).item() == -1  # key then call: no complete call
        assert task.observe(torch.tensor([[task.call_action, task.first_key + k]])).item() == task.table[k]
    comps = task.all_completions()
    P, N = len(ps), len(comps)
    r = task.reward(ps.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
    best = comps[r.argmax(1)]
    assert torch.equal(best, task.demonstrations(ps)) and (r.max(1).values >= r.topk(2, 1).values[:, 1] + 0.1).all()


def test_feasible_episodes_are_the_canonical_images_of_the_grid(task):
    full = task.full_grid()
    canon = task.canonical(full).unique(dim=0)
    assert torch.equal(canon, task.all_completions())
    assert torch.equal(task.canonical(task.all_completions()), task.all_completions())
    assert len(canon) == task.n_completions < task.n_actions**task.completion_len


def test_policy_sampling_writes_observations(task):
    torch.manual_seed(0)
    policy = build_policy(task, TINY, seed=0, value_head=False, device=torch.device("cpu"))
    ps = task.sample_prompts(512, torch.Generator().manual_seed(1))
    comps, logp = policy.sample(ps, torch.Generator().manual_seed(2))
    obs = task.observation_mask(comps).bool()
    assert obs.any(), "a random policy calls the tool sometimes"
    assert torch.equal(comps, task.canonical(comps)), "every sampled episode is feasible"
    assert (logp[obs] == 0).all()
    for t in range(2, comps.shape[1]):  # the environment's token at every observation
        f = task.observe(comps[:, :t])
        assert torch.equal(comps[f >= 0, t], f[f >= 0])


def test_exact_distribution_counts_observations_with_probability_one(task):
    policy = build_policy(task, TINY, seed=0, value_head=False, device=torch.device("cpu"))
    with torch.no_grad():
        logp = exact_logprobs(policy, task)  # (P, N) over the feasible episodes
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(len(logp)), atol=1e-5, rtol=0)
    # the same probability as a product over the policy's own tokens of a teacher-forced pass
    comps = task.all_completions()[:64]
    ps = task.eval_prompts()[:1].expand(64, -1)
    with torch.no_grad():
        out = policy(ps, comps)
    torch.testing.assert_close(logp[0, :64], (out.logp * task.action_mask(comps)).sum(-1))
    # the exact episode metrics are probability-weighted means; the expert's are known
    ev = ExactEvaluator(task, policy, beta=0.1)
    m = ev.measure(policy)
    assert 0 < m["tool/exact_calls_mean"] < 1 and ev.optimum()["tool/optimal_calls_when_needed"] > 0.5
    expert = torch.zeros_like(ev.rewards)
    expert[torch.arange(len(expert)), ev.rewards.argmax(1)] = 1.0
    s = ev.episode_metrics(expert, "exact_")
    assert s["tool/exact_success_rate"] == pytest.approx(1.0) and s["tool/exact_calls_when_not_needed"] == 0.0


def test_exact_advantage_is_zero_at_observations(task):
    policy = build_policy(task, TINY, seed=0, value_head=False, device=torch.device("cpu"))
    with torch.no_grad():
        ref_logp = exact_logprobs(policy, task)
    credit = ExactCredit(task, ref_logp, beta=0.1)
    adv = credit.advantages(policy, kl_reward=True)  # (P, A^T, T) on the full grid
    comps = task.all_completions()
    obs = task.observation_mask(comps).bool()
    ps = task.eval_prompts()
    for p in range(len(ps)):
        a = credit.at(adv, ps[p : p + 1].expand(len(comps), -1), comps)  # (N, T)
        assert a[obs].abs().max() < 1e-9
        assert a[~obs & (task.action_mask(comps) > 0)].abs().max() > 1e-3


def _rollout(task, seed=0, value_head=True):
    policy = build_policy(task, TINY, seed=seed, value_head=value_head, device=torch.device("cpu"))
    ps = task.sample_prompts(32, torch.Generator().manual_seed(seed)).repeat_interleave(2, 0)
    comps, _ = policy.sample(ps, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out = policy(ps, comps)
    r = task.reward(ps, comps)
    steps = torch.zeros(comps.shape)
    steps[torch.arange(len(comps)), task.lengths(comps) - 1] = r
    noise = torch.randn(comps.shape, generator=torch.Generator().manual_seed(seed + 2))
    roll = Rollout(
        prompts=ps,
        completions=comps,
        mask=task.action_mask(comps),
        old_logp=out.logp,
        ref_logp=out.logp + 0.3 * noise,  # a reference that differs from the policy everywhere
        scores=r,
        step_rewards=steps,
        gold=r,
        group_size=2,
        old_values=out.values + 0.1 * noise,
        eos_action=task.eos_action,
    )
    return roll, out


ONLINE = [
    (ppo, ppo.PPOConfig(kl_in="reward")),
    (ppo, ppo.PPOConfig(kl_in="loss", kl_estimator="k3")),
    (grpo, grpo.GRPOConfig()),
    (reinforce, reinforce.ReinforceConfig(kl_in="reward")),
    (reinforce, reinforce.ReinforceConfig(kl_in="loss", kl_estimator="k2", baseline="group_mean")),
]


@pytest.mark.parametrize("mod,cfg", ONLINE, ids=lambda x: getattr(x, "__name__", "").split(".")[-1] or None)
def test_observation_tokens_get_no_loss_no_kl_no_advantage(task, mod, cfg):
    roll, out = _rollout(task)
    obs = task.observation_mask(roll.completions).bool()
    assert obs.any() and (roll.mask[obs] == 0).all()
    beta = 0.1
    batch = mod.prepare(roll, cfg, beta)
    assert (batch.advantages[obs] == 0).all(), "zero advantage at observations"
    if batch.kl is not None:
        assert (batch.kl[obs] == 0).all(), "zero KL at observations"
    # the old, reference and value numbers at observation positions change nothing of the batch
    wild = torch.where(obs, torch.full_like(roll.old_logp, -7.0), roll.old_logp)
    roll2 = Rollout(**{**roll.__dict__, "old_logp": wild, "ref_logp": torch.where(obs, 3.0, roll.ref_logp)})
    if roll.old_values is not None:
        roll2.old_values = torch.where(obs, 50.0, roll.old_values)
    batch2 = mod.prepare(roll2, cfg, beta)
    torch.testing.assert_close(batch2.advantages, batch.advantages)

    def loss_and_grads(logp_values, values):
        logp = logp_values.clone().requires_grad_(True)
        v = values.clone().requires_grad_(True)
        o = PolicyOutput(logp=logp, logits=None, values=v)
        loss, per_token, _ = mod.SPEC.loss(o, batch, cfg, beta)
        loss.backward()
        return loss.detach(), logp.grad, v.grad, per_token.detach()

    values = roll.old_values + 0.05
    l1, g1, gv1, pt1 = loss_and_grads(roll.old_logp + 0.02, values)
    changed = torch.where(obs, roll.old_logp - 5.0, roll.old_logp + 0.02)  # observation logits changed
    l2, g2, gv2, pt2 = loss_and_grads(changed, torch.where(obs, values + 9.0, values))
    torch.testing.assert_close(l2, l1)
    assert (g1[obs] == 0).all() and (g2[obs] == 0).all(), "no gradient from an observation's log-prob"
    assert g1[~obs & (roll.mask > 0)].abs().sum() > 0
    assert (pt1[obs] == 0).all()
    if gv1 is not None and gv1.abs().sum() > 0:
        assert (gv1[obs] == 0).all() and (gv2[obs] == 0).all(), "no value loss at observations"


def test_observation_logits_give_no_gradient_in_sft_and_dpo(task):
    policy = build_policy(task, TINY, seed=0, value_head=False, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    data = sft.dataset(task, sft.SFTConfig(n_demos=32), g)
    obs = task.observation_mask(data["completions"]).bool()
    assert obs.any() and (data["mask"][obs] == 0).all()
    logp = policy(data["prompts"], data["completions"]).logp.detach().requires_grad_(True)
    loss, _, _ = sft.SPEC.loss({"logp": logp}, data, sft.SFTConfig(), 0.0)
    loss.backward()
    assert (logp.grad[obs] == 0).all() and logp.grad[~obs].abs().sum() > 0
    # DPO on trajectory pairs sampled from the reference, labelled by reward
    cfg = dpo.DPOConfig(pairs="reference", n_pairs=64, bt_temperature=0.0)
    pairs = dpo.masked_preference_dataset(task, cfg, g, ref=policy)
    ob_c, ob_r = task.observation_mask(pairs["chosen"]).bool(), task.observation_mask(pairs["rejected"]).bool()
    assert (ob_c | ob_r).any() and (pairs["mask_chosen"][ob_c] == 0).all()
    with torch.no_grad():
        outs = dpo.forward(policy, policy, pairs)
    base = outs["logp"] + 0.01 * torch.arange(outs["logp"].shape[-1])  # away from the reference
    obs2 = torch.cat([ob_c, ob_r])

    def run(lp):
        lp = lp.clone().requires_grad_(True)
        loss, _, _ = dpo.SPEC.loss({"logp": lp, "ref_logp": outs["ref_logp"]}, pairs, cfg, 0.1)
        loss.backward()
        return loss.detach(), lp.grad

    l1, g1 = run(base)
    l2, g2 = run(torch.where(obs2, base - 4.0, base))
    torch.testing.assert_close(l2, l1)
    assert (g1[obs2] == 0).all() and g1.abs().sum() > 0


def test_gae_steps_over_observations():
    # one episode of agent tokens at 0, 1, 3, 4 (an observation at 2): GAE over the holes equals GAE on the
    # compacted agent steps, and on a mask without holes the skipping form equals the plain one
    r = torch.tensor([[0.0, 0.1, 5.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, -0.3, 9.0, 0.4, 0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    keep = [0, 1, 3, 4]
    a2, r2 = gae(r[:, keep], v[:, keep], torch.ones(1, 4), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[:, keep], a2)
    torch.testing.assert_close(ret[:, keep], r2)
    assert adv[0, 2] == 0 and ret[0, 2] == 0
    # by hand at t = 1: delta_1 = 0.1 + 0.9 * 0.4 - (-0.3), A_1 = delta_1 + 0.72 * A_3
    d4 = 1.0 - 0.5
    d3 = 0.0 + 0.9 * 0.5 - 0.4
    a3 = d3 + 0.72 * d4
    assert adv[0, 1].item() == pytest.approx(0.1 + 0.36 + 0.3 + 0.72 * a3)
    from workbench.core.ops import gae_skipping

    x = torch.randn(4, 6)
    mm = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    for got, want in zip(gae_skipping(x, x.flip(1), mm, 0.95, 0.9), gae(x, x.flip(1), mm, 0.95, 0.9), strict=True):
        torch.testing.assert_close(got, want)


def test_pretraining_text_is_format_without_solutions(task):
    ps, text = task.pretraining_text(4000, torch.Generator().manual_seed(0))
    assert torch.equal(text, task.canonical(text)), "observations are the environment's"
    obs = task.observation_mask(text).bool()
    calls = obs.any(-1)
    assert abs(calls.float().mean().item() - 0.5) < 0.05
    key = text[calls, 1] - task.first_key
    same = key == (ps[calls, 1] - 2)  # the looked-up key is the prompt's by chance only (echo prompts have none)
    lookup = task.needs_tool(ps[calls])
    assert abs(same[lookup].float().mean().item() - 1 / task.cfg.n_keys) < 0.05
    # a lookup's success is chance: grounded and right only when key and answer both hit
    s = task.success(ps, text)[task.needs_tool(ps)].mean().item()
    assert abs(s - 0.5 / task.cfg.n_keys / task.cfg.n_values) < 0.03
    assert not math.isnan(s)


def test_render_sets_observations_apart(task):
    ps = task.eval_prompts()
    assert (
        task.render(ps[0], task.demonstrations(ps[:1])[0])
        == f"lookup k0 -> call k0 [v{task.table[0]}] v{task.table[0]} <end>"
    )


def test_the_trl_backend_refuses_observation_tokens():
    from workbench.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="observation tokens"):
        resolve({"task": {"name": "tool_use"}, "algo": {"name": "grpo"}}, {"backend": "trl", "group_size": 2})


def test_a_truncated_episode_ending_on_an_observation_pays_its_reward_at_the_last_own_token(task):
    """``v0 v0 call k0 [obs]``: truncated (no EOS), a call and no answer: reward -c, paid at position 3 (the key),
    not at the observation (masked), where GAE and returns-to-go would drop it."""
    from workbench.analysis.credit import step_rewards_all

    k = task.first_key
    y = task.canonical(torch.tensor([[0, 0, task.call_action, k, 0]]))  # the observation written in at t = 4
    ps = task.eval_prompts()[:1]
    assert task.action_mask(y).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    assert task.last_action(y).tolist() == [3]
    r = task.reward(ps, y).item()
    assert r == pytest.approx(-task.cfg.call_cost)
    steps = step_rewards_all(task, ps, y, dense=False)[0, 0]  # (T,)
    assert steps.tolist() == pytest.approx([0.0, 0.0, 0.0, r, 0.0])
    adv, _ = gae(steps[None], torch.zeros(1, 5), task.action_mask(y), gamma=1.0, lam=1.0)
    assert adv[0, :4].tolist() == pytest.approx([r] * 4)  # every own token sees the -c (it was 0 before)
    # a task without observations pays where it always did: the last counted token
    from workbench.toy_tasks import Sequence

    seq = Sequence(Sequence.Config(vocab_size=3, length=3, n_prompts=2, eos=True))
    z = torch.tensor([[0, 1, 3], [3, 3, 3], [0, 1, 2]])
    assert torch.equal(seq.last_action(z), seq.lengths(z) - 1)
