"""KTO, SimPO, ORPO and cDPO against TRL 1.16's own trainers, on the same tiny model and batch.

As ``tests/test_trl_parity.py`` (whose helpers this file reuses): the real trainer prepares the
data (tokenisation, EOS, collation, KTO's mismatched pairs) and its own ``compute_loss`` gives the
loss; our function, fed the same batch through our ``Policy`` widened to the whole vocabulary,
must give the same value and the same gradient w.r.t. every parameter, at 1e-5 in float32.

    kto   -> trl.KTOTrainer (stable API; trl.experimental.kto re-exports it, deprecated)
    simpo -> trl.experimental.cpo.CPOTrainer, loss_type "simpo", cpo_alpha 0 (no NLL term)
    orpo  -> trl.experimental.orpo.ORPOTrainer
    cDPO  -> trl.DPOTrainer, loss_type "sigmoid", label_smoothing eps

Pinned conventions: TRL appends EOS to every completion (an ordinary completion token here, as in
the DPO test); ORPOTrainer's NLL term also counts the prompt tokens after BOS (ours, by default,
the completion only, as the ORPO paper): the test passes ``orpo_loss`` TRL's tokens through
``sft_logp``/``sft_mask``, read by our policy with the prompt word as the first completion token.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_trl_parity import (  # noqa: E402
    TASK,
    TOL,
    assert_same_grads,
    completion_text,
    completion_tokens,
    full_vocab,
    grads_of,
    pad,
    prompt_text,
    trl_args,
    varied_lengths,
)
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from workbench.algorithms import dpo, kto, orpo, simpo  # noqa: E402
from workbench.models.policy import ModelConfig, Policy, build_model  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # experimental-API warnings
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


def preference_batch(B: int, seed: int = 0):
    """B sampled-label pairs with completions of varied lengths (prompts, chosen list, rejected list)."""
    g = torch.Generator().manual_seed(seed)
    prefs = TASK.preferences(B, g, pairs="random", labels="sampled")
    chosen = [prefs.chosen[i, :L] for i, L in enumerate(varied_lengths(B, g))]
    rejected = [prefs.rejected[i, :L] for i, L in enumerate(reversed(varied_lengths(B, g)))]
    return prefs.prompts, chosen, rejected


def pair_dataset(tok, prompts, chosen, rejected):
    return datasets.Dataset.from_dict(
        {
            "prompt": [prompt_text(tok, p) for p in prompts],
            "chosen": [completion_text(c) for c in chosen],
            "rejected": [completion_text(r) for r in rejected],
        }
    )


def padded(tok, comps):
    return pad([completion_tokens(tok, c) for c in comps], tok.pad_token_id)  # (B, T+1) ids, mask


# -- KTO -------------------------------------------------------------------------------------


def kto_parity(seeds, weights, tmp_path) -> float:
    """Assert ``kto.forward`` + ``kto.loss`` == ``KTOTrainer.compute_loss`` (value, gradient, z_ref); return z_ref."""
    beta, B = 0.1, 6
    model, tok = build_model(TASK, ModelConfig(), seed=seeds[0])
    ref_model, _ = build_model(TASK, ModelConfig(), seed=seeds[1])
    prompts, chosen, rejected = preference_batch(B // 2)
    rows_p = torch.cat([prompts, prompts])[torch.tensor([0, 3, 1, 4, 2, 5])]  # interleaved, as kto's dataset
    comps = [c for pair in zip(chosen, rejected, strict=True) for c in pair]
    labels = [True, False] * (B // 2)
    data = datasets.Dataset.from_dict(
        {
            "prompt": [prompt_text(tok, p) for p in rows_p],
            "completion": [completion_text(c) for c in comps],
            "label": labels,
        }
    )
    args = KTOConfig(
        **trl_args(tmp_path, per_device_train_batch_size=B),
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)
    policy = full_vocab(Policy(trainer.model, tok, TASK))
    ref = full_vocab(Policy(trainer.ref_model, tok, TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    ids = [completion_tokens(tok, c) for c in comps]
    for i, row in enumerate(rows):  # TRL tokenised our rows, and its KL rows are the batch rotated by one
        assert row["prompt_ids"] == policy.input_ids(rows_p[i : i + 1])[0].tolist()
        assert row["completion_ids"] == ids[i]
        assert row["KL_completion_ids"] == ids[i - 1]

    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_kl = trainer._metrics["train"]["kl"][-1]
    trl_grads = grads_of(trainer.model, trl_loss)

    comp_ids, mask = pad(ids, tok.pad_token_id)
    batch = {"prompts": rows_p, "completions": comp_ids, "mask": mask, "desirable": torch.tensor(labels).float()}
    cfg = kto.KTOConfig(desirable_weight=weights[0], undesirable_weight=weights[1])
    loss, _, stats = kto.loss(kto.forward(policy, ref, batch), batch, cfg, beta)

    assert stats["kto/kl"] == pytest.approx(trl_kl, abs=1e-6)
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)
    return stats["kto/kl"]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.7)])
def test_kto_loss_and_gradient_match_trl(weights, tmp_path):
    """``kto.forward`` + ``kto.loss`` == ``KTOTrainer.compute_loss``: z_ref from TRL's own mismatched rows.

    Mixed desirable/undesirable rows of varied lengths, a distinct reference model; the two seed
    orders give one batch whose z_ref is positive and one where TRL's clamp at 0 acts.
    """
    zs = [kto_parity(s, weights, tmp_path / f"{s[0]}{s[1]}") for s in ((0, 1), (1, 0))]
    assert min(zs) == 0.0 < max(zs)


# -- SimPO -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 0.0), (0.7, 1.3)])
def test_simpo_loss_and_gradient_match_trl(beta, gamma, tmp_path):
    """``simpo_loss`` (hard labels) == ``CPOTrainer.compute_loss`` with loss_type 'simpo' and cpo_alpha 0."""
    B = 4
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    prompts, chosen, rejected = preference_batch(B)
    args = CPOConfig(
        **trl_args(tmp_path, per_device_train_batch_size=B),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
    )
    trainer = CPOTrainer(
        model=model, args=args, train_dataset=pair_dataset(tok, prompts, chosen, rejected), processing_class=tok
    )
    policy = full_vocab(Policy(trainer.model, tok, TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    comp_c, mask_c = padded(tok, chosen)
    comp_r, mask_r = padded(tok, rejected)
    for i, row in enumerate(rows):  # TRL tokenised exactly our batch
        p = policy.input_ids(prompts[i : i + 1])[0].tolist()
        assert row["chosen_input_ids"] == p + completion_tokens(tok, chosen[i])
        assert row["rejected_input_ids"] == p + completion_tokens(tok, rejected[i])

    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    cfg = simpo.SimPOConfig(beta=beta, gamma=gamma)
    loss, _, stats = simpo.simpo_loss(
        policy(prompts, comp_c).logp, policy(prompts, comp_r).logp, mask_c, mask_r, torch.ones(B), cfg
    )
    assert stats["rewards/margins"] != 0.0
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


# -- ORPO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_and_gradient_match_trl(lam, tmp_path):
    """``orpo_loss`` (hard labels) == ``ORPOTrainer.compute_loss``, its NLL over the prompt tokens too."""
    B = 4
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    prompts, chosen, rejected = preference_batch(B)
    args = ORPOConfig(**trl_args(tmp_path, per_device_train_batch_size=B), beta=lam)
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=pair_dataset(tok, prompts, chosen, rejected), processing_class=tok
    )
    policy = full_vocab(Policy(trainer.model, tok, TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    comp_c, mask_c = padded(tok, chosen)
    comp_r, mask_r = padded(tok, rejected)
    for i, row in enumerate(rows):
        p = policy.input_ids(prompts[i : i + 1])[0].tolist()
        assert row["chosen_input_ids"] == p + completion_tokens(tok, chosen[i])

    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    # TRL's NLL tokens: the prompt word(s) after BOS, then the completion: our policy with an empty prompt
    prompt_words = policy.prompt_ids[prompts]  # (B, Tp) token ids
    full_c = torch.cat([prompt_words, comp_c], dim=-1)
    full_mask = torch.cat([torch.ones_like(prompt_words, dtype=mask_c.dtype), mask_c], dim=-1)
    empty = prompts[:, :0]
    sft_logp_c = policy(empty, full_c).logp
    cfg = orpo.ORPOConfig(lam=lam)
    loss, _, stats = orpo.orpo_loss(
        policy(prompts, comp_c).logp,
        policy(prompts, comp_r).logp,
        mask_c,
        mask_r,
        torch.ones(B),
        cfg,
        sft_logp=(sft_logp_c, torch.zeros_like(sft_logp_c)),
        sft_mask=(full_mask, torch.zeros_like(full_mask)),
    )
    assert stats["orpo/log_odds_ratio"] != 0.0
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


# -- cDPO and robust DPO -----------------------------------------------------------------------


def dpo_trainer(tmp_path, B, **kw):
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    ref_model, _ = build_model(TASK, ModelConfig(), seed=1)
    prompts, chosen, rejected = preference_batch(B)
    args = DPOConfig(**trl_args(tmp_path, per_device_train_batch_size=B), beta=0.1, **kw)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=pair_dataset(tok, prompts, chosen, rejected),
        processing_class=tok,
    )
    policy = full_vocab(Policy(trainer.model, tok, TASK))
    ref = full_vocab(Policy(trainer.ref_model, tok, TASK))
    comp_c, mask_c = padded(tok, chosen)
    comp_r, mask_r = padded(tok, rejected)
    with torch.no_grad():
        ref_c, ref_r = ref(prompts, comp_c).logp, ref(prompts, comp_r).logp
    ours = (policy(prompts, comp_c).logp, policy(prompts, comp_r).logp, ref_c, ref_r, mask_c, mask_r, torch.ones(B))
    rows = [trainer.train_dataset[i] for i in range(B)]
    return trainer, trainer.compute_loss(trainer.model, trainer.data_collator(rows)), ours


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_dpo_matches_trl(eps, tmp_path):
    """``dpo_loss`` loss_type 'robust' == ``DPOTrainer`` loss_type 'robust' with label_smoothing eps."""
    trainer, trl_loss, ours = dpo_trainer(tmp_path, 4, loss_type="robust", label_smoothing=eps)
    trl_grads = grads_of(trainer.model, trl_loss)
    loss, _, _ = dpo.dpo_loss(*ours, dpo.DPOConfig(loss_type="robust", label_smoothing=eps), 0.1)
    plain, _, _ = dpo.dpo_loss(*ours, dpo.DPOConfig(), 0.1)
    assert abs(loss.item() - plain.item()) > 1e-3  # the correction acts on this batch
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


def test_trl_dpo_sigmoid_ignores_label_smoothing(tmp_path):
    """TRL 1.16's DPOTrainer applies label_smoothing to 'robust', 'exo_pair' and 'aot' only: its 'sigmoid' loss
    with label_smoothing 0.2 is plain DPO. So cDPO has no DPOTrainer counterpart (the TRL backend refuses it) and
    its formula is checked against CPOTrainer's smoothed sigmoid below."""
    _, trl_loss, ours = dpo_trainer(tmp_path, 4, loss_type="sigmoid", label_smoothing=0.2)
    plain, _, _ = dpo.dpo_loss(*ours, dpo.DPOConfig(), 0.1)
    smoothed, _, _ = dpo.dpo_loss(*ours, dpo.DPOConfig(label_smoothing=0.2), 0.1)
    torch.testing.assert_close(plain, trl_loss.float(), **TOL)
    assert abs(smoothed.item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_label_smoothing_matches_trl_cpo_sigmoid(eps, tmp_path):
    """cDPO's smoothed loss == ``CPOTrainer`` loss_type 'sigmoid', label_smoothing eps, cpo_alpha 0: the same
    formula on h = log pi(y_c) - log pi(y_r), i.e. ``dpo_loss`` with log pi_ref = 0 (CPO has no reference)."""
    B, beta = 4, 0.5
    model, tok = build_model(TASK, ModelConfig(), seed=0)
    prompts, chosen, rejected = preference_batch(B)
    args = CPOConfig(
        **trl_args(tmp_path, per_device_train_batch_size=B),
        loss_type="sigmoid",
        cpo_alpha=0.0,
        beta=beta,
        label_smoothing=eps,
    )
    trainer = CPOTrainer(
        model=model, args=args, train_dataset=pair_dataset(tok, prompts, chosen, rejected), processing_class=tok
    )
    policy = full_vocab(Policy(trainer.model, tok, TASK))
    rows = [trainer.train_dataset[i] for i in range(B)]
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    trl_grads = grads_of(trainer.model, trl_loss)

    comp_c, mask_c = padded(tok, chosen)
    comp_r, mask_r = padded(tok, rejected)
    logp_c, logp_r = policy(prompts, comp_c).logp, policy(prompts, comp_r).logp
    zero_c, zero_r = torch.zeros_like(logp_c), torch.zeros_like(logp_r)  # log pi_ref = 0
    args = (logp_c, logp_r, zero_c, zero_r, mask_c, mask_r, torch.ones(B))
    loss, _, _ = dpo.dpo_loss(*args, dpo.DPOConfig(label_smoothing=eps), beta)
    plain, _, _ = dpo.dpo_loss(*args, dpo.DPOConfig(), beta)
    assert abs(loss.item() - plain.item()) > 1e-3
    torch.testing.assert_close(loss, trl_loss.float(), **TOL)
    assert_same_grads(grads_of(trainer.model, loss), trl_grads)


# -- the TRL backend -------------------------------------------------------------------------

BACKEND_RUNS = {  # algo, settings, the workbench names the TRL run must log
    "kto": ("kto", {}, {"loss/kto", "kto/kl", "rewards/chosen", "rewards/rejected", "grad/norm"}),
    "simpo": ("simpo", {}, {"loss/simpo", "rewards/margins", "rewards/accuracies", "grad/norm"}),
    "orpo": ("orpo", {}, {"loss/orpo", "orpo/nll", "orpo/log_odds_ratio", "rewards/margins", "grad/norm"}),
    "rdpo": ("dpo", {"algo.loss_type": "robust", "algo.label_smoothing": 0.1}, {"loss/dpo", "grad/norm"}),
}


@pytest.mark.parametrize("name", list(BACKEND_RUNS))
def test_trl_backend_trains_each_objective(name, tmp_path):
    """``backend = "trl"`` runs KTOTrainer, CPOTrainer (SimPO), ORPOTrainer and DPOTrainer (robust) on the task:
    a workbench run folder, TRL's metrics under our names, the exact evaluator at steps 0 and 3, weights moved."""
    import json

    from workbench.config import resolve
    from workbench.training import train

    algo, sets, expected = BACKEND_RUNS[name]
    tiny = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "steps": 3, "eval_every": 3, "lr": 1e-2}
    prefs = {"algo.labels": "sampled", "algo.batch_size": 8, "task.n_arms": 4}
    res = resolve({"task": {"name": "bandit"}, "algo": {"name": algo}}, {**tiny, **prefs, **sets, "backend": "trl"})
    out = tmp_path / name
    assert train(res, out, progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["samples"] == 3 * 8
    assert expected <= set().union(*rows), expected - set().union(*rows)
    assert rows[0]["kl/exact"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl/exact"] > 1e-5


def test_trl_backend_refuses_cdpo_and_soft_labels():
    from workbench.config import ConfigError, resolve

    raw = {"task": {"name": "bandit"}, "algo": {"name": "dpo", "label_smoothing": 0.1, "labels": "sampled"}}
    with pytest.raises(ConfigError, match="ignores label_smoothing"):
        resolve(raw, {"backend": "trl"})
    with pytest.raises(ConfigError, match="hard preference labels"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "kto"}}, {"backend": "trl"})
