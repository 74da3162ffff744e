"""Exact quantities by enumeration over every completion of every eval prompt.

For an enumerable task (A ** T completions per prompt, prompts ``x`` from
``task.eval_prompts()`` weighted uniformly):

    reward/exact            E_x sum_y pi(y|x) r(x, y)
    kl/exact                E_x KL(pi(.|x) || pi_ref(.|x))
    kl/exact_ref_to_policy  E_x KL(pi_ref(.|x) || pi(.|x))
    entropy/exact           E_x H(pi(.|x))
    objective/exact         reward/exact - beta kl/exact
    kl/exact_to_optimal     E_x KL(pi(.|x) || pi*(.|x)),  pi* = pi_ref exp(r / beta) / Z(x)

The log-probabilities of all completions come from A ** (T-1) prefixes in one batched
teacher-forced pass each: the last position's distribution scores all A continuations. A
policy with a native GPT-2 walks a KV-cached prefix tree instead (``Policy.completion_logprobs``).

With an end-of-sequence action the completions are the task's canonical ones (every answer
ended by EOS and padded with it, and every truncated one; ``task.all_completions``), scored by
one teacher-forced pass each: log pi(y|x) = sum_t m_t log pi(y_t | s_t), m the completion mask
(the padding after EOS is no choice of the policy). A task with observations (``tool_use``) lists its
feasible episodes only, and its action mask is also 0 at the observations: the environment writes them
with probability 1. A native GPT-2 walks the prefix tree instead, an EOS node being terminal
(``Policy._expand_eos``; not for a task with observations). Those tasks also get

    length/exact                E_x sum_y pi(y|x) |y|       |y| = counted tokens (answer + EOS)
    length/exact_correct        E[|y| | correct], correct = gold reward 1 (over all prompts)
    length/exact_incorrect      E[|y| | not correct]
    length/exact_truncated_frac E_x sum_y pi(y|x) 1[y has no EOS]
    optimal/length              length/exact of pi*

A task with observations (``tool_use``) adds its episode metrics (``Task.episode_stats``) under pi as
``tool/exact_*``, ``episode/exact_*`` and under pi* as ``tool/optimal_*``, ``episode/optimal_*``.

Always in float32: ``exact_logprobs`` turns autocast off (``full_precision``), so a run with
``precision = "bf16"`` is measured exactly as its fp32 twin with the same weights would be.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.types import PolicyOutput
from ..models.precision import full_precision


def exact_logprobs(policy, task, prompts: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """``(P, A ** T)`` log pi(y | x) for every eval prompt and every completion (lexicographic order), in float32
    whatever the run's precision."""
    with full_precision(policy.device):  # exact truth is never autocast (workbench.models.precision)
        return _exact_logprobs(policy, task, task.eval_prompts() if prompts is None else prompts, chunk)


def _exact_logprobs(policy, task, prompts: Tensor, chunk: int) -> Tensor:
    tree = getattr(policy, "has_prefix_tree", False)
    if task.eos_action is not None:  # variable length: the canonical completions
        tree = tree and not task.has_observations  # the tree knows no forced tokens: tool_use is teacher-forced
        if tree and getattr(policy, "eos_action", None) == task.eos_action:  # prefix tree with terminal EOS nodes
            return policy.completion_logprobs(prompts.to(policy.device), chunk)
        return _canonical_logprobs(policy, task, prompts, chunk)  # else one teacher-forced pass (HF models)
    if tree:  # native GPT-2: KV-cached prefix tree (Policy.completion_logprobs)
        return policy.completion_logprobs(prompts.to(policy.device), chunk)
    A, _T = task.n_actions, task.completion_len
    prefixes = task.all_completions()[::A, :]  # (A^(T-1), T): every prefix, last token 0 as a placeholder
    dev = policy.device
    prompts, prefixes = prompts.to(dev), prefixes.to(dev)
    out = []
    for p in prompts:
        rows = []
        for s in range(0, len(prefixes), chunk):
            c = prefixes[s : s + chunk]
            o = policy(p.expand(len(c), -1), c, values=False)
            head = o.logp[:, :-1].sum(-1, keepdim=True)  # log pi(y_<T-1)
            rows.append(head + o.logits[:, -1, :])  # (n, A): + log pi(y_T-1 | prefix)
        out.append(torch.cat(rows).reshape(-1))
    return torch.stack(out)  # (P, A^T)


