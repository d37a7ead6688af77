"""Loss math, MLM corruption statistics and hard-negative sampling (docs/ALBEF.md §2,
docs/METHOD.md §2).

Every reference is computed by another route than the library's (``F.cross_entropy`` on an
index, float64 loops, closed forms), never by calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import itc_loss, itm_loss, mlm_loss, soft_cross_entropy, soft_targets
from model.negatives import negative_weights, sample_hard_negatives
from model.text_masking import IGNORE, SpecialIds, mask_tokens

# ------------------------------------------------------------------------------------ ITC


def _one_hot_diag(b: int, c: int) -> torch.Tensor:
    y = torch.zeros(b, c)
    y[torch.arange(b), torch.arange(b)] = 1.0
    return y


def test_soft_ce_with_one_hot_targets_is_cross_entropy_on_the_diagonal() -> None:
    logits = torch.randn(6, 6 + 20) * 3
    ref = F.cross_entropy(logits, torch.arange(6))
    torch.testing.assert_close(soft_cross_entropy(logits, _one_hot_diag(6, 26)), ref)


def test_itc_is_symmetric_mean_of_both_directions() -> None:
    b, c = 5, 5 + 12
    s_i2t, s_t2i = torch.randn(b, c), torch.randn(b, c)
    y = _one_hot_diag(b, c)
    ref = (F.cross_entropy(s_i2t, torch.arange(b)) + F.cross_entropy(s_t2i, torch.arange(b))) / 2
    torch.testing.assert_close(itc_loss(s_i2t, s_t2i, y, y), ref)
    # exchanging the two directions changes nothing
    torch.testing.assert_close(itc_loss(s_t2i, s_i2t, y, y), itc_loss(s_i2t, s_t2i, y, y))


def test_itc_limits_separated_pairs_and_uniform_logits() -> None:
    b = 8
    y = _one_hot_diag(b, b)
    separated = torch.eye(b) * 100.0  # unit features, tiny temperature: near-perfect pairs
    assert itc_loss(separated, separated, y, y).item() < 1e-6
    uniform = torch.zeros(b, b + 24)
    yq = _one_hot_diag(b, b + 24)
    torch.testing.assert_close(itc_loss(uniform, uniform, yq, yq),
                               torch.tensor(math.log(b + 24)))


def test_distilled_targets_rows_sum_to_one_and_interpolate() -> None:
    teacher = torch.randn(4, 10) * 5
    hard = _one_hot_diag(4, 10)
    for alpha in (0.0, 0.4, 1.0):
        q = soft_targets(teacher, hard, alpha)
        torch.testing.assert_close(q.sum(1), torch.ones(4))
        assert (q >= 0).all()
    torch.testing.assert_close(soft_targets(teacher, hard, 0.0), hard)
    ref = torch.exp(teacher) / torch.exp(teacher).sum(1, keepdim=True)
    torch.testing.assert_close(soft_targets(teacher, hard, 1.0), ref)
    # retrieval: several positives per row, normalised
    multi = torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 0, 1, 0]] * 4)
    multi = multi / multi.sum(1, keepdim=True)
    torch.testing.assert_close(soft_targets(teacher, multi, 0.4).sum(1), torch.ones(4))


def test_distilled_itc_matches_float64_loop() -> None:
    b, c, alpha = 3, 7, 0.4
    s, t = torch.randn(b, c), torch.randn(b, c)
    loss = soft_cross_entropy(s, soft_targets(t, _one_hot_diag(b, c), alpha))
    total = 0.0
    for i in range(b):
        zs = [math.exp(float(x)) for x in s[i]]
        zt = [math.exp(float(x)) for x in t[i]]
        for j in range(c):
            q = alpha * zt[j] / sum(zt) + (1 - alpha) * (1.0 if i == j else 0.0)
            total -= q * math.log(zs[j] / sum(zs))
    assert loss.item() == pytest.approx(total / b, rel=1e-5)


def test_focal_gamma_zero_is_bit_identical_to_plain_soft_ce() -> None:
    s_i2t, s_t2i = torch.randn(6, 30) * 4, torch.randn(6, 30) * 4
    q_i2t = soft_targets(torch.randn(6, 30), _one_hot_diag(6, 30), 0.4)
    q_t2i = soft_targets(torch.randn(6, 30), _one_hot_diag(6, 30), 0.4)

    def plain(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    ref = (plain(s_i2t, q_i2t) + plain(s_t2i, q_t2i)) / 2
    for detach in (False, True):
        assert torch.equal(itc_loss(s_i2t, s_t2i, q_i2t, q_t2i, 0.0, detach), ref)
        assert torch.equal(soft_cross_entropy(s_i2t, q_i2t, 0.0, detach), plain(s_i2t, q_i2t))


def test_focal_matches_float64_formula() -> None:
    logits = torch.randn(3, 9) * 2
    q = soft_targets(torch.randn(3, 9), _one_hot_diag(3, 9), 0.4)
    gamma = 2.0
    total = 0.0
    for i in range(3):
        z = [math.exp(float(x)) for x in logits[i]]
        for j in range(9):
            p = z[j] / sum(z)
            total -= float(q[i, j]) * (1 - p) ** gamma * math.log(p)
    assert soft_cross_entropy(logits, q, gamma).item() == pytest.approx(total / 3, rel=1e-5)


def test_focal_down_weights_easy_pairs_more_than_hard_ones() -> None:
    # Row 0: an easy pair (positive logit far above the negatives); row 1: a hard one.
    easy = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    hard = torch.tensor([[0.5, 0.4, 0.3, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for gamma in (1.0, 2.0, 5.0):
        ratio_easy = soft_cross_entropy(easy, y, gamma) / soft_cross_entropy(easy, y)
        ratio_hard = soft_cross_entropy(hard, y, gamma) / soft_cross_entropy(hard, y)
        assert ratio_easy < ratio_hard < 1.0
        assert ratio_easy < 1e-2  # (1 - p)^gamma with p ~ 0.999
    # the easy pair's share of the batch loss shrinks
    both = torch.cat([easy, hard])
    yy = torch.cat([y, y])
    per_row_plain = [soft_cross_entropy(r[None], y).item() for r in both]
    per_row_focal = [soft_cross_entropy(r[None], y, 2.0).item() for r in both]
    share = lambda rows: rows[0] / sum(rows)  # noqa: E731
    assert share(per_row_focal) < share(per_row_plain)
    torch.testing.assert_close(soft_cross_entropy(both, yy, 2.0),
                               torch.tensor(sum(per_row_focal) / 2))


def test_focal_gradient_flows_and_passes_gradcheck() -> None:
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    q = soft_targets(torch.randn(3, 6, dtype=torch.float64),
                     _one_hot_diag(3, 6).double(), 0.4)
    assert torch.autograd.gradcheck(lambda x: soft_cross_entropy(x, q, 2.0), (logits,))
    loss = soft_cross_entropy(logits, q, 2.0)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    # detaching the modulating factor changes the gradient, not the value
    logits2 = logits.detach().clone().requires_grad_(True)
    loss2 = soft_cross_entropy(logits2, q, 2.0, detach_modulation=True)
    loss2.backward()
    assert torch.equal(loss.detach(), loss2.detach())
    assert not torch.allclose(logits.grad, logits2.grad)


# ------------------------------------------------------------------------------------ ITM


def test_itm_label_layout_positives_then_negatives() -> None:
    b = 4
    pos, neg = torch.randn(b, 2), torch.randn(2 * b, 2)
    labels = torch.tensor([1] * b + [0] * 2 * b)
    torch.testing.assert_close(itm_loss(pos, neg), F.cross_entropy(torch.cat([pos, neg]), labels))
    extra = torch.randn(b, 2)
    labels3 = torch.tensor([1] * b + [0] * 2 * b + [1] * b)
    torch.testing.assert_close(itm_loss(pos, neg, extra),
                               F.cross_entropy(torch.cat([pos, neg, extra]), labels3))
    # confident and right -> ~0; the same logits with the roles swapped -> large
    good_pos, good_neg = torch.tensor([[-20.0, 20.0]] * b), torch.tensor([[20.0, -20.0]] * 2 * b)
    assert itm_loss(good_pos, good_neg).item() < 1e-6
    assert itm_loss(good_neg[:b], good_pos.repeat(2, 1)).item() > 10


# ------------------------------------------------------------------------------------ MLM


def test_mlm_loss_is_token_level_mean_over_the_batch() -> None:
    vocab, length = 11, 6
    logits = torch.randn(2, length, vocab) * 2
    labels = torch.full((2, length), IGNORE)
    labels[0, 2] = 3  # sample 0: one masked token
    labels[1, 1:5] = torch.tensor([1, 7, 7, 10])  # sample 1: four masked tokens
    where = labels != IGNORE
    loss = mlm_loss(logits[where], labels[where], None, 0.0)
    # reference: F.cross_entropy on the full (B*L, V) grid, ignore_index -100
    ref = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, ref)
    nll = -F.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    token_mean = nll[where].sum() / 5
    sample_mean = (nll[0][where[0]].mean() + nll[1][where[1]].mean()) / 2
    torch.testing.assert_close(loss, token_mean)
    assert not torch.allclose(loss, sample_mean, atol=1e-4)


def test_mlm_distillation_over_the_vocabulary_axis() -> None:
    vocab, alpha = 7, 0.4
    student, teacher = torch.randn(5, vocab), torch.randn(5, vocab)
    labels = torch.tensor([0, 3, 6, 2, 2])
    total = 0.0
    for m in range(5):
        zs = [math.exp(float(x)) for x in student[m]]
        zt = [math.exp(float(x)) for x in teacher[m]]
        ce = -math.log(zs[labels[m]] / sum(zs))
        kd = -sum(zt[v] / sum(zt) * math.log(zs[v] / sum(zs)) for v in range(vocab))
        total += (1 - alpha) * ce + alpha * kd
    assert mlm_loss(student, labels, teacher, alpha).item() == pytest.approx(total / 5, rel=1e-5)
    # alpha = 0 ignores the teacher entirely
    torch.testing.assert_close(mlm_loss(student, labels, teacher, 0.0),
                               F.cross_entropy(student, labels))


# ------------------------------------------------------------------------------------ masking

SPECIAL = SpecialIds(pad=0, cls=2, mask=4, vocab_size=60)


def _id_matrix(rows: int = 2000, length: int = 40, seed: int = 5) -> torch.Tensor:
    """[CLS] + words (ids 5..59, never [MASK]) + trailing [PAD]s of random lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (rows, length), generator=g)
    lengths = torch.randint(2, length + 1, (rows, 1), generator=g)
    ids = torch.where(torch.arange(length) < lengths, ids, torch.zeros_like(ids))
    ids[:, 0] = SPECIAL.cls
    return ids


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_statistics() -> None:
    ids = _id_matrix()
    masked, labels = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(0))
    selected = labels != IGNORE
    eligible = (ids != SPECIAL.pad) & (ids != SPECIAL.cls)
    n_eligible, n_sel = int(eligible.sum()), int(selected.sum())
    assert _within(n_sel, n_eligible, 0.15)
    assert not (selected & ~eligible).any()  # never [PAD] or [CLS]
    # labels: the original id where selected, -100 exactly elsewhere
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == IGNORE).all()
    assert torch.equal(masked[~selected], ids[~selected])
    # of the selected: 80% [MASK], 10% random id (any of V, so it may hit [MASK] or the
    # original id), 10% unchanged
    v = SPECIAL.vocab_size
    sel_masked, sel_orig = masked[selected], ids[selected]
    n_mask = int((sel_masked == SPECIAL.mask).sum())
    n_same = int((sel_masked == sel_orig).sum())
    n_other = n_sel - n_mask - n_same
    assert _within(n_mask, n_sel, 0.8 + 0.1 / v)
    assert _within(n_same, n_sel, 0.1 + 0.1 / v)
    assert _within(n_other, n_sel, 0.1 * (v - 2) / v)


