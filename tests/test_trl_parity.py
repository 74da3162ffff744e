"""Our pure losses against TRL's trainers, on the same tiny model and the same batch.

Each test instantiates the real TRL trainer (``DPOTrainer``, ``GRPOTrainer``, ``SFTTrainer``,
``RewardTrainer``) on a tiny local GPT-2 built by ``workbench.models.policy.build_model``, lets the
trainer prepare the data (tokenisation, EOS, collation, prompt masking), calls the trainer's
own ``compute_loss`` (or, for GRPO advantages, ``_generate_and_score_completions``) on that
batch, and compares the result, and for the losses also the gradient w.r.t. every model
parameter, with our function fed the same batch. Tolerance 1e-5 in float32. A change in
TRL's maths therefore fails here; no TRL formula is re-implemented in this file.

Log-probs: TRL's are a softmax over the whole vocabulary, ``Policy``'s over the task's
action tokens. ``full_vocab`` widens our ``Policy`` / ``RewardModel`` action set to every
token, so our own forward (input layout, offsets, gather) computes TRL's definition, and
completions become token ids, which lets them end with the EOS token TRL appends.

Conventions that differ from TRL's defaults, pinned here rather than hidden: TRL appends EOS
to every completion (our toy completions have none; here EOS is an ordinary completion
token on both sides), and GRPOTrainer multiplies the KL term by the importance ratio unless
``use_bias_correction_kl=False`` (ours is the GRPO paper's plain k3 term).

Nothing is downloaded: models and tokenizers are built locally (or saved to ``tmp_path``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

from workbench.algorithms import dpo, grpo, reward_model, sft  # noqa: E402
from workbench.core.types import PolicyOutput  # noqa: E402
from workbench.models.policy import ModelConfig, Policy, RewardModel, build_model, build_reward_model, word_ids  # noqa: E402
from workbench.toy_tasks.sequence import Sequence, SequenceConfig  # noqa: E402

TASK = Sequence(SequenceConfig(vocab_size=4, length=4, n_prompts=3, seed=0))
T = TASK.completion_len
TOL = dict(rtol=1e-5, atol=1e-5)


# -- helpers ---------------------------------------------------------------------------------


def trl_args(out_dir, **kw) -> dict:
    """Arguments every TRL config needs to run offline on CPU, in float32, without side effects."""
    return dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )


def full_vocab(module):
    """``Policy`` / ``RewardModel`` whose action set is the whole vocabulary (completions are token ids)."""
    module.action_ids = torch.arange(len(module.tokenizer))
    return module


def action_token_ids(tokenizer, task=TASK) -> torch.Tensor:
    return torch.tensor(word_ids(tokenizer, task.action_words))


def prompt_text(tokenizer, prompt: torch.Tensor) -> str:
    """The prompt as the string TRL tokenizes: ``<bos> p1`` (our ``Policy.input_ids`` without completion)."""
    return " ".join([tokenizer.bos_token] + [TASK.prompt_words[i] for i in prompt.tolist()])


def completion_text(completion: torch.Tensor) -> str:
    return "".join(" " + TASK.action_words[i] for i in completion.tolist())


def completion_tokens(tokenizer, completion: torch.Tensor) -> list[int]:
    """Token ids of a completion as TRL sees it: the action tokens, then the EOS TRL appends."""
    return action_token_ids(tokenizer)[completion].tolist() + [tokenizer.eos_token_id]


def pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to ``(B, T)``; returns ``(ids, mask)`` with mask float 0/1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0
    return ids, mask


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert out, "no gradient reached the model"
    return out


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def varied_lengths(n: int, generator: torch.Generator) -> list[int]:
    """Completion lengths in 1..T, with at least one full-length and one short completion."""
    lengths = torch.randint(1, T + 1, (n,), generator=generator)
    lengths[0], lengths[1] = T, 1
    return lengths.tolist()


# -- DPO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradient_match_trl(loss_type, tmp_path):
    """``dpo_loss`` (hard labels) == ``DPOTrainer.compute_loss``, value and gradient, with a distinct reference."""
    beta, B = 0.1, 4
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    ref_model, _ = build_model(TASK, ModelConfig(), seed=1)  # different weights: the log-ratios are not zero
    g = torch.Generator().manual_seed(0)
    prefs = TASK.preferences(B, g, pairs="random", labels="sampled")
    # variable lengths, so that padding and the IPO length normalisation matter
    chosen = [prefs.chosen[i, :L] for i, L in enumerate(varied_lengths(B, g))]
    rejected = [prefs.rejected[i, :L] for i, L in enumerate(reversed(varied_lengths(B, g)))]
    data = datasets.Dataset.from_dict(
        {
            "prompt": [prompt_text(tok, p) for p in prefs.prompts],
            "chosen": [completion_text(c) for c in chosen],
            "rejected": [completion_text(r) for r in rejected],
        }
    )
    args = DPOConfig(**trl_args(tmp_path, per_device_train_batch_size=B), beta=beta, loss_type=loss_type)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)

    policy = full_vocab(Policy(trainer.model, tok, TASK))
    ref = full_vocab(Policy(trainer.ref_model, tok, TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    chosen_ids = [completion_tokens(tok, c) for c in chosen]
    rejected_ids = [completion_tokens(tok, r) for r in rejected]
    for i, row in enumerate(rows):  # TRL tokenised exactly our batch
        assert row["prompt_ids"] == policy.input_ids(prefs.prompts[i : i + 1])[0].tolist()
        assert row["chosen_ids"] == chosen_ids[i] and row["rejected_ids"] == rejected_ids[i]

    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    comp_c, mask_c = pad(chosen_ids, tok.pad_token_id)
    comp_r, mask_r = pad(rejected_ids, tok.pad_token_id)
    logp_c = policy(prefs.prompts, comp_c).logp
    logp_r = policy(prefs.prompts, comp_r).logp
    with torch.no_grad():
        ref_c, ref_r = ref(prefs.prompts, comp_c).logp, ref(prefs.prompts, comp_r).logp
    cfg = dpo.DPOConfig(loss_type=loss_type)
    loss, _, stats = dpo.dpo_loss(logp_c, logp_r, ref_c, ref_r, mask_c, mask_r, torch.ones(B), cfg, beta)
    assert stats["rewards/margins"] != 0.0

    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


# -- GRPO ------------------------------------------------------------------------------------

G = 4  # completions per prompt


def reward_from_column(completions, reward, **kwargs):
    """GRPO reward function returning the dataset's ``reward`` column: rewards known whatever is generated."""
    return [float(r) for r in reward]


