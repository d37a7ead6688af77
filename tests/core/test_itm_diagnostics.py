"""ITM diagnostics by pair type, the negative curriculum, and their wiring into the step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.engine.optim import hardness_at
from model.engine.run_io import late_training_means
from model.losses import itm_loss, itm_pair_stats
from model.negatives import negative_weights, sample_hard_negatives
from tests.tiny import random_batch, tiny_objective

PRIOR_ENTROPY = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # 0.6365


def _prior_logits(rows: int, p_match: float) -> torch.Tensor:
    """Logits of a head that outputs p(match) = p_match for every pair."""
    return torch.log(torch.tensor([[1 - p_match, p_match]])).expand(rows, 2).clone()


def test_prior_head_gets_the_prior_loss_overall_and_per_group_cross_entropy() -> None:
    b = 6
    pos, neg = _prior_logits(b, 1 / 3), _prior_logits(2 * b, 1 / 3)
    assert itm_loss(pos, neg).item() == pytest.approx(PRIOR_ENTROPY, abs=1e-6)
    stats = itm_pair_stats(pos, neg)
    assert stats["itm/pos_loss"].item() == pytest.approx(-math.log(1 / 3), abs=1e-6)
    for group in ("neg_img", "neg_txt"):
        assert stats[f"itm/{group}_loss"].item() == pytest.approx(-math.log(2 / 3), abs=1e-6)
        assert stats[f"itm/{group}_acc"].item() == 1.0  # "no match" everywhere
    assert stats["itm/pos_acc"].item() == 0.0
    # The clean loss is ALBEF's ITM loss whenever no masked pairs are appended.
    assert stats["itm/clean_loss"].item() == pytest.approx(itm_loss(pos, neg).item(), abs=1e-6)
    assert "itm/masked_loss" not in stats and "itm/shortcut" not in stats


def test_groups_follow_the_loss_layout_and_masked_pairs_are_counted_apart() -> None:
    b = 4
    pos = torch.tensor([[0.0, 2.0]] * b)                       # all called match
    neg_img = torch.tensor([[2.0, 0.0]] * b)                   # all called no match
    neg_txt = torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])  # one mistake
    masked = torch.tensor([[0.0, 5.0]] * b)
    stats = itm_pair_stats(pos, torch.cat([neg_img, neg_txt]), masked)
    assert stats["itm/pos_acc"].item() == 1.0
    assert stats["itm/neg_img_acc"].item() == 1.0
    assert stats["itm/neg_txt_acc"].item() == 0.75
    assert stats["itm/masked_acc"].item() == 1.0
    assert stats["itm/masked_loss"].item() == pytest.approx(-math.log(torch.sigmoid(
        torch.tensor(5.0)).item()), rel=1e-5)
    assert stats["itm/shortcut"].item() == 0.0
    # Independent recomputation of the clean loss: CE over the 3B clean rows only.
    clean = torch.cat([pos, neg_img, neg_txt])
    labels = torch.tensor([1] * b + [0] * 2 * b)
    expected = torch.nn.functional.cross_entropy(clean, labels)
    assert stats["itm/clean_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_shortcut_index_is_masked_minus_clean_positive_accuracy() -> None:
    b = 4
    pos = torch.tensor([[2.0, 0.0]] * 3 + [[0.0, 2.0]])       # 1 of 4 called match
    neg = torch.tensor([[2.0, 0.0]] * 2 * b)
    masked = torch.tensor([[0.0, 2.0]] * b)                    # every masked pair "matches"
    stats = itm_pair_stats(pos, neg, masked)
    assert stats["itm/shortcut"].item() == pytest.approx(0.75)


def test_objective_step_reports_pair_stats_that_recompose_its_itm_loss() -> None:
    obj = tiny_objective("softmask.mode=gradcam")
    out = obj(random_batch(), alpha=0.4)
    s = out.stats
    for key in ("pos", "neg_img", "neg_txt", "masked"):
        assert f"itm/{key}_loss" in s and f"itm/{key}_acc" in s
    # Equal-sized groups: the ITM loss is the mean of the four group losses.
    groups = torch.stack([s[f"itm/{k}_loss"] for k in ("pos", "neg_img", "neg_txt", "masked")])
    assert out.losses["itm"].item() == pytest.approx(groups.mean().item(), rel=1e-5)
    assert not any(v.requires_grad for v in s.values())


def test_hardness_zero_draws_uniform_negatives_and_one_is_albef() -> None:
    sim = torch.tensor([[9.0, 5.0, 1.0], [0.0, 9.0, 3.0], [4.0, 2.0, 9.0]])
    uniform = negative_weights(sim, hardness=0.0)
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(uniform[off], torch.full((6,), 1 / 3))
    assert torch.equal(uniform.diagonal(), torch.zeros(3))
    assert torch.equal(negative_weights(sim, hardness=1.0), negative_weights(sim))
    # With hardness 0 the draws are uniform over the other rows: a statistical check.
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4, 4) * 20
    counts = torch.zeros(4)
    for _ in range(2000):
        neg_img, _ = sample_hard_negatives(big, big, g, hardness=0.0)
        counts += torch.bincount(neg_img[:1], minlength=4)
    assert counts[0] == 0
    assert (counts[1:] / 2000 - 1 / 3).abs().max() < 0.05


@pytest.mark.parametrize("step, expected", [(0, 0.0), (99, 0.0), (100, 0.0), (150, 0.25),
                                            (200, 0.5), (500, 0.5)])
def test_hardness_schedule_is_zero_then_linear_then_final(step: int, expected: float) -> None:
    assert hardness_at((100, 200), step, final=0.5) == pytest.approx(expected)


def test_default_curriculum_is_albef() -> None:
    assert all(hardness_at((0, 0), step) == 1.0 for step in (0, 1, 10_000))


def test_late_training_means_average_the_last_quarter_and_keep_the_latest_duplicate(
        tmp_path) -> None:
    rows = [{"kind": "train", "step": s, "itm/pos_acc": s / 100, "loss/itc": 1.0}
            for s in (20, 40, 60, 80, 100)]
    rows.append({"kind": "train", "step": 100, "itm/pos_acc": 0.5})  # re-logged after a resume
    rows.append({"kind": "eval", "step": 100, "TR@1": 3.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = late_training_means(path, "itm/", total_steps=100)
    assert means == {"itm/pos_acc": pytest.approx((0.8 + 0.5) / 2)}