def _canonical_logprobs(policy, task, prompts: Tensor, chunk: int) -> Tensor:
    """``(P, N)`` log pi(y|x) = sum_t m_t log pi(y_t | s_t) over the canonical completions of a task with EOS."""
    dev = policy.device
    comps = task.all_completions().to(dev)  # (N, T)
    mask = task.action_mask(comps)  # (N, T) m_t (0 at observations too: the environment's, probability 1)
    out = []
    for p in prompts.to(dev):
        rows = []
        for s in range(0, len(comps), chunk):
            c = comps[s : s + chunk]
            o = policy(p.expand(len(c), -1), c, values=False)
            rows.append((o.logp * mask[s : s + chunk]).sum(-1))  # masked sum: padding is no choice
        out.append(torch.cat(rows))
    return torch.stack(out)  # (P, N)


def optimal_logprobs(ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x); inputs and output ``(P, N)``."""
    logits = ref_logp + rewards / beta
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities ``(P, N)`` -> ``(P,)``."""
    return (logp.exp() * (logp - logq)).sum(-1)


class ExactEvaluator:
    """Holds what does not change during a run (rewards, reference log-probs) and measures pi."""

    def __init__(self, task, ref_policy, beta: float, rewards: Tensor | None = None):
        self.task = task
        self.beta = beta
        self.prompts = task.eval_prompts()
        comps = task.all_completions()
        P, N = len(self.prompts), len(comps)
        if rewards is None:
            rewards = task.reward(self.prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
        self.rewards = rewards.float()  # (P, N)
        with torch.no_grad():
            self.ref_logp = exact_logprobs(ref_policy, task, self.prompts).cpu()  # (P, N)
        self.opt_logp = optimal_logprobs(self.ref_logp, self.rewards, beta) if beta > 0 else None
        self.lengths = None  # with EOS: (N,) counted tokens, (P, N) correct, (N,) truncated
        if task.eos_action is not None:
            self.lengths = task.lengths(comps).float()
            gold = task.reward(self.prompts.repeat_interleave(N, 0), comps.repeat(P, 1)).view(P, N)
            self.correct = (gold >= 1.0).float()
            self.truncated = task.truncated(comps).float()
        self.episodes = None  # a task with observations: every (prompt, episode) pair, for its exact episode metrics
        if task.has_observations:
            self.episodes = (self.prompts.repeat_interleave(N, 0), comps.repeat(P, 1))

    @torch.no_grad()
    def measure(self, policy) -> dict[str, float]:
        return self.metrics(exact_logprobs(policy, self.task, self.prompts).cpu())

    def metrics(self, logp: Tensor) -> dict[str, float]:
        """The metrics above of the policy whose log pi(y|x) over the eval prompts' completions is ``logp (P, N)``."""
        p = logp.exp()
        reward = (p * self.rewards).sum(-1).mean().item()
        kl_ref = kl(logp, self.ref_logp).mean().item()
        out = {
            "reward/exact": reward,
            "kl/exact": kl_ref,
            "kl/exact_ref_to_policy": kl(self.ref_logp, logp).mean().item(),
            "entropy/exact": -(p * logp).sum(-1).mean().item(),
            "objective/exact": reward - self.beta * kl_ref,
        }
        if self.opt_logp is not None:
            out["kl/exact_to_optimal"] = kl(logp, self.opt_logp).mean().item()
        if self.lengths is not None:
            out.update(self.length_metrics(p))
        out.update(self.episode_metrics(p, "exact_"))
        return out

    def episode_metrics(self, p: Tensor, tag: str) -> dict[str, float]:
        """The task's episode metrics (``tool/*``, ``episode/*``) under ``p (P, N)``, each name's last part
        prefixed by ``tag`` (``tool/exact_calls_mean``); none for a task without observations."""
        if self.episodes is None:
            return {}
        stats = self.task.episode_stats(*self.episodes, weights=(p / len(p)).flatten())  # prompts weighted uniformly
        return {k.replace("/", f"/{tag}", 1): v for k, v in stats.items()}

    def length_metrics(self, p: Tensor) -> dict[str, float]:
        """``length/exact*`` of the distribution ``p (P, N)`` over the canonical completions (tasks with EOS)."""
        L, c = self.lengths, self.correct  # (N,), (P, N)
        out = {
            "length/exact": (p * L).sum(-1).mean().item(),
            "length/exact_truncated_frac": (p * self.truncated).sum(-1).mean().item(),
        }
        for name, w in (("correct", p * c), ("incorrect", p * (1 - c))):
            if w.sum() > 0:  # E[|y| | correct] over all eval prompts; absent when no completion qualifies
                out[f"length/exact_{name}"] = ((w * L).sum() / w.sum()).item()
        return out

    def optimum(self) -> dict[str, float]:
        """The same quantities for pi* itself: the ceiling of the regularised objective."""
        if self.opt_logp is None:
            return {}
        p = self.opt_logp.exp()
        r = (p * self.rewards).sum(-1).mean().item()
        k = kl(self.opt_logp, self.ref_logp).mean().item()
        out = {"optimal/reward": r, "optimal/kl": k, "optimal/objective": r - self.beta * k}
        if self.lengths is not None:
            out["optimal/length"] = (p * self.lengths).sum(-1).mean().item()
        out.update(self.episode_metrics(p, "optimal_"))
        return out


def best_of_n_logprobs(logp: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact log-probabilities of best-of-n from pi: draw y_1..y_n ~ pi(.|x), keep the highest reward.

    logp, rewards: ``(P, N)`` log pi(y|x) and r(x, y) of every completion of each prompt. With
    F(y) = sum_{y': r(y') <= r(y)} pi(y'), F(y-) = sum_{y': r(y') < r(y)} pi(y') (the CDF of the
    reward under pi, in reward order) and m(y) = F(y) - F(y-) the mass of y's tie block,

        P_bon(y) = pi(y) / m(y) * (F(y)^n - F(y-)^n)

    For distinct rewards m(y) = pi(y) and P_bon(y) = F(y)^n - F(y-)^n: the maximum of n draws
    lands at y. Ties: the block of equal rewards gets F^n - F-^n, shared in proportion to pi,
    which is exact whenever the tie is broken without looking at y (the first of the tied
    draws, or a uniformly random one): the kept draw is then a draw from pi restricted to the
    block. Returns ``(P, N)`` float64 log P_bon (-inf where best-of-n never lands).
    """
    logp, rewards = logp.double(), rewards.double()
    p = logp.exp()
    r_sorted, order = rewards.sort(dim=-1)
    cum = torch.cat([torch.zeros_like(p[:, :1]), p.gather(-1, order).cumsum(-1)], dim=-1)  # (P, N + 1)
    hi = torch.searchsorted(r_sorted, rewards, right=True)  # completions with r' <= r(y)
    lo = torch.searchsorted(r_sorted, rewards, right=False)  # completions with r' < r(y)
    F = cum.gather(-1, hi).clamp(max=1.0)  # F(y)
    m = torch.where(hi - lo == 1, p, cum.gather(-1, hi) - cum.gather(-1, lo))  # m(y): pi(y) when untied
    m = torch.minimum(m, F)
    # F^n - F-^n = F^n (1 - (1 - m/F)^n), the second factor by log1p/expm1: no cancellation for small m
    log_gap = torch.log(-torch.expm1(n * torch.log1p(-(m / F).clamp(max=1.0))))
    logq = logp - torch.log(m) + n * torch.log(F) + log_gap
    return torch.where(p > 0, logq, torch.full_like(logq, -torch.inf))  # pi(y) = 0: never drawn, never kept


def best_of_n_kl(logp: Tensor, rewards: Tensor, n: int) -> Tensor:
    """``(P,)`` KL(P_bon(.|x) || pi(.|x)) of ``best_of_n_logprobs``, in nats.

    It is at most log n - (n - 1)/n (``best_of_n_kl_bound``; Beirami et al. 2024, arXiv
    2401.01879), and with distinct rewards it approaches that bound as max_y pi(y|x) -> 0, but
    never reaches it for n > 1 on a finite completion set. Why: with u ~ U(0, 1) the
    continuous best-of-n has density n u^(n-1) and KL = log n + (n - 1) E[log u] = log n -
    (n - 1)/n (E[log u] = -1/n under Beta(n, 1)); pi and P_bon are the images of U(0, 1) and of
    that law under the map from u to the completion whose CDF interval [F(y-), F(y)) holds u,
    so by the data-processing inequality the discrete KL is smaller, strictly unless every
    interval has zero width. The closed form of the issue is the continuum limit.
    """
    logq = best_of_n_logprobs(logp, rewards, n)
    q = logq.exp()
    return torch.where(q > 0, q * (logq - logp.double()), torch.zeros_like(q)).sum(-1)


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1)/n: the KL of best-of-n to pi for a continuous reward distribution, an upper bound otherwise."""
    return torch.tensor(float(n), dtype=torch.float64).log().item() - (n - 1) / n


def best_of_n_frontier(logp: Tensor, rewards: Tensor, ns: list[int]) -> list[dict[str, float]]:
    """Exact expected reward and KL to pi of best-of-n from pi, for each n in ``ns``, averaged over prompts.

    logp, rewards: ``(P, N)`` as for ``best_of_n_logprobs`` (e.g. ``ExactEvaluator``'s ``ref_logp`` and
    ``rewards``: the best-of-n frontier of pi_ref, against which a trained policy's (kl/exact, reward/exact)
    is read). Returns one ``{"n", "reward", "kl", "kl_bound"}`` per n.
    """
    out = []
    for n in ns:
        q = best_of_n_logprobs(logp, rewards, n).exp()
        out.append(
            {
                "n": n,
                "reward": (q * rewards.double()).sum(-1).mean().item(),
                "kl": best_of_n_kl(logp, rewards, n).mean().item(),
                "kl_bound": best_of_n_kl_bound(n),
            }
        )
    return out


# -- fixed points of the offline objectives (issue 17) ------------------------------------------
#
# KTO, SimPO, ORPO, cDPO and robust DPO do not minimise E[r] - beta KL, so pi* is not their answer.
# On an enumerable task their answer is the fixed point of full-batch training in the space of all
# distributions over completions (a table log pi(y|x), ``TabularPolicy``): every one of these losses
# reads pi only through log pi(y|x) of whole completions (and SimPO/ORPO through |y|), and an
# autoregressive policy with full support can represent any such table, so the table's fixed point
# is the policy's. Closed forms where they exist:
#
#     DPO, soft Bradley-Terry labels (temperature tau) on every pair:  pi* with beta tau (C6)
#     SimPO, gamma = 0, the same data, completions of one length T:  softmax(T r / (beta_s tau)),
#         whatever pi_ref: pi* with pi_ref uniform and beta_s tau / T in place of beta (``simpo_bandit_optimum``)
#     two completions, chosen with probability p (a pair's loss alone), x = exp(beta h):
#         cDPO   sigmoid(beta h) = (1 - eps) p + eps (1 - p)
#         rDPO   sigmoid(beta h) = (p - eps) / (1 - 2 eps)          (eps < p < 1 - eps; else no minimiser)
#         SimPO  (1 - p) x^2 + e^gamma (1 - 2p) x - p = 0, beta -> beta_s, h on average log-probs
#
# KTO's fixed point has none: its reference point z_ref is detached, so training follows a
# semi-gradient, and ``population_optimum`` iterates it (z_ref recomputed at every iterate) to its
# stationary point; its gradient norm there certifies it.


class TabularPolicy(torch.nn.Module):
    """A policy given by a table ``logits (P, N)`` over the eval prompts and ``task.all_completions()``.

    Called as ``Policy`` is (``policy(prompts, completions).logp``), it returns per-token log-probs
    ``(B, T)`` whose masked sum is log pi(y|x): log pi(y|x) / |y| at each of y's counted tokens
    (``task.action_mask``), so sums, token means and SimPO's average read the table exactly.
    """

    def __init__(self, task, logits: Tensor, trainable: bool = True):
        super().__init__()
        self.task = task
        self.logits = torch.nn.Parameter(logits.clone().double(), requires_grad=trainable)
        prompts, comps = task.eval_prompts(), task.all_completions()
        self._pbase = int(prompts.max()) + 1
        self._prompt_row = torch.full((self._pbase ** prompts.shape[-1],), -1, dtype=torch.long)
        self._prompt_row[self._encode(prompts, self._pbase)] = torch.arange(len(prompts))
        self._comp_row = torch.full((task.n_actions**task.completion_len,), -1, dtype=torch.long)
        self._comp_row[self._encode(comps, task.n_actions)] = torch.arange(len(comps))

    @staticmethod
    def _encode(x: Tensor, base: int) -> Tensor:
        w = base ** torch.arange(x.shape[-1] - 1, -1, -1, dtype=torch.long)
        return (x.long() * w).sum(-1)

    def index(self, prompts: Tensor, completions: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``(B,)`` of the eval prompts and of ``all_completions`` (after ``task.canonical``)."""
        p = self._prompt_row[self._encode(prompts.cpu(), self._pbase)]
        c = self._comp_row[self._encode(self.task.canonical(completions.cpu()), self.task.n_actions)]
        if (p < 0).any() or (c < 0).any():
            raise ValueError("a prompt outside the eval prompts or a completion outside all_completions()")
        return p, c

    def log_table(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=-1)  # (P, N) log pi(y|x)

    def forward(self, prompts: Tensor, completions: Tensor, values: bool | None = None) -> PolicyOutput:
        p, c = self.index(prompts, completions)
        mask = self.task.action_mask(completions.cpu()).double()  # (B, T)
        seq = self.log_table()[p, c]  # (B,) log pi(y|x)
        logp = seq[:, None] * mask / mask.sum(-1, keepdim=True).clamp(min=1)
        return PolicyOutput(logp=logp, logits=None, values=None)


def population_optimum(
    task,
    spec,
    cfg,
    beta: float,
    ref_logp: Tensor,
    batch: dict,
    method: str = "lbfgs",
    steps: int = 200,
    lr: float = 0.1,
) -> tuple[Tensor, float]:
    """The fixed point of full-batch training of the offline objective ``spec`` on ``batch`` over tables.

    ``batch``: the objective's whole dataset (``spec.dataset(task, cfg, generator)``; with ``pairs='all'``
    and soft labels the exact population). Starts from ``ref_logp (P, N)`` (pi_ref, which is also the
    reference of the loss) and minimises ``spec.forward`` + ``spec.loss`` (what training computes) in
    float64: ``method='lbfgs'`` (``steps`` iterations) for a loss that is a function of the table, ``'adam'``
    (``steps`` steps of size ``lr``) for KTO, whose detached reference point makes training a
    semi-gradient iteration with no loss to line-search. Returns ``(logp (P, N), gradient norm at the
    end)``; a norm near 0 certifies the fixed point.
    """
    policy = TabularPolicy(task, ref_logp)
    ref = TabularPolicy(task, ref_logp, trainable=False)

    def closure():
        opt.zero_grad()
        loss, _, _ = spec.loss(spec.forward(policy, ref, batch), batch, cfg, beta)
        loss.backward()
        return loss

    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            policy.parameters(), max_iter=steps, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
        )
        opt.step(closure)
    elif method == "adam":
        opt = torch.optim.Adam(policy.parameters(), lr=lr)
        for _ in range(steps):
            closure()
            opt.step()
    else:
        raise ValueError(f"method must be 'lbfgs' or 'adam', got {method!r}")
    closure()
    return policy.log_table().detach(), policy.logits.grad.norm().item()


def simpo_bandit_optimum(rewards: Tensor, beta_s: float, length: int = 1, tau: float = 1.0) -> Tensor:
    """SimPO's minimiser with gamma = 0 on soft Bradley-Terry labels over every pair, completions of one
    length: log pi(y|x) = log softmax(length r / (beta_s tau)), ``rewards (P, N)`` -> ``(P, N)``; pi_ref plays
    no part. (sigmoid(beta_s h) = sigmoid(dr / tau) pair by pair, h the difference of average log-probs.)"""
    return torch.log_softmax(rewards.double() * length / (beta_s * tau), dim=-1)


def pairwise_optimum(p: float, beta: float, loss: str, eps: float = 0.0, gamma: float = 0.0) -> float:
    """beta h at the minimiser of one pair's loss, chosen winning with probability ``p``; ``loss`` one of
    'dpo', 'cdpo', 'rdpo' (flip rate ``eps``) or 'simpo' (margin ``gamma``; h on average log-probs)."""
    if loss in ("dpo", "cdpo", "rdpo"):
        q = {"dpo": p, "cdpo": (1 - eps) * p + eps * (1 - p), "rdpo": (p - eps) / (1 - 2 * eps)}[loss]
        if not 0 < q < 1:
            raise ValueError(f"no finite minimiser: the effective label {q} is not in (0, 1)")
        return math.log(q / (1 - q))
    if loss == "simpo":  # (1 - p) x^2 + c (1 - 2p) x - p = 0, x = exp(beta h), c = exp(gamma)
        a, b, c = 1 - p, math.exp(gamma) * (1 - 2 * p), -p
        x = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return math.log(x)
    raise ValueError(f"loss must be 'dpo', 'cdpo', 'rdpo' or 'simpo', got {loss!r}")


@torch.no_grad()
def all_scores(rm, task, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, gold)``, each ``(P, N)``: the reward model's and the gold reward of every completion."""
    prompts, comps = task.eval_prompts(), task.all_completions()
    P, N = len(prompts), len(comps)
    px, cx = prompts.repeat_interleave(N, 0), comps.repeat(P, 1)
    scores = torch.cat(
        [rm(px[i : i + 4096].to(device), cx[i : i + 4096].to(device)).cpu() for i in range(0, P * N, 4096)]
    )
    return scores.view(P, N), task.reward(px, cx).float().view(P, N)