@pytest.fixture(scope="module")
def grpo_model_dir(tmp_path_factory):
    """The tiny policy saved as a local checkpoint: GRPOTrainer with beta > 0 rebuilds its reference from the path."""
    path = tmp_path_factory.mktemp("grpo_model")
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def grpo_trainer(model_dir, out_dir, **kw):
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    data = datasets.Dataset.from_dict({"prompt": [prompt_text(tok, TASK.eval_prompts()[0])] * G, "reward": [0.0] * G})
    args = GRPOConfig(
        **trl_args(out_dir, per_device_train_batch_size=G), num_generations=G, max_completion_length=T, **kw
    )
    return GRPOTrainer(
        model=str(model_dir), reward_funcs=reward_from_column, args=args, train_dataset=data, processing_class=tok
    ), tok


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale, grpo_model_dir, tmp_path):
    """``grpo_advantages`` == the advantages ``GRPOTrainer._generate_and_score_completions`` computes from the rewards.

    The reward function returns a fixed column, so TRL generates (randomly) but scores with
    exactly our rewards; one group has equal rewards (zero std: advantage 0, not NaN).
    """
    trainer, tok = grpo_trainer(grpo_model_dir, tmp_path, scale_rewards=scale)
    trainer.model.train()  # the training path: groups of num_generations (eval would use num_generations_eval)
    g = torch.Generator().manual_seed(1)
    prompts = TASK.eval_prompts().repeat_interleave(G, dim=0)  # (3G, 1), G rows per prompt
    rewards = TASK.reward(prompts, TASK.random_completions(len(prompts), g))
    rewards[-G:] = 0.5  # a group without spread
    rewards[:G] = torch.tensor([0.0, 0.25, 0.25, 1.0])  # a group with spread, whatever the draw
    rows = [{"prompt": prompt_text(tok, p), "reward": float(r)} for p, r in zip(prompts, rewards, strict=True)]

    with torch.no_grad():
        out = trainer._generate_and_score_completions(rows)
    ours = grpo.grpo_advantages(rewards, G, scale, eps=grpo.GRPOConfig().eps)  # our default eps is TRL's 1e-4

    assert out["advantages"].shape == ours.shape
    torch.testing.assert_close(ours, out["advantages"].float(), **TOL)
    assert ours.abs().max() > 0