def test_mask_tokens_random_ids_span_the_whole_vocabulary() -> None:
    ids = _id_matrix(rows=4000)
    masked, labels = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(1))
    replaced = (labels != IGNORE) & (masked != ids) & (masked != SPECIAL.mask)
    values = set(masked[replaced].tolist())
    # every id except [MASK] (indistinguishable here) shows up, special ids included
    assert values == set(range(SPECIAL.vocab_size)) - {SPECIAL.mask}
    assert {SPECIAL.pad, SPECIAL.cls, 1, 3} <= values


def test_mask_tokens_is_deterministic_with_a_seeded_generator() -> None:
    ids = _id_matrix(rows=50)
    a = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(3))
    b = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(3))
    c = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the global RNG is not consumed
    state = torch.get_rng_state()
    mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------ negatives


def test_negative_weights_softmax_with_positives_zeroed() -> None:
    sim = torch.randn(5, 5) * 3
    w = negative_weights(sim)
    ref = torch.exp(sim) / torch.exp(sim).sum(1, keepdim=True)
    ref[torch.arange(5), torch.arange(5)] = 0.0  # not renormalised
    torch.testing.assert_close(w, ref)
    idx = torch.tensor([0, 1, 0, 2, 1])
    w_r = negative_weights(sim, idx)
    same = idx[:, None] == idx[None, :]
    assert (w_r[same] == 0).all()
    torch.testing.assert_close(w_r[~same], (torch.exp(sim) / torch.exp(sim).sum(1, True))[~same])


