"""Every metric name the workbench logs (``docs/metrics.md``), to check the names a study file uses.

``tests/test_validation_faults.py`` checks that ``KNOWN`` and ``PATTERNS`` are exactly the
names in the first column of ``docs/metrics.md``'s tables (``names_in_docs``). A name with
a placeholder (``trl/<name>``) stands for any name of that form.
"""

from __future__ import annotations

import difflib
import re

KNOWN: tuple[str, ...] = (
    # the loop
    "step",
    "samples",
    "lr",
    "time/elapsed_s",
    # online rollouts and measurements
    "reward/mean",
    "reward/std",
    "reward/gold_mean",
    "reward/frac_zero_std",
    "reward/eval",
    "reward/exact",
    "kl/exact",
    "kl/exact_ref_to_policy",
    "kl/exact_to_optimal",
    "entropy/exact",
    "entropy/sampled",
    "objective/exact",
    "optimal/reward",
    "optimal/kl",
    "optimal/objective",
    "optimal/length",
    "length/mean",
    "length/correct_mean",
    "length/incorrect_mean",
    "length/truncated_frac",
    "length/exact",
    "length/exact_correct",
    "length/exact_incorrect",
    "length/exact_truncated_frac",
    "kl/k1_reward",
    "kl/k2_reward",
    "kl/k3_reward",
    "kl/k1_loss",
    "kl/k2_loss",
    "kl/k3_loss",
    "kl/k1_monitor",
    "kl/k2_monitor",
    "kl/k3_monitor",
    "adv/mean",
    "adv/std",
    "grad/norm",
    # the algorithms' losses
    "loss/policy",
    "loss/value",
    "value/explained_variance",
    "loss/total",
    "clip/ratio",
    "clip/low_ratio",
    "clip/high_ratio",
    "loss/sft",
    "loss/dpo",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "online_dpo/tie_fraction",
    "loss/kto",
    "kto/kl",
    "kto/desirable_fraction",
    "loss/simpo",
    "loss/orpo",
    "orpo/nll",
    "orpo/log_odds_ratio",
    "loss/rft",
    "rft/kept_fraction",
    "bon/n",
    "bon/kl_bound",
    "loss/rm",
    "rm/accuracy",
    "rm/margin",
    "rm/gold_correlation",
    "model/n_params",
    # the RLHF pipeline inside a run
    "pipeline/sft_loss",
    "pipeline/rm_loss",
    "rm/exact_accuracy",
    "rm/heldout_accuracy",
    "rm/calibration_slope",
    "rm/calibration_intercept",
    "rm/calibration_r2",
    "reward/proxy_exact",
    "reward/proxy_gain",
    "reward/gold_gain",
    "rm/overoptimisation",
    # the base policy and the scratch ablation (issue 15)
    "pretrain/loss",
    "reasoning/accuracy",
    "reasoning/accuracy_corrupted",
    "reasoning/accuracy_stripped",
    "reasoning/scratch_use",
    "reasoning/scratch_length",
    "reasoning/answered",
    # the tool-use environment (issue 15, claim C11)
    "tool/calls_mean",
    "tool/success_rate",
    "episode/turns_mean",
    "tool/calls_when_needed",
    "tool/calls_when_not_needed",
    "tool/success_when_needed",
    "tool/success_when_not_needed",
    "tool/exact_calls_mean",
    "tool/exact_success_rate",
    "episode/exact_turns_mean",
    "tool/exact_calls_when_needed",
    "tool/exact_calls_when_not_needed",
    "tool/exact_success_when_needed",
    "tool/exact_success_when_not_needed",
    "tool/optimal_calls_mean",
    "tool/optimal_success_rate",
    "episode/optimal_turns_mean",
    "tool/optimal_calls_when_needed",
    "tool/optimal_calls_when_not_needed",
    "tool/optimal_success_when_needed",
    "tool/optimal_success_when_not_needed",
    # probes
    "grad/norm_mean",
    "grad/total_var",
    "grad/snr",
    "grad/cos_true",
    "grad/cos_mean_true",
    "grad/true_norm",
    "grad/exact_norm",
    "grad/cos_sft_rl",
    "grad/cos_dpo_rl",
    "credit/corr",
    "credit/mse",
    "credit/decisive_share",
    "credit/decisive_share_exact",
    "time/probe_s",
)
PATTERNS: tuple[str, ...] = (  # <...>: any non-empty name
    "trl/<name>",
    "credit/turn<k>_corr",
    "credit/turn<k>_share",
    "credit/turn<k>_share_exact",
)

# metrics only some algorithms log (registry names); any other known metric may come from any of them
ONLY_FROM: dict[str, frozenset[str]] = {
    **dict.fromkeys(["loss/sft"], frozenset({"sft"})),
    **dict.fromkeys(
        ["loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"],
        frozenset({"dpo", "ipo", "online_dpo", "kto", "simpo", "orpo"}),
    ),
    **dict.fromkeys(["loss/kto", "kto/kl", "kto/desirable_fraction"], frozenset({"kto"})),
    **dict.fromkeys(["loss/simpo"], frozenset({"simpo"})),
    **dict.fromkeys(["loss/orpo", "orpo/nll", "orpo/log_odds_ratio"], frozenset({"orpo"})),
    **dict.fromkeys(["online_dpo/tie_fraction"], frozenset({"online_dpo"})),
    **dict.fromkeys(["bon/n", "bon/kl_bound"], frozenset({"bon"})),
    **dict.fromkeys(["loss/rm", "rm/accuracy", "rm/margin"], frozenset({"rm"})),
    **dict.fromkeys(["loss/value", "value/explained_variance", "loss/total"], frozenset({"ppo"})),
    **dict.fromkeys(["clip/ratio", "clip/low_ratio", "clip/high_ratio"], frozenset({"ppo", "grpo"})),
    **dict.fromkeys(["loss/policy"], frozenset({"reinforce", "rloo", "ppo", "grpo"})),
}


def _regex(pattern: str) -> re.Pattern:
    return re.compile(
        "".join(".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", pattern))
    )


_PATTERN_RES = [_regex(p) for p in PATTERNS]


def is_known(name: str) -> bool:
    return name in KNOWN or any(r.fullmatch(name) for r in _PATTERN_RES)


def closest(name: str, n: int = 3) -> list[str]:
    """The known names nearest to ``name`` (typos, a wrong prefix), best first."""
    near = difflib.get_close_matches(name, KNOWN, n=n, cutoff=0.6)
    if not near and "/" in name:  # the right name under another prefix, e.g. 'grad/exact_to_optimal'
        tail = name.split("/", 1)[1]
        near = difflib.get_close_matches(tail, [k.split("/", 1)[-1] for k in KNOWN], n=n, cutoff=0.6)
        near = [k for t in near for k in KNOWN if k.split("/", 1)[-1] == t][:n]
    return near


def unknown_message(name: str) -> str:
    near = closest(name)
    hint = f"; closest: {', '.join(near)}" if near else ""
    return f"{name!r} is not a metric the workbench logs (docs/metrics.md){hint}"


def names_in_docs(text: str) -> list[str]:
    """Every name in the first column of the tables of ``docs/metrics.md`` (``KNOWN`` and ``PATTERNS`` must be
    these)."""
    names = []
    for line in text.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split(" | ")[0])
    return names