@pytest.mark.parametrize("beta, correction", [(0.0, False), (0.04, False), (0.04, True)])
@pytest.mark.parametrize(
    "aggregation, loss_type",
    [("sequence_mean", "grpo"), ("token_mean", "bnpo"), ("token_mean", "dapo"), ("constant", "dr_grpo")],
)
def test_grpo_loss_and_gradient_match_trl(aggregation, loss_type, beta, correction, grpo_model_dir, tmp_path):
    """``grpo_loss`` == ``GRPOTrainer.compute_loss`` on a prepared batch: clipped ratio, k3 KL, each aggregation.

    The batch has completions of different lengths (so the aggregations differ), ``old_logp``
    far enough from ``logp`` that both clip bounds bite, asymmetric clip bounds, and, with
    beta > 0, reference log-probs different from the policy's (k3 KL without TRL's
    importance-ratio correction, see below). Row 0 fills ``max_completion_length``, the
    divisor of "dr_grpo"; ours divides by the tensor width T, which is the same here and on
    our toy path (fixed-length completions). The model is in eval mode, so TRL applies no
    gradient-accumulation divisor (``current_gradient_accumulation_steps`` only exists
    inside ``Trainer.train``) and "dapo" divides by ``num_items_in_batch``, the batch's
    completion-token count.
    """
    eps_low, eps_high = 0.2, 0.28
    trainer, tok = grpo_trainer(
        grpo_model_dir,
        tmp_path,
        beta=beta,
        loss_type=loss_type,
        epsilon=eps_low,
        epsilon_high=eps_high,
        # TRL (1.16) defaults to multiplying the k3 KL by the importance ratio (DeepSeek-V3.2's unbiased KL
        # gradient). Ours defaults to the GRPO paper's plain ``+ beta * k3``; ``kl_ratio_correction`` is TRL's switch.
        use_bias_correction_kl=correction,
    )
    model = trainer.model.eval()
    policy = full_vocab(Policy(model, tok, TASK))

    g = torch.Generator().manual_seed(2)
    prompts = TASK.sample_prompts(2, g).repeat_interleave(G, dim=0)  # (B, 1), B = 2G
    B = len(prompts)
    comps = TASK.random_completions(B, g)
    lengths = torch.tensor(varied_lengths(B, g))
    mask = (torch.arange(T) < lengths[:, None]).float()  # (B, T); row 0 fills max_completion_length
    comp_ids = torch.where(mask.bool(), action_token_ids(tok)[comps], tok.pad_token_id)
    advantages = grpo.grpo_advantages(TASK.reward(prompts, comps) + torch.arange(B) % 3 * 0.1, G)
    with torch.no_grad():
        logp0 = policy(prompts, comp_ids).logp
    old_logp = (logp0 + 0.3 * torch.randn(B, T, generator=g)) * mask  # TRL's log-probs are 0 off the mask
    ref_logp = (logp0 + 0.5 * torch.randn(B, T, generator=g)) * mask

    inputs = {
        "prompt_ids": policy.input_ids(prompts),
        "prompt_mask": torch.ones(B, 1 + TASK.prompt_len, dtype=torch.long),
        "completion_ids": comp_ids,
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    cfg = grpo.GRPOConfig(
        aggregation=aggregation,
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        kl_estimator="k3",
        kl_ratio_correction=correction,
    )
    logp = policy(prompts, comp_ids).logp
    batch = grpo.GRPOBatch(advantages=advantages[:, None] * mask, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    loss, _, stats = grpo.grpo_loss(PolicyOutput(logp=logp, logits=None, values=None), batch, cfg, beta)
    ratio = (logp - old_logp).exp()[mask.bool()]
    assert (ratio < 1 - eps_low).any() and (ratio > 1 + eps_high).any() and stats["clip/ratio"] > 0

    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(model, loss), trl_grads)
    # the batch tells the aggregations apart, so the pairing above is really tested
    for other in {"sequence_mean", "token_mean", "constant"} - {aggregation}:
        alt_cfg = cfg.model_copy(update={"aggregation": other})
        alt, _, _ = grpo.grpo_loss(PolicyOutput(logp=logp.detach(), logits=None, values=None), batch, alt_cfg, beta)
        assert not torch.isclose(alt, loss.detach(), rtol=1e-3, atol=1e-5)


# -- SFT -------------------------------------------------------------------------------------


def test_sft_loss_matches_trl_completion_only(tmp_path):
    """``sft_loss`` == ``SFTTrainer.compute_loss``: prompt tokens masked out, mean over all completion tokens."""
    B = 4
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    g = torch.Generator().manual_seed(3)
    prompts = TASK.sample_prompts(B, g)
    demos = [d[:L] for d, L in zip(TASK.demonstrations(prompts), varied_lengths(B, g), strict=True)]
    data = datasets.Dataset.from_dict(
        {"prompt": [prompt_text(tok, p) for p in prompts], "completion": [completion_text(d) for d in demos]}
    )
    args = SFTConfig(**trl_args(tmp_path, per_device_train_batch_size=B))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.completion_only_loss

    policy = full_vocab(Policy(trainer.model, tok, TASK))
    comp_ids = [completion_tokens(tok, d) for d in demos]
    rows = [trainer.train_dataset[i] for i in range(B)]
    for i, row in enumerate(rows):  # same sequence; labels only on the completion (incl. EOS)
        prefix = policy.input_ids(prompts[i : i + 1])[0].tolist()
        assert row["input_ids"] == prefix + comp_ids[i]
        assert row["labels"] == [-100] * len(prefix) + comp_ids[i]

    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    comps, mask = pad(comp_ids, tok.pad_token_id)
    logp = policy(prompts, comps).logp
    loss, _, _ = sft.sft_loss(logp, mask, sft.SFTConfig())
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)
    seq_mean, _, _ = sft.sft_loss(logp.detach(), mask, sft.SFTConfig(aggregation="sequence_mean"))
    assert not torch.isclose(seq_mean, loss.detach(), rtol=1e-3)  # the lengths differ: token mean is what TRL does


