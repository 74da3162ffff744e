"""Rejection-sampling fine-tuning (``workbench.algorithms.rft``): weights and loss by hand, a short run."""

import json
import math

import pytest
import torch

from workbench.algorithms import rft, sft
from workbench.config import resolve
from workbench.core.types import PolicyOutput, Rollout
from workbench.registry import ALGORITHMS
from workbench.training import train


def test_best_keeps_the_top_of_each_group_and_splits_ties():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.2, 0.2, 0.2, 0.3, 0.7, 0.1, 0.0])
    w = rft.rft_weights(scores, 4, "best")
    assert w.tolist() == [0, 0.5, 0, 0.5, 0.25, 0.25, 0.25, 0.25, 0, 1, 0, 0]
    assert rft.rft_weights(scores, 4, "threshold", 0.5).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert rft.rft_weights(scores, 1, "best").tolist() == [1.0] * 12  # a group of one keeps its sample


def test_loss_is_the_weighted_token_mean_nll():
    p = torch.tensor([[0.5, 0.25], [0.1, 0.2], [0.8, 0.4]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    batch = rft.RFTBatch(weights=torch.tensor([1.0, 0.5, 0.0]), advantages=torch.zeros(3, 2), mask=mask)
    loss, per_token, stats = rft.rft_loss(PolicyOutput(p.log(), None, None), batch, rft.RFTConfig(), beta=0.1)
    want = -(math.log(0.5) + math.log(0.25) + 0.5 * math.log(0.1)) / (2 + 0.5)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["loss/rft"] == pytest.approx(want, rel=1e-6) and stats["rft/kept_fraction"] == pytest.approx(2 / 3)
    assert per_token[2].tolist() == [0.0, 0.0] and per_token[1, 1].item() == 0.0  # dropped row, masked token
    # one sample kept: the loss is SFT's NLL on it
    one = rft.RFTBatch(weights=torch.tensor([0.0, 0.0, 1.0]), advantages=torch.zeros(3, 2), mask=mask)
    sft_loss, _, _ = sft.sft_loss(p[2:].log(), mask[2:], sft.SFTConfig())
    assert rft.rft_loss(PolicyOutput(p.log(), None, None), one, rft.RFTConfig(), 0.0)[0].item() == pytest.approx(
        sft_loss.item()
    )
    # nothing kept: zero loss, no nan
    none = rft.RFTBatch(weights=torch.zeros(3), advantages=torch.zeros(3, 2), mask=mask)
    assert rft.rft_loss(PolicyOutput(p.log(), None, None), none, rft.RFTConfig(), 0.0)[0].item() == 0.0


def test_prepare_reads_the_optimised_scores_and_puts_the_weights_in_the_advantages():
    B, T = 4, 3
    roll = Rollout(
        prompts=torch.zeros(B, 1, dtype=torch.long),
        completions=torch.zeros(B, T, dtype=torch.long),
        mask=torch.ones(B, T),
        old_logp=torch.zeros(B, T),
        ref_logp=torch.zeros(B, T),
        scores=torch.tensor([0.0, 1.0, 3.0, 2.0]),
        step_rewards=torch.zeros(B, T),
        gold=torch.tensor([9.0, 9.0, 9.0, 9.0]),  # not what is optimised (a reward model's run)
        group_size=2,
    )
    batch = rft.prepare(roll, rft.RFTConfig(), beta=0.1)
    assert batch.weights.tolist() == [0, 1, 1, 0]
    assert torch.equal(batch.advantages, batch.weights[:, None].expand(B, T))
    assert ALGORITHMS["rft"] is rft.SPEC and "no KL" in rft.SPEC.regulariser(rft.RFTConfig(), 0.1)


@pytest.mark.parametrize("keep", ["best", "threshold"])
def test_a_short_run_raises_the_exact_reward(keep, tmp_path):
    sets = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "steps": 15, "eval_every": 15, "lr": 1e-2}
    sets.update({"batch_size": 32, "group_size": 4, "save_checkpoint": False, "probe_every": 0})
    res = resolve({"task": {"name": "bandit", "n_arms": 8}, "algo": {"name": "rft", "keep": keep}}, sets)
    assert train(res, tmp_path, progress=False)["status"] == "done"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/rft"]) and 0 < r["rft/kept_fraction"] <= 1 for r in rows[:-1])
    assert rows[-1]["reward/exact"] > rows[0]["reward/exact"] + 0.1