def test_hard_negatives_never_pick_the_positive() -> None:
    g = torch.Generator().manual_seed(0)
    b = 6
    for _ in range(300):
        # near-diagonal logits: the positive carries almost all softmax mass
        sim = torch.randn(b, b) + torch.eye(b) * 8
        neg_img, neg_txt = sample_hard_negatives(sim, sim.T.contiguous(), g)
        assert (neg_img != torch.arange(b)).all() and (neg_txt != torch.arange(b)).all()


def test_hard_negatives_retrieval_never_pick_the_same_image() -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([3, 3, 7, 7, 7, 9, 11, 3])
    for _ in range(300):
        sim = torch.randn(8, 8) * 4 + (idx[:, None] == idx[None, :]).float() * 8
        neg_img, neg_txt = sample_hard_negatives(sim, sim.T.contiguous(), g, idx)
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()


def test_hard_negatives_raise_when_a_row_has_no_candidate() -> None:
    idx = torch.tensor([1, 1, 1, 1])
    with pytest.raises(ValueError, match="no valid negative"):
        sample_hard_negatives(torch.randn(4, 4), torch.randn(4, 4), None, idx)


def test_hard_negatives_follow_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    b, draws = 4, 3000
    sim = torch.zeros(b, b)
    sim[0, 2] = 6.0  # row 0: one dominant candidate
    sim[1] = torch.tensor([0.0, 0.0, 1.0, 2.0])  # row 1: graded weights
    counts = torch.zeros(b, b)
    for _ in range(draws):
        _, neg_txt = sample_hard_negatives(sim, sim, g)  # neg_txt is drawn from sim (i2t)
        counts[torch.arange(b), neg_txt] += 1
    expected = torch.exp(sim)
    expected.fill_diagonal_(0.0)
    expected = expected / expected.sum(1, keepdim=True)
    assert counts[0, 2] / draws > 0.95
    for i in range(b):
        for j in range(b):
            p = float(expected[i, j])
            assert _within(int(counts[i, j]), draws, p), (i, j, counts[i, j], p)


def test_hard_negatives_draw_t2i_first_then_i2t() -> None:
    sim_i2t, sim_t2i = torch.randn(5, 5) * 2, torch.randn(5, 5) * 2
    neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i,
                                             torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)

    def weights(sim: torch.Tensor) -> torch.Tensor:
        w = torch.exp(sim) / torch.exp(sim).sum(1, keepdim=True)
        return w * (1 - torch.eye(5))

    ref_img = torch.multinomial(weights(sim_t2i), 1, generator=g).squeeze(1)
    ref_txt = torch.multinomial(weights(sim_i2t), 1, generator=g).squeeze(1)
    assert torch.equal(neg_img, ref_img) and torch.equal(neg_txt, ref_txt)