# -- reward model ----------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_reward_model_loss_matches_trl(margin, tmp_path):
    """``reward_model_loss`` (hard labels) == ``RewardTrainer.compute_loss`` on a sequence-classification model.

    margin 0: TRL's plain Bradley-Terry loss; margin 0.5: TRL's per-example ``margin`` column,
    constant over the batch (ours is one number per config).
    """
    B = 4
    rm = build_reward_model(TASK, ModelConfig(), seed=0)
    tok = rm.tokenizer
    g = torch.Generator().manual_seed(4)
    prefs = TASK.preferences(B, g, pairs="random", labels="sampled")
    columns = {
        "prompt": [prompt_text(tok, p) for p in prefs.prompts],
        "chosen": [completion_text(c) for c in prefs.chosen],
        "rejected": [completion_text(r) for r in prefs.rejected],
    }
    if margin:
        columns["margin"] = [margin] * B
    args = RewardConfig(**trl_args(tmp_path, per_device_train_batch_size=B))
    data = datasets.Dataset.from_dict(columns)
    trainer = RewardTrainer(model=rm.model, args=args, train_dataset=data, processing_class=tok)

    ours_rm = full_vocab(RewardModel(trainer.model, tok, TASK))
    comp_c = torch.tensor([completion_tokens(tok, c) for c in prefs.chosen])  # equal lengths: no padding
    comp_r = torch.tensor([completion_tokens(tok, r) for r in prefs.rejected])
    rows = [trainer.train_dataset[i] for i in range(B)]
    for i, row in enumerate(rows):
        assert row["chosen_ids"] == ours_rm.input_ids(prefs.prompts[i : i + 1], comp_c[i : i + 1])[0].tolist()
        assert row["rejected_ids"] == ours_rm.input_ids(prefs.prompts[i : i + 1], comp_r[i : i + 1])[0].tolist()

    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    r_c, r_r = ours_rm(prefs.prompts, comp_c), ours_rm(prefs.prompts, comp_r)
    loss, _, _ = reward_model.reward_model_loss(r_c, r_r, prefs.p_chosen, reward_model.RewardModelConfig(margin=margin))
    assert torch.all(prefs.p_chosen == 1)
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


