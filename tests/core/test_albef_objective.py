"""The ALBEF objective end to end on a tiny model (docs/ALBEF.md §1.3-§2, docs/ALBEF.md C4-C13).

References are recomputed from the modules' parts (ViT ``forward_features``, projections,
``F.normalize``, ``F.cross_entropy`` with an index) rather than through the objective's helpers.
Both BERT dropouts are 0 wherever features are recomputed, so forwards are deterministic.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import model.objective as objective_module
from model.momentum import FeatureQueue, ema_update, make_momentum_twin
from model.objective import Objective
from model.text_masking import IGNORE, mask_tokens
from tests.tiny import (
    BATCH,
    NO_DROPOUT,
    QUEUE,
    SPECIAL,
    perturb_student,
    random_batch,
    tiny_config,
    tiny_objective,
)


def _image_feat(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.visual_encoder.forward_features(images)
    return tokens, F.normalize(model.vision_proj(tokens[:, 0]), dim=-1)


def _text_feat(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    states = model.text_encoder(ids, mask)
    return states, F.normalize(model.text_proj(states[:, 0]), dim=-1)


def _prepared(*sets: str) -> tuple[Objective, dict[str, torch.Tensor]]:
    """A dropout-free objective whose student differs from its momentum twin, and a batch."""
    obj = tiny_objective(*NO_DROPOUT, *sets)
    perturb_student(obj)
    return obj, random_batch()


# ------------------------------------------------------------------------------------ ITC


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_against_batch_and_queue_momentum_keys(alpha: float) -> None:
    obj, batch = _prepared()
    image_queue = obj.queue.image_queue.clone()  # the queue as the step sees it
    text_queue = obj.queue.text_queue.clone()
    out = obj(batch, alpha)
    b = BATCH
    with torch.no_grad():  # the forward changed the teacher (EMA) but not the student
        temp = obj.student.temp
        _, v = _image_feat(obj.student, batch["image"])
        _, t = _text_feat(obj.student, batch["input_ids"], batch["attention_mask"])
        _, v_m = _image_feat(obj.teacher, batch["image"])
        _, t_m = _text_feat(obj.teacher, batch["input_ids"], batch["attention_mask"])
        text_keys = torch.cat([t_m.T, text_queue], dim=1)  # (d, B+K)
        image_keys = torch.cat([v_m.T, image_queue], dim=1)
        s_i2t, s_t2i = v @ text_keys / temp, t @ image_keys / temp
        target = torch.arange(b)
        if alpha == 0.0:  # plain InfoNCE on the diagonal index
            ref = (F.cross_entropy(s_i2t, target) + F.cross_entropy(s_t2i, target)) / 2
        else:
            onehot = F.one_hot(target, b + QUEUE).float()
            q_i2t = alpha * (v_m @ text_keys / temp).softmax(1) + (1 - alpha) * onehot
            q_t2i = alpha * (t_m @ image_keys / temp).softmax(1) + (1 - alpha) * onehot
            ref = -((q_i2t * s_i2t.log_softmax(1)).sum(1).mean()
                    + (q_t2i * s_t2i.log_softmax(1)).sum(1).mean()) / 2
            # distillation makes a difference here (teacher != one-hot)
            plain = (F.cross_entropy(s_i2t, target) + F.cross_entropy(s_t2i, target)) / 2
            assert not torch.allclose(ref, plain, atol=1e-4)
    torch.testing.assert_close(out.losses["itc"], ref, rtol=1e-5, atol=1e-5)


def test_itc_queue_part_of_the_logits_excludes_the_current_batch(monkeypatch) -> None:
    obj, batch = _prepared()
    seen: dict[str, torch.Tensor] = {}
    real_itc_loss = objective_module.itc_loss

    def recording_itc_loss(sim_i2t, sim_t2i, *args):
        seen["i2t"], seen["t2i"] = sim_i2t.detach().clone(), sim_t2i.detach().clone()
        return real_itc_loss(sim_i2t, sim_t2i, *args)

    monkeypatch.setattr(objective_module, "itc_loss", recording_itc_loss)
    old_text_queue = obj.queue.text_queue.clone()
    obj(batch, 0.0)
    b, temp = BATCH, obj.student.temp.detach()
    with torch.no_grad():
        _, v = _image_feat(obj.student, batch["image"])
        _, t_m = _text_feat(obj.teacher, batch["input_ids"], batch["attention_mask"])
    assert seen["i2t"].shape == (b, b + QUEUE) and seen["t2i"].shape == (b, b + QUEUE)
    # batch part = the current momentum keys; queue part = the queue *before* this step
    torch.testing.assert_close(seen["i2t"][:, :b], v @ t_m.T / temp)
    torch.testing.assert_close(seen["i2t"][:, b:], v @ old_text_queue / temp)
    # the step's own features were enqueued into columns [0, B) *after* the ITC logits
    torch.testing.assert_close(obj.queue.text_queue[:, :b], t_m.T)
    assert not torch.allclose(seen["i2t"][:, b:2 * b], seen["i2t"][:, :b], atol=1e-3)


# ------------------------------------------------------------------------------------ ITM


def test_itm_layout_hard_negatives_and_negative_text_masks() -> None:
    obj, _ = _prepared()
    b = BATCH
    lengths = [10, 9, 8, 7, 6, 5, 4, 3]  # distinct masks identify their text
    batch = random_batch(lengths=lengths)
    fusion_calls: list[tuple[torch.Tensor, ...]] = []
    itm_outputs: list[torch.Tensor] = []
    h1 = obj.student.fusion_encoder.register_forward_hook(
        lambda _m, args, _out: fusion_calls.append(tuple(a.detach().clone() for a in args[:3])))
    h2 = obj.student.itm_head.register_forward_hook(
        lambda _m, _args, out: itm_outputs.append(out.detach().clone()))
    try:
        out = obj(batch, 0.4)
    finally:
        h1.remove()
        h2.remove()
    # student fusion calls: positives (B), negatives (2B), MLM (B)
    assert [c[0].shape[0] for c in fusion_calls] == [b, 2 * b, b]
    (pos_txt, pos_mask, pos_img), (neg_txt, neg_mask, neg_img) = fusion_calls[0], fusion_calls[1]
    assert torch.equal(pos_mask, batch["attention_mask"])
    with torch.no_grad():
        tokens, _ = _image_feat(obj.student, batch["image"])
        states, _ = _text_feat(obj.student, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(pos_img, tokens)
    torch.testing.assert_close(pos_txt, states)

    def which(row: torch.Tensor, rows: torch.Tensor) -> int:
        hits = [j for j in range(rows.shape[0]) if torch.equal(row, rows[j])]
        assert len(hits) == 1
        return hits[0]

    for i in range(b):
        # rows 0..B-1: (text i, its own mask, a negative image n_i != i)
        assert torch.equal(neg_txt[i], pos_txt[i]) and torch.equal(neg_mask[i], pos_mask[i])
        assert which(neg_img[i], pos_img) != i
        # rows B..2B-1: (negative text m_i != i with *its own* mask, image i)
        m_i = which(neg_txt[b + i], pos_txt)
        assert m_i != i
        assert torch.equal(neg_mask[b + i], pos_mask[m_i])
        assert torch.equal(neg_img[b + i], pos_img[i])
    # ITM head saw [B positives; 2B negatives]; loss = mean CE with labels [1]*B + [0]*2B
    assert [o.shape[0] for o in itm_outputs] == [b, 2 * b]
    labels = torch.tensor([1] * b + [0] * 2 * b)
    torch.testing.assert_close(out.losses["itm"].detach(),
                               F.cross_entropy(torch.cat(itm_outputs), labels))


# ------------------------------------------------------------------------------------ MLM


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_matches_manual_computation(alpha: float) -> None:
    obj, batch = _prepared()
    text_inputs: list[torch.Tensor] = []
    teacher_fusion: list[tuple[torch.Tensor, ...]] = []
    hooks = [
        obj.student.text_encoder.register_forward_hook(
            lambda _m, args, _out: text_inputs.append(args[0].clone())),
        obj.teacher.fusion_encoder.register_forward_hook(
            lambda _m, args, _out: teacher_fusion.append(tuple(a.clone() for a in args[:3]))),
    ]
    try:
        out = obj(batch, alpha)
    finally:
        for h in hooks:
            h.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # the step generator's first draws are the MLM corruption (seed 0)
    masked, labels = mask_tokens(ids, SPECIAL, 0.15, torch.Generator().manual_seed(0))
    # student text encoder: clean text for ITC, then the corrupted copy for MLM (docs/ALBEF.md C5)
    assert len(text_inputs) == 2
    assert torch.equal(text_inputs[0], ids) and torch.equal(text_inputs[1], masked)
    n_masked = int((labels != IGNORE).sum())
    assert n_masked > 0
    # the teacher's MLM pass: momentum text states of the corrupted text, momentum image
    # tokens (docs/ALBEF.md C4), not the student's
    with torch.no_grad():
        assert len(teacher_fusion) == 1
        t_states, t_mask, t_image = teacher_fusion[0]
        torch.testing.assert_close(t_states, obj.teacher.text_encoder(masked, mask))
        assert torch.equal(t_mask, mask)
        torch.testing.assert_close(t_image, obj.teacher.visual_encoder.forward_features(
            batch["image"]), rtol=0, atol=0)
        assert not torch.allclose(t_image, obj.student.visual_encoder.forward_features(
            batch["image"]), atol=1e-3)
    with torch.no_grad():
        tokens, _ = _image_feat(obj.student, batch["image"])
        hidden = obj.student.fusion_encoder(obj.student.text_encoder(masked, mask), mask,
                                            tokens).hidden
        logits = obj.student.mlm_logits(hidden)  # (B, L, V): every position
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE)
        ref = ce
        if alpha > 0:  # teacher: momentum text encoder + momentum image tokens (docs/ALBEF.md C4)
            t_tokens, _ = _image_feat(obj.teacher, batch["image"])
            t_hidden = obj.teacher.fusion_encoder(obj.teacher.text_encoder(masked, mask), mask,
                                                  t_tokens).hidden
            p_t = obj.teacher.mlm_logits(t_hidden).softmax(-1)
            kd_tok = -(p_t * logits.log_softmax(-1)).sum(-1)  # (B, L)
            kd = kd_tok[labels != IGNORE].sum() / n_masked
            ref = (1 - alpha) * ce + alpha * kd
    torch.testing.assert_close(out.losses["mlm"].detach(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ EMA


def test_ema_update_rule_on_one_parameter() -> None:
    obj = tiny_objective()
    perturb_student(obj)
    name = "text_encoder.layer.0.attention.self.query.weight"
    s = dict(obj.student.named_parameters())[name].detach().clone()
    t = dict(obj.teacher.named_parameters())[name].detach().clone()
    ema_update(obj.teacher, obj.student, 0.9)
    ref = 0.9 * t.double() + 0.1 * s.double()
    new = dict(obj.teacher.named_parameters())[name].detach()
    torch.testing.assert_close(new.double(), ref, rtol=0, atol=1e-7)
    assert not torch.equal(new, t)
    # mu = 1 keeps the teacher, mu = 0 copies the student (bitwise)
    twin = copy.deepcopy(obj.teacher)
    ema_update(twin, obj.student, 1.0)
    pairs = zip(twin.parameters(), obj.teacher.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    ema_update(twin, obj.student, 0.0)
    student_params = dict(obj.student.named_parameters())
    assert all(torch.equal(p, student_params[n]) for n, p in twin.named_parameters())


def test_ema_runs_once_at_the_start_of_every_forward() -> None:
    obj, batch = _prepared()
    mu = obj.cfg.momentum
    student = {n: p.detach().clone().double() for n, p in obj.student.named_parameters()}
    expected = {n: p.detach().clone().double() for n, p in obj.teacher.named_parameters()}
    for _ in range(2):  # no optimizer step: the student stays fixed
        obj(batch, 0.4)
        for n in expected:
            expected[n] = mu * expected[n] + (1 - mu) * student[n]
        for n, p in obj.teacher.named_parameters():
            torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)
    # and before the momentum features: the enqueued features are the post-EMA teacher's
    obj.eval()
    with torch.no_grad():
        _, v_m = _image_feat(obj.teacher, batch["image"])
    torch.testing.assert_close(obj.queue.image_queue[:, BATCH:2 * BATCH], v_m.T)


def test_momentum_twin_structure_frozen_and_gradient_free() -> None:
    obj, batch = _prepared()
    assert obj.teacher.itm_head is None and obj.teacher.temp is None  # no momentum copies
    assert obj.teacher.mlm_head is not None  # the MLM head has one (docs/ALBEF.md C11)
    student_names = {n for n, _ in obj.student.named_parameters()}
    teacher_names = {n for n, _ in obj.teacher.named_parameters()}
    assert teacher_names == student_names - {"temp", "itm_head.weight", "itm_head.bias"}
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    # no parameter object is shared between student and teacher
    assert not {id(p) for p in obj.teacher.parameters()} & {id(p) for p in obj.student.parameters()}
    obj(batch, 0.4).loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())


def test_fresh_twin_equals_student() -> None:
    obj = tiny_objective()
    twin = make_momentum_twin(obj.student)
    student = dict(obj.student.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in twin.named_parameters())


CELLS = {
    "albef": (),
    "focal": ("loss.focal_gamma=2.0",),
    "softmask": ("softmask.mode=gradcam",),
    "randmask": ("softmask.mode=random",),
    "mmda": ("mmda.enabled=true",),
    "all": ("softmask.mode=gradcam", "loss.focal_gamma=2.0", "mmda.enabled=true"),
    "retrieval": ("train.mode=retrieval",),
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_every_student_parameter_gets_a_finite_gradient(cell: str) -> None:
    """timm's invariant: one backward reaches every online parameter. No parameter is
    legitimately unused in any cell (retrieval does not build the MLM head at all)."""
    obj = tiny_objective(*CELLS[cell])
    retrieval = cell == "retrieval"
    batch = random_batch(strong=cell in ("mmda", "all"),
                         image_idx=[0, 1, 2, 3, 0, 5, 6, 7] if retrieval else None)
    out = obj(batch, 0.4)
    assert set(out.losses) == ({"itc", "itm"} if retrieval else {"itc", "itm", "mlm"})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in obj.student.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in obj.student.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    assert (obj.student.mlm_head is None) == retrieval
    assert obj.student.temp.grad is not None and obj.student.temp.grad.abs() > 0


# ------------------------------------------------------------------------------------ queue


def test_feature_queue_pointer_advances_and_wraps() -> None:
    q = FeatureQueue(embed_dim=4, size=24)
    torch.testing.assert_close(q.image_queue.norm(dim=0), torch.ones(24))  # unit columns
    assert (q.idx_queue == -100).all() and q.queue_ptr.item() == 0
    for step in range(5):
        start = (step * 8) % 24
        img, txt = torch.full((8, 4), float(step)), torch.full((8, 4), -float(step))
        q.enqueue(img, txt, torch.arange(8) + 100 * step)
        assert q.queue_ptr.item() == (start + 8) % 24
        assert (q.image_queue[:, start:start + 8] == step).all()
        assert (q.text_queue[:, start:start + 8] == -step).all()
        assert torch.equal(q.idx_queue[0, start:start + 8], torch.arange(8) + 100 * step)
    with pytest.raises(ValueError, match="not divisible"):
        q.enqueue(torch.zeros(5, 4), torch.zeros(5, 4))


def test_enqueued_columns_are_the_momentum_features() -> None:
    obj, _ = _prepared()
    g = torch.Generator().manual_seed(3)
    for step in range(QUEUE // BATCH + 2):  # more steps than the queue holds: wraps once
        batch = random_batch(generator=g)
        start = obj.queue.queue_ptr.item()
        assert start == (step * BATCH) % QUEUE
        old = obj.queue.image_queue.clone()
        obj(batch, 0.4)
        assert obj.queue.queue_ptr.item() == (start + BATCH) % QUEUE
        obj.teacher.eval()
        with torch.no_grad():
            _, v_m = _image_feat(obj.teacher, batch["image"])
            _, t_m = _text_feat(obj.teacher, batch["input_ids"], batch["attention_mask"])
        obj.teacher.train()
        cols = slice(start, start + BATCH)
        torch.testing.assert_close(obj.queue.image_queue[:, cols], v_m.T)
        torch.testing.assert_close(obj.queue.text_queue[:, cols], t_m.T)
        others = torch.ones(QUEUE, dtype=torch.bool)
        others[cols] = False
        assert torch.equal(obj.queue.image_queue[:, others], old[:, others])


def test_retrieval_itc_targets_are_multi_positive_over_batch_and_queue() -> None:
    """Retrieval ITC (docs/ALBEF.md C20): positives = every batch or queue column of the same
    image."""
    obj, _ = _prepared("train.mode=retrieval")
    g = torch.Generator().manual_seed(5)
    first = [4, 9, 4, 1, 2, 3, 5, 6]
    obj(random_batch(generator=g, image_idx=first), 0.0)
    assert torch.equal(obj.queue.idx_queue[0, :BATCH], torch.tensor(first))
    assert (obj.queue.idx_queue[0, BATCH:] == -100).all()
    second = [9, 4, 7, 8, 10, 11, 12, 7]  # 9 and 4 are also in the queue now
    batch = random_batch(generator=g, image_idx=second)
    image_queue, text_queue = obj.queue.image_queue.clone(), obj.queue.text_queue.clone()
    idx_queue = obj.queue.idx_queue.clone()
    out = obj(batch, 0.0)
    with torch.no_grad():
        temp = obj.student.temp
        _, v = _image_feat(obj.student, batch["image"])
        _, t = _text_feat(obj.student, batch["input_ids"], batch["attention_mask"])
        _, v_m = _image_feat(obj.teacher, batch["image"])
        _, t_m = _text_feat(obj.teacher, batch["input_ids"], batch["attention_mask"])
        s_i2t = v @ torch.cat([t_m.T, text_queue], 1) / temp
        s_t2i = t @ torch.cat([v_m.T, image_queue], 1) / temp
    idx_all = [*second, *idx_queue[0].tolist()]
    y = torch.zeros(BATCH, BATCH + QUEUE)
    for i in range(BATCH):
        cols = [j for j, other in enumerate(idx_all) if other == second[i]]
        y[i, cols] = 1.0 / len(cols)
    assert [int(y[i].gt(0).sum()) for i in range(3)] == [2, 3, 2]  # 9: b+q, 4: b+2q, 7: 2b
    ref = -((y * s_i2t.log_softmax(1)).sum(1).mean() + (y * s_t2i.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(out.losses["itc"].detach(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(obj.queue.idx_queue[0, BATCH:2 * BATCH], torch.tensor(second))


# ------------------------------------------------------------------------------------ temp


@pytest.mark.parametrize(("start", "clamped"), [(1.0, 0.5), (1e-5, 0.001), (0.2, 0.2)])
def test_temp_is_clamped_in_pretraining(start: float, clamped: float) -> None:
    obj = tiny_objective()
    with torch.no_grad():
        obj.student.temp.fill_(start)
    out = obj(random_batch(), 0.4)
    assert obj.student.temp.item() == pytest.approx(clamped)
    assert out.stats["temp"].item() == pytest.approx(clamped)


def test_temp_is_not_clamped_in_retrieval() -> None:
    obj = tiny_objective("train.mode=retrieval", *NO_DROPOUT)
    # Identical rows make every batch similarity equal, so the hard-negative weights stay
    # uniform even at a tiny temperature (otherwise softmax / 1e-5 underflows to one-hot on
    # the positive and no negative is left to draw, as in ALBEF).
    batch = {k: v[:1].expand_as(v).clone() for k, v in random_batch().items()}
    batch["image_idx"] = torch.arange(BATCH)
    for start in (1.0, 1e-5):
        with torch.no_grad():
            obj.student.temp.fill_(start)
        obj(batch, 0.4)
        assert obj.student.temp.item() == pytest.approx(start)


def test_default_config_is_albef() -> None:
    """With no switch set, the objective's settings are ALBEF's identity values."""
    cfg = tiny_config()
    obj = tiny_objective()
    st = obj.cfg
    assert (st.softmask.mode, st.loss.focal_gamma, st.strong_image, st.masked_text) == (
        "off", 0.0, False, False)
    assert st.weights == {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    assert (st.loss.mlm_prob, st.loss.itm_label_smoothing) == (0.15, 0.0)
    assert st.momentum == cfg.model.momentum
    assert obj.student.temp.item() == pytest.approx(0.07)
    # The schema itself is ALBEF's recipe (the tiny preset shortens EMA/queue for 500 steps).
    from model.config.schema import ModelConfig, TextConfig

    albef = ModelConfig()
    assert (albef.momentum, albef.queue_size, albef.queue_warmup_steps) == (0.995, 65536, 0)
    assert TextConfig().init_std == 0.02
