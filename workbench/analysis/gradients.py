"""Gradients against exact truth: the true gradient of each objective and the noise of its estimators.

Claims C1, C3 and C6. Every gradient here is the gradient of a *loss* (a descent
direction is its negative), over the language model's parameters theta (the value head
is not part of pi and is left out).

The KL-regularised RL objective, exactly, on an enumerable task (prompts x uniform over
``task.eval_prompts()``, y over all A ** T completions):

    J(theta)      = E_x sum_y pi(y|x) r(x,y) - beta E_x KL(pi(.|x) || pi_ref(.|x))
    g_RL          = grad_theta (-J)     autograd through the (P, A^T) enumerated log-probs

Where the task is not enumerable the RL truth is a large-batch estimate (RLOO, k1 in the
reward, unbiased) and is labelled ``large_batch_<N>``. The truth of an offline objective
(SFT, DPO) is the gradient of its loss over the whole fixed dataset: exact by definition.

An *estimator* is what one update of training computes from one minibatch of size B:
the algorithm's own ``prepare`` + ``loss`` on a fresh rollout (online), or its ``step``
on B rows drawn from its dataset (offline), so the measured estimator is the one training
uses. From K independent minibatch gradients g_1..g_K at fixed theta:

    gbar          = (1/K) sum_k g_k
    total_var     = tr Cov(g) = (1/(K-1)) sum_k ||g_k - gbar||^2
    snr           = ||E g||^2 / tr Cov(g),  ||E g||^2 estimated without bias by ||gbar||^2 - total_var / K
    cos_true      = (1/K) sum_k cos(g_k, g_true)          one update's alignment with the truth
    cos_mean_true = cos(gbar, g_true)                      the estimator's bias in direction

Cost. Two exact shortcuts, each checked against the plain computation by a test:
- the model runs on the *distinct* inputs of a batch only (a causal policy's outputs depend
  on the prompt and y_<T-1; duplicates share one row and autograd sums their cotangents),
  so a bandit minibatch costs one row per context and a full dataset at most P x A^(T-1);
- for small minibatches (< 8 rows), each loss runs once on a recorder that yields
  d loss / d(outputs) without a backward through the model, then one
  ``torch.func.vmap(grad(...))`` gives all K gradients: per-sample gradients at about the
  price of one batched gradient. From 8 rows on, one backward per minibatch is faster.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from ..core.stats import cosine, trace_cov
from ..core.types import Batch, Rollout
from ..models.policy import PolicyOutput
from .exact import exact_logprobs

LossFn = Callable[[Callable], Tensor]  # policy-like callable -> scalar loss of one minibatch


# -- parameters ------------------------------------------------------------------------------


def lm_params(policy) -> dict[str, Tensor]:
    """The language model's trainable parameters, named as in ``policy.named_parameters()``."""
    return {n: p for n, p in policy.named_parameters() if n.startswith("model.") and p.requires_grad}


def flatten(grads) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# -- the exact RL objective ------------------------------------------------------------------


def exact_objective(
    policy, task, ref_logp: Tensor, rewards: Tensor, beta: float, prompts: Tensor | None = None
) -> Tensor:
    """J(theta) = E_x sum_y pi(y|x) r(x,y) - beta E_x KL(pi || pi_ref), differentiable.

    ``ref_logp`` and ``rewards`` are ``(P, A^T)`` over ``prompts`` (default the eval prompts).
    """
    logp = exact_logprobs(policy, task, prompts)  # (P, N), with grad
    ref_logp, rewards = ref_logp.to(logp.device), rewards.to(logp.device)
    p = logp.exp()
    reward = (p * rewards).sum(-1).mean()  # E_x sum_y pi r
    kl = (p * (logp - ref_logp)).sum(-1).mean()  # E_x KL(pi || pi_ref)
    return reward - beta * kl


def exact_rl_gradient(
    policy, task, ref_logp: Tensor, rewards: Tensor, beta: float, prompts: Tensor | None = None
) -> Tensor:
    """g_RL = grad_theta(-J), flat ``(D,)`` over ``lm_params(policy)``."""
    params = list(lm_params(policy).values())
    with torch.enable_grad():
        J = exact_objective(policy, task, ref_logp, rewards, beta, prompts)
        return flatten(torch.autograd.grad(-J, params))


# -- minibatch gradients ---------------------------------------------------------------------