# -- padding after EOS (issue 14) -------------------------------------------------------------
#
# With ``eos = true`` a completion ends at its first EOS action and every later position is padding, written
# as the EOS action itself (``Task.canonical``); ``Task.completion_mask`` is 1 up to and including that EOS.
# TRL cuts each completion after its EOS token and right-pads the batch with ``pad_token_id`` to the batch's
# longest completion, mask 1 on the kept tokens. The task's EOS action word ``<end>`` plays TRL's EOS token
# (the tokenizer's ``eos_token``). Our tensors are always ``completion_len`` wide; TRL's are as wide as the
# longest completion of the batch, so the off-mask positions (their tokens, log-probs, widths) differ between
# the two sides and must not matter. None of these completions is truncated (each has its EOS).

EOS_TASK = Sequence(SequenceConfig(vocab_size=4, length=4, n_prompts=3, seed=0, eos=True))
T_EOS = EOS_TASK.completion_len  # max_len = length + 1
END = EOS_TASK.eos_action


def eos_tokenizer(tok):
    """The tokenizer with the task's EOS action word as its ``eos_token``: TRL's EOS is the task's EOS action."""
    tok.eos_token = EOS_TASK.action_words[END]
    return tok


def eos_completions(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(n, T_EOS)`` canonical completions of ``EOS_TASK``: ``lengths - 1`` answer symbols, the EOS, padding (EOS)."""
    symbols = torch.randint(0, END, (len(lengths), T_EOS), generator=generator)
    comps = torch.where(torch.arange(T_EOS) < lengths[:, None] - 1, symbols, END)
    assert torch.equal(comps, EOS_TASK.canonical(comps)) and torch.equal(EOS_TASK.lengths(comps), lengths)
    return comps


def eos_counted(completion: torch.Tensor) -> list[int]:
    """Task indices of a completion's counted tokens (the answer and its EOS): what TRL keeps."""
    return completion[: int(EOS_TASK.lengths(completion[None])[0])].tolist()


def eos_text(completion: torch.Tensor) -> str:
    """The counted tokens as text, ending with the EOS word (so TRL appends no second EOS)."""
    return "".join(" " + EOS_TASK.action_words[i] for i in eos_counted(completion))


def eos_token_ids(tokenizer, completion: torch.Tensor) -> list[int]:
    return action_token_ids(tokenizer, EOS_TASK)[eos_counted(completion)].tolist()


def test_dpo_loss_with_padding_after_eos_matches_trl(tmp_path):
    """``dpo_loss`` on ``EOS_TASK`` tensors (EOS-padded to max_len, masks from ``completion_mask``) ==
    ``DPOTrainer.compute_loss`` on the same pairs cut after their EOS and padded by TRL's collator.

    Chosen and rejected have different lengths, within and across pairs; TRL's loss is on the masked sums of
    the chosen and rejected token log-probs, ours on ``(logp - ref_logp) * mask`` summed over the row.
    """
    beta, B = 0.1, 4
    model, tok = build_model(EOS_TASK, ModelConfig(), seed=0)
    ref_model, _ = build_model(EOS_TASK, ModelConfig(), seed=1)
    tok = eos_tokenizer(tok)
    g = torch.Generator().manual_seed(6)
    prompts = EOS_TASK.sample_prompts(B, g)
    chosen = eos_completions(torch.tensor([T_EOS, 1, 3, 2]), g)
    rejected = eos_completions(torch.tensor([2, T_EOS, 1, 4]), g)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [prompt_text(tok, p) for p in prompts],
            "chosen": [eos_text(c) for c in chosen],
            "rejected": [eos_text(r) for r in rejected],
        }
    )
    args = DPOConfig(**trl_args(tmp_path, per_device_train_batch_size=B), beta=beta)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)

    policy = full_vocab(Policy(trainer.model, tok, EOS_TASK))
    ref = full_vocab(Policy(trainer.ref_model, tok, EOS_TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    for i, row in enumerate(rows):  # TRL kept exactly the counted tokens, ending with the EOS action's token
        assert row["chosen_ids"] == eos_token_ids(tok, chosen[i]) and row["rejected_ids"] == eos_token_ids(
            tok, rejected[i]
        )
    collated = trainer.data_collator(rows)
    trl_loss = trainer.compute_loss(trainer.model, collated)
    trl_grads = grads_of(trainer.model, trl_loss)

    ids = action_token_ids(tok, EOS_TASK)
    comp_c, comp_r = ids[chosen], ids[rejected]  # (B, T_EOS), padded with the EOS action's token
    mask_c, mask_r = EOS_TASK.completion_mask(chosen), EOS_TASK.completion_mask(rejected)
    logp_c, logp_r = policy(prompts, comp_c).logp, policy(prompts, comp_r).logp
    with torch.no_grad():
        ref_c, ref_r = ref(prompts, comp_c).logp, ref(prompts, comp_r).logp
    loss, _, stats = dpo.dpo_loss(
        logp_c, logp_r, ref_c, ref_r, mask_c, mask_r, torch.ones(B), dpo.DPOConfig(loss_type="sigmoid"), beta
    )
    assert stats["rewards/margins"] != 0.0
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)
    # the EOS padding carries log-ratios far above the tolerance: only the masks keep them out of the loss
    pad_c = ((logp_c - ref_c).detach() * (1 - mask_c)).sum(-1)
    pad_r = ((logp_r - ref_r).detach() * (1 - mask_r)).sum(-1)
    assert (pad_c - pad_r).abs().max() > 1e-2


def test_sft_loss_with_padding_after_eos_matches_trl(tmp_path):
    """``sft_loss`` on ``EOS_TASK`` demonstrations (EOS-padded, mask from ``completion_mask``) ==
    ``SFTTrainer.compute_loss`` with its completion-only loss: the token mean over the completion tokens
    TRL keeps (the answer and its EOS), TRL's padding labelled -100.
    """
    B = 6
    model, tok = build_model(EOS_TASK, ModelConfig(), seed=0)
    tok = eos_tokenizer(tok)
    prompts = EOS_TASK.eval_prompts().repeat(2, 1)  # (B, Tp): every target, whose lengths l(i) differ
    demos = EOS_TASK.demonstrations(prompts)
    mask = EOS_TASK.completion_mask(demos)
    assert len(set(mask.sum(-1).tolist())) > 1, "the demonstrations should have different lengths"
    data = datasets.Dataset.from_dict(
        {"prompt": [prompt_text(tok, p) for p in prompts], "completion": [eos_text(d) for d in demos]}
    )
    args = SFTConfig(**trl_args(tmp_path, per_device_train_batch_size=B))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.completion_only_loss

    policy = full_vocab(Policy(trainer.model, tok, EOS_TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    for i, row in enumerate(rows):
        prefix = policy.input_ids(prompts[i : i + 1])[0].tolist()
        assert row["input_ids"] == prefix + eos_token_ids(tok, demos[i])
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    logp = policy(prompts, action_token_ids(tok, EOS_TASK)[demos]).logp  # (B, T_EOS), EOS-padded
    loss, _, _ = sft.sft_loss(logp, mask, sft.SFTConfig())
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)
    for other in ("sequence_mean", "constant"):  # the lengths differ: these are not what TRL computes
        alt, _, _ = sft.sft_loss(logp.detach(), mask, sft.SFTConfig(aggregation=other))
        assert not torch.isclose(alt, loss.detach(), rtol=1e-3)


@pytest.fixture(scope="module")
def grpo_eos_model_dir(tmp_path_factory):
    """The tiny policy of ``EOS_TASK`` saved as a local checkpoint (GRPOTrainer rebuilds the reference from it)."""
    path = tmp_path_factory.mktemp("grpo_eos_model")
    model, tok = build_model(EOS_TASK, ModelConfig(), seed=0)
    model.save_pretrained(path)
    eos_tokenizer(tok).save_pretrained(path)
    return path


def perturb_(model, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
@pytest.mark.parametrize(
    "aggregation, loss_type",
    [("sequence_mean", "grpo"), ("token_mean", "bnpo"), ("token_mean", "dapo"), ("constant", "dr_grpo")],
)
def test_grpo_loss_with_padding_after_eos_matches_trl(aggregation, loss_type, grpo_eos_model_dir, tmp_path):
    """``grpo_loss`` on an ``EOS_TASK`` rollout == ``GRPOTrainer.compute_loss`` on the batch TRL builds itself.

    TRL's own pipeline prepares its side: ``rollout_func`` (TRL's generation hook) hands it our completions cut
    after their EOS, and ``_generate_and_score_completions`` pads them, builds ``completion_mask`` and
    ``num_items_in_batch``, computes the advantages, the old log-probs (``num_iterations=2``) and the reference
    log-probs; the policy then moves (a perturbation standing in for an update) before the loss. Ours is fed
    our rollout's tensors: EOS-padded completions ``completion_len`` wide, ``mask = completion_mask``, old and
    reference log-probs from our forward passes (non-zero off the mask, where TRL has its pad tokens).

    Lengths run 1..max_len - 1, so TRL's tensors are narrower than ours (no completion fills
    ``max_completion_length``). The aggregations map to TRL's ``loss_type`` as:

    - ``sequence_mean`` = "grpo": mean over rows of each row's masked token mean;
    - ``token_mean`` = "bnpo" (divides by the batch's mask sum) and "dapo" (by ``num_items_in_batch``, the same
      count on one process outside ``Trainer.train``);
    - ``constant`` = "dr_grpo": TRL divides by B x ``max_completion_length``, a configured constant, not the
      longest completion of the batch; ours by B x the tensor width T, which on our path is always
      ``completion_len`` = TRL's ``max_completion_length`` (here larger than every completion).
    """
    beta, eps_low, eps_high = 0.04, 0.2, 0.28
    tok = AutoTokenizer.from_pretrained(grpo_eos_model_dir, local_files_only=True)
    g = torch.Generator().manual_seed(7)
    prompts = EOS_TASK.sample_prompts(2, g).repeat_interleave(G, dim=0)  # (B, Tp), B = 2G
    B = len(prompts)
    lengths = torch.randint(1, T_EOS, (B,), generator=g)
    lengths[0], lengths[1] = 1, T_EOS - 1  # an empty answer (EOS only) and the longest here, max_len - 1
    comps = eos_completions(lengths, g)
    mask = EOS_TASK.completion_mask(comps)
    rewards = EOS_TASK.reward(prompts, comps) + torch.arange(B) % 3 * 0.1

    def rollout_func(prompt_texts, trainer):  # TRL's generation replaced by our completions, cut after the EOS
        assert prompt_texts == [prompt_text(tok, p) for p in prompts]
        return {
            "prompt_ids": Policy(trainer.model, tok, EOS_TASK).input_ids(prompts).tolist(),
            "completion_ids": [eos_token_ids(tok, c) for c in comps],
            "logprobs": None,
        }

    data = datasets.Dataset.from_dict({"prompt": [prompt_text(tok, p) for p in prompts], "reward": rewards.tolist()})
    args = GRPOConfig(
        **trl_args(tmp_path, per_device_train_batch_size=G),
        num_generations=G,
        max_completion_length=T_EOS,
        num_iterations=2,  # TRL computes old_per_token_logps at generation (otherwise: the detached current ones)
        beta=beta,
        loss_type=loss_type,
        epsilon=eps_low,
        epsilon_high=eps_high,
        use_bias_correction_kl=False,
    )
    trainer = GRPOTrainer(
        model=str(grpo_eos_model_dir),
        reward_funcs=reward_from_column,
        args=args,
        train_dataset=data,
        processing_class=tok,
        rollout_func=rollout_func,
    )
    model = trainer.model
    perturb_(model, g, 0.05)  # the policy away from the reference
    policy = full_vocab(Policy(model, tok, EOS_TASK))
    ref = full_vocab(Policy(trainer.ref_model, tok, EOS_TASK))
    comp_ids = action_token_ids(tok, EOS_TASK)[comps]  # (B, T_EOS), padded with the EOS action's token
    with torch.no_grad():
        old_logp = policy(prompts, comp_ids).logp
        ref_logp = ref(prompts, comp_ids).logp

    model.train()  # the training path: groups of num_generations
    rows = [{"prompt": prompt_text(tok, p), "reward": float(r)} for p, r in zip(prompts, rewards, strict=True)]
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(rows)
    W = int(lengths.max())
    assert inputs["completion_ids"].shape == (B, W) and W < T_EOS  # TRL pads to the batch's longest
    assert torch.equal(inputs["completion_mask"].float(), mask[:, :W]) and not mask[:, W:].any()
    assert torch.equal(inputs["completion_ids"][mask[:, :W].bool()], comp_ids[:, :W][mask[:, :W].bool()])
    assert (inputs["completion_ids"][~mask[:, :W].bool()] == tok.pad_token_id).all()
    assert {"old_per_token_logps", "ref_per_token_logps"} <= inputs.keys()  # TRL's, on its own padded batch
    advantages = grpo.grpo_advantages(rewards, G)
    torch.testing.assert_close(inputs["advantages"].float(), advantages, **TOL)

    perturb_(model, g, 0.05)  # an update: the ratio pi / pi_old moves off 1
    model.eval()  # no gradient-accumulation divisor (see test_grpo_loss_and_gradient_match_trl)
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    cfg = grpo.GRPOConfig(aggregation=aggregation, clip_eps_low=eps_low, clip_eps_high=eps_high)
    logp = policy(prompts, comp_ids).logp
    batch = grpo.GRPOBatch(advantages=advantages[:, None] * mask, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    loss, _, stats = grpo.grpo_loss(PolicyOutput(logp=logp, logits=None, values=None), batch, cfg, beta)
    assert not torch.allclose((logp - old_logp)[mask.bool()], torch.zeros(()), atol=1e-3)  # rho != 1
    assert stats["kl/k3_loss"] > 0

    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(model, loss), trl_grads)
    # the padded batch tells the three aggregations apart
    losses = {}
    for how in ("sequence_mean", "token_mean", "constant"):
        alt_cfg = cfg.model_copy(update={"aggregation": how})
        losses[how], _, _ = grpo.grpo_loss(
            PolicyOutput(logp=logp.detach(), logits=None, values=None), batch, alt_cfg, beta
        )
    for a, b in [("sequence_mean", "token_mean"), ("sequence_mean", "constant"), ("token_mean", "constant")]:
        assert not torch.isclose(losses[a], losses[b], rtol=1e-3, atol=1e-6), (a, b)