@dataclass
class _Call:
    prompts: Tensor
    completions: Tensor
    values: bool
    out: PolicyOutput  # leaves standing in for the policy's outputs


def _distinct(prompts: Tensor, completions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(prompts_u, completions_u, inverse)``: the distinct model inputs among the rows.

    A causal policy's outputs at positions 0..T-1 (log pi(. | s_t), V(s_t)) depend on the
    prompt and y_<T-1 only: the last token is a target, never context. Rows are keyed on
    that, the last token of each distinct row set to 0, and ``inverse (B,)`` maps rows to them.
    """
    Tp = prompts.shape[1]
    uniq, inv = torch.unique(torch.cat([prompts, completions[:, :-1]], 1), dim=0, return_inverse=True)
    last = torch.zeros(len(uniq), 1, dtype=completions.dtype, device=completions.device)
    return uniq[:, :Tp], torch.cat([uniq[:, Tp:], last], 1), inv


def _gathered(o: PolicyOutput, inv: Tensor, completions: Tensor) -> PolicyOutput:
    """The outputs of the distinct inputs, read back for every row (its own y_t for log pi(y_t | s_t))."""
    logits = o.logits[inv]  # (B, T, A)
    logp = logits.gather(-1, completions.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return PolicyOutput(logp, logits, None if o.values is None else o.values[inv])


class _Recorder:
    """Stands in for the policy inside a loss: runs it without grad and hands back leaf outputs."""

    def __init__(self, policy):
        self.policy = policy
        self.calls: list[_Call] = []

    @property
    def device(self):
        return self.policy.device

    def __call__(self, prompts: Tensor, completions: Tensor, values: bool | None = None) -> PolicyOutput:
        want = self.policy.value_head is not None if values is None else values
        p_u, c_u, inv = _distinct(prompts, completions)
        with torch.no_grad():  # rows with the same inputs have the same outputs: run the distinct ones
            o = _gathered(self.policy(p_u, c_u, values=want), inv, completions)
        out = PolicyOutput(
            logp=o.logp.requires_grad_(),
            logits=o.logits.requires_grad_(),
            values=None if o.values is None else o.values.requires_grad_(),
        )
        self.calls.append(_Call(prompts, completions, want, out))
        return out


class _Distinct:
    """The policy evaluated on the distinct model inputs among the rows only, outputs read back per row.

    With ``grad=True`` the gather is part of the graph, so a backward sums the cotangents of
    duplicate rows onto their one distinct input: one forward and backward over the distinct
    inputs, whatever the batch. On a bandit that is one row per context; for a dataset of
    demonstrations one per prompt; on an enumerable task never more than P x A^(T-1).
    """

    def __init__(self, policy, grad: bool = False):
        self.policy, self.grad = policy, grad

    @property
    def device(self):
        return self.policy.device

    @property
    def value_head(self):
        return self.policy.value_head

    def __call__(self, prompts: Tensor, completions: Tensor, values: bool | None = None) -> PolicyOutput:
        p_u, c_u, inv = _distinct(prompts, completions)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            return _gathered(self.policy(p_u, c_u, values=values), inv, completions)


@contextlib.contextmanager
def _vmappable(policy):
    """transformers checks for padding with a data-dependent ``in``, which vmap cannot batch: bypass it."""
    patched = [m for m in policy.modules() if hasattr(m, "warn_if_padding_and_no_attention_mask")]
    for m in patched:
        m.warn_if_padding_and_no_attention_mask = lambda *a, **k: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # SDPA falls back to a slower path under vmap
            yield
    finally:
        for m in patched:
            del m.warn_if_padding_and_no_attention_mask


def minibatch_gradients(policy, losses: list[LossFn], method: str = "auto", max_rows: int = 8192) -> Tensor:
    """``(K, D)``: the gradient over ``lm_params(policy)`` of each minibatch loss ``losses[k](policy)``.

    ``vmap``: each loss runs once on a recorder to get d loss / d(outputs); then
    grad_theta sum_calls <cotangent, output(theta)> for all K at once under ``torch.func.vmap``
    (minibatches with the same shapes are batched together, ``max_rows`` rows per pass).
    ``loop``: one ``autograd.grad`` per minibatch, the model run on the minibatch's distinct
    inputs only (``_Distinct``). ``auto``: vmap below 8 rows per minibatch unless most are
    duplicates, else loop (measured on the CPU with the default GPT-2: vmap is 1.2-1.7x faster
    at 1-2 rows, the loop 1.3-1.7x faster from 8 rows on, where each backward is already
    batched). None touches ``.grad``.
    """
    params = lm_params(policy)
    if method == "auto":
        rows, distinct = _rows_per_loss(policy, losses[0]) if losses else (0, 0)
        method = "loop"
        if rows < 8 and distinct > rows / 2:
            try:
                return minibatch_gradients(policy, losses, "vmap", max_rows)
            except RuntimeError as e:  # a model vmap cannot batch (data-dependent control flow): the plain path
                warnings.warn(
                    f"vmap over minibatches failed ({str(e)[:120]}); using one backward per minibatch", stacklevel=2
                )
    if method == "loop":
        with torch.enable_grad():
            pol = _Distinct(policy, grad=True)
            return torch.stack([flatten(torch.autograd.grad(f(pol), list(params.values()))) for f in losses])
    if method != "vmap":
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    records = []
    for f in losses:
        rec = _Recorder(policy)
        with torch.enable_grad():
            loss = f(rec)
            leaves = [t for c in rec.calls for t in (c.out.logp, c.out.logits, c.out.values) if t is not None]
            cots = torch.autograd.grad(loss, leaves, allow_unused=True)
        it = iter(cots)
        entry = []
        for c in rec.calls:
            lp, lg = next(it), next(it)
            v = next(it) if c.out.values is not None else None
            entry.append((c, lp, lg, v))
        records.append(entry)
    out: list[Tensor | None] = [None] * len(losses)
    groups: dict[tuple, list[int]] = {}
    for k, entry in enumerate(records):
        key = tuple(
            (c.prompts.shape, c.completions.shape, c.values, lp is None, lg is None, v is None)
            for c, lp, lg, v in entry
        )
        groups.setdefault(key, []).append(k)
    for key, ks in groups.items():
        rows = max(1, sum(c.prompts.shape[0] for c, *_ in records[ks[0]]))
        step = max(1, max_rows // rows)
        for s in range(0, len(ks), step):
            idx = ks[s : s + step]
            G = _vmapped_gradients(policy, params, [records[k] for k in idx], key)
            for j, k in enumerate(idx):
                out[k] = G[j]
    return torch.stack(out)


def _rows_per_loss(policy, f: LossFn) -> tuple[int, int]:
    """Rows the policy sees in one minibatch loss, and how many of them are distinct model inputs."""
    rec = _Recorder(policy)
    with torch.no_grad():
        f(rec)
    rows = sum(c.prompts.shape[0] for c in rec.calls)
    distinct = sum(len(_distinct(c.prompts, c.completions)[0]) for c in rec.calls)
    return rows, distinct


def _vmapped_gradients(policy, params: dict[str, Tensor], entries: list, key: tuple) -> Tensor:

    # stack each call's inputs and cotangents over the minibatches: a pytree of (K, ...) tensors
    stacked = []
    for i, (_, _, _, no_lp, no_lg, no_v) in enumerate(key):
        calls = [e[i] for e in entries]
        stacked.append(
            {
                "prompts": torch.stack([c.prompts for c, *_ in calls]),
                "completions": torch.stack([c.completions for c, *_ in calls]),
                **({} if no_lp else {"c_logp": torch.stack([lp for _, lp, _, _ in calls])}),
                **({} if no_lg else {"c_logits": torch.stack([lg for _, _, lg, _ in calls])}),
                **({} if no_v else {"c_values": torch.stack([v for _, _, _, v in calls])}),
            }
        )
    detached = {n: p.detach() for n, p in params.items()}

    def surrogate(theta, inputs):  # sum over calls of <cotangent, output(theta)>: its gradient is the loss's
        total = 0.0
        for (_, _, want_values, *_), x in zip(key, inputs):
            o = functional_call(policy, theta, (x["prompts"], x["completions"]), {"values": want_values})
            if "c_logp" in x:
                total = total + (o.logp * x["c_logp"]).sum()
            if "c_logits" in x:
                total = total + (o.logits * x["c_logits"]).sum()
            if "c_values" in x:
                total = total + (o.values * x["c_values"]).sum()
        return total

    with _vmappable(policy):
        g = vmap(grad(surrogate), in_dims=(None, 0))(detached, stacked)
    return torch.cat([g[n].reshape(len(entries), -1) for n in params], dim=1)


# -- statistics -----------------------------------------------------------------------------


def gradient_stats(G: Tensor, true: Tensor | None = None) -> dict[str, float]:
    """Statistics of K minibatch gradients ``G (K, D)``, against ``true (D,)`` when given."""
    G = G.double()
    K = G.shape[0]
    gbar = G.mean(0)
    var, var_se = trace_cov(G)
    mu2 = max(gbar.pow(2).sum().item() - var / K, 0.0)  # unbiased ||E g||^2, clipped at 0
    out = {
        "norm_mean": G.norm(dim=1).mean().item(),
        "mean_norm": gbar.norm().item(),
        "total_var": var,
        "total_var_se": var_se,
        "snr": mu2 / var if var > 1e-12 * max(mu2, 1e-30) else math.inf,
    }
    if true is not None:
        true = true.double().to(G.device)
        cos = cosine(G, true[None])  # (K,)
        out["cos_true"] = cos.mean().item()
        out["cos_true_se"] = cos.std().item() / math.sqrt(K) if K > 1 else math.inf
        out["cos_mean_true"] = cosine(gbar, true).item()
        out["true_norm"] = true.norm().item()
    return out


# -- estimators from the algorithms' own functions ---------------------------------------------


def slice_rollout(roll: Rollout, start: int, stop: int) -> Rollout:
    """Rows ``start:stop`` of a rollout (whole groups)."""
    sl = slice(start, stop)
    return Rollout(
        prompts=roll.prompts[sl],
        completions=roll.completions[sl],
        mask=roll.mask[sl],
        old_logp=roll.old_logp[sl],
        ref_logp=roll.ref_logp[sl],
        scores=roll.scores[sl],
        step_rewards=roll.step_rewards[sl],
        gold=roll.gold[sl],
        group_size=roll.group_size,
        old_values=None if roll.old_values is None else roll.old_values[sl],
        eos_action=roll.eos_action,
    )


def online_losses(spec, cfg, beta: float, rollouts: list[Rollout]) -> tuple[list[LossFn], list[Batch]]:
    """One loss per rollout: ``spec.loss`` on ``spec.prepare`` of it, all B rows in one minibatch.

    This is the first update training makes from that rollout (ratio 1, no clipping active).
    Returns the losses and the prepared batches (their advantages feed the credit analysis).
    """
    losses, batches = [], []
    for r in rollouts:
        with torch.no_grad():
            batch = spec.prepare(r, cfg, beta)

        def f(pol, r=r, batch=batch):
            return spec.loss(pol(r.prompts, r.completions), batch, cfg, beta)[0]

        losses.append(f)
        batches.append(batch)
    return losses, batches


def offline_losses(spec, cfg, beta: float, ref, batches: list[dict]) -> list[LossFn]:
    """One loss per batch of dataset rows: ``spec.step`` as the offline loop calls it."""
    return [lambda pol, b=b: spec.step(pol, ref, b, cfg, beta)[0] for b in batches]


def sample_batches(dataset: dict, batch_size: int, K: int, generator: torch.Generator, device) -> list[dict]:
    """K minibatches of ``batch_size`` rows, each drawn without replacement as the offline loop does."""
    N = len(next(iter(dataset.values())))
    bs = min(batch_size, N)
    out = []
    for _ in range(K):
        idx = torch.randperm(N, generator=generator)[:bs] if bs < N else torch.arange(N)
        out.append({k: v[idx].to(device) for k, v in dataset.items()})
    return out


def dataset_gradient(policy, spec, cfg, beta: float, ref, dataset: dict, device, chunk: int = 8192) -> Tensor:
    """The gradient of the loss over the whole dataset, flat ``(D,)``. Exact for any loss.

    ``spec.step`` on the dataset (in chunks of ``chunk`` rows weighted by their share of the
    rows; one chunk where it fits), with the policy and the reference run on distinct
    inputs only (``_Distinct``): on an enumerable task at most P x A^(T-1) rows however
    large the dataset.
    """
    N = len(next(iter(dataset.values())))
    params = list(lm_params(policy).values())
    total = None
    with torch.enable_grad():
        for s in range(0, N, chunk):
            batch = {k: v[s : s + chunk].to(device) for k, v in dataset.items()}
            w = len(next(iter(batch.values()))) / N
            loss = spec.step(_Distinct(policy, grad=True), _Distinct(ref), batch, cfg, beta)[0] * w
            g = flatten(torch.autograd.grad(loss, params))
            total = g if total is None else total + g
    return total
