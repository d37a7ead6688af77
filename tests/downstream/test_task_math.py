"""Downstream heads and losses against independent computations (SNLI-VE, NLVR2, VQA)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model.build import build_albef
from model.data.task_data import vqa_answer_weights
from model.downstream.backbone import bert_config
from model.downstream.heads import AnswerDecoder, PairFusionEncoder
from model.downstream.losses import (
    IGNORE,
    answer_targets,
    distilled_cross_entropy,
    normalise_answer,
    sequence_nll,
    ta_labels_and_pairs,
    vqa_accuracy,
    weighted_answer_loss,
)
from model.downstream.objective import ClassifyObjective, rank_answers
from model.downstream.tasks import build_task_model
from tests.tiny import IMAGE, SPECIAL, VOCAB, tiny_config

NO_DROPOUT = ("model.text.hidden_dropout=0.0", "model.text.attn_dropout=0.0")


def _albef(with_mlm: bool = False):
    cfg = tiny_config(*NO_DROPOUT)
    torch.manual_seed(0)
    model = build_albef(cfg.model, VOCAB, SPECIAL.pad, with_mlm=with_mlm).eval()
    return cfg, model


# --------------------------------------------------------------------------- classification


def test_distilled_cross_entropy_mixes_hard_and_soft_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0])
    log_p = torch.log(torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    q = torch.exp(teacher) / torch.exp(teacher).sum(1, keepdim=True)
    hard = -log_p[torch.arange(5), y].mean()
    soft = -(q * log_p).sum(1).mean()
    assert torch.allclose(distilled_cross_entropy(logits, y, None, 0.4), hard)
    assert torch.allclose(distilled_cross_entropy(logits, y, teacher, 0.0), hard)
    assert torch.allclose(distilled_cross_entropy(logits, y, teacher, 0.4),
                          0.6 * hard + 0.4 * soft)


def test_distillation_moves_the_teacher_first_and_trains_only_the_student() -> None:
    cfg, albef = _albef()
    student = build_task_model("ve", albef, bert_config(cfg, VOCAB, SPECIAL.pad))
    teacher = copy.deepcopy(student)  # the objective freezes it
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = ClassifyObjective(student, teacher, momentum=0.9).train()
    g = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(4, 3, IMAGE, IMAGE, generator=g),
             "input_ids": torch.randint(5, VOCAB, (4, 6), generator=g),
             "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    objective(batch, alpha=0.4).loss.backward()
    s_state = student.state_dict()
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before_t[name] + 0.1 * s_state[name], atol=1e-6), name
        assert p.grad is None
    assert all(p.grad is not None for p in student.parameters())


# --------------------------------------------------------------------------- NLVR2


def test_pair_fusion_duplicates_layers_and_shares_cross_attention_key_value() -> None:
    _, albef = _albef()
    fusion = albef.fusion_encoder
    pair = PairFusionEncoder.from_fusion(fusion)
    assert len(pair.layer) == 2 * len(fusion.layer)
    for i, layer in enumerate(fusion.layer):
        for j in (2 * i, 2 * i + 1):
            for k, v in layer.state_dict().items():
                assert torch.equal(pair.layer[j].state_dict()[k], v), (j, k)
        a, b = pair.layer[2 * i].crossattention.self, pair.layer[2 * i + 1].crossattention.self
        assert a.key.weight is b.key.weight and a.value.weight is b.value.weight
        assert a.query.weight is not b.query.weight
    # One optimiser step on a shared key moves both layers of the pair.
    pair.layer[0].crossattention.self.key.weight.data.add_(1.0)
    assert torch.equal(pair.layer[0].crossattention.self.key.weight,
                       pair.layer[1].crossattention.self.key.weight)


def test_pair_fusion_alternates_images_layer_by_layer() -> None:
    """Layer j reads image j % 2: recomputed with the pre-trained layers applied by hand."""
    _, albef = _albef()
    fusion = albef.fusion_encoder
    pair = PairFusionEncoder.from_fusion(fusion).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 64, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    img0, img1 = torch.randn(2, 17, 64, generator=g), torch.randn(2, 17, 64, generator=g)
    from model.bert import extended_mask

    hidden, ext = text, extended_mask(mask, text.dtype)
    for layer in fusion.layer:  # before training, each pair = the pre-trained layer twice
        hidden, _ = layer(hidden, ext, img0)
        hidden, _ = layer(hidden, ext, img1)
    with torch.no_grad():
        assert torch.allclose(pair(text, mask, img0, img1), hidden, atol=1e-5)
        assert not torch.allclose(pair(text, mask, img1, img0), hidden, atol=1e-3)


def test_text_assignment_sampling_follows_its_definition() -> None:
    b = 6
    weights = torch.rand(b, b).fill_diagonal_(0.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(400):
        first, second, labels = ta_labels_and_pairs(weights, g)
        own = torch.arange(b)
        assert torch.equal(first[labels == 0], own[labels == 0])
        assert torch.equal(second[labels == 1], own[labels == 1])
        assert not (second[labels == 0] == own[labels == 0]).any()
        assert not (first[labels == 1] == own[labels == 1]).any()
        neither = labels == 2
        assert not (first[neither] == own[neither]).any()
        assert not (second[neither] == own[neither]).any()
        assert not (first[neither] == second[neither]).any()  # two different images
        counts += torch.bincount(labels, minlength=3)
    share = counts / counts.sum()
    assert torch.allclose(share, torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.03)


# --------------------------------------------------------------------------- VQA decoder


def test_sequence_nll_matches_a_token_by_token_sum() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 4, 3, 0, 0], [2, 5, 6, 9, 3]])
    targets = answer_targets(ids, pad_id=0)
    expected = torch.zeros(3)
    for n in range(3):
        for t in range(1, 5):
            if ids[n, t] != 0:
                expected[n] -= F.log_softmax(logits[n, t - 1], -1)[ids[n, t]]
    assert torch.allclose(sequence_nll(logits, targets), expected, atol=1e-6)
    soft = F.softmax(torch.randn(3, 4, 11, generator=g), -1)
    soft_ce = torch.zeros(3)
    for n in range(3):
        for t in range(1, 5):
            if ids[n, t] != 0:
                soft_ce[n] -= (soft[n, t - 1] * F.log_softmax(logits[n, t - 1], -1)).sum()
    assert torch.allclose(sequence_nll(logits, targets, soft, 0.4),
                          0.6 * expected + 0.4 * soft_ce, atol=1e-5)
    assert targets[1, 3] == IGNORE


def test_weighted_answer_loss_and_the_answer_weight_rule() -> None:
    assert vqa_answer_weights(["yes"] * 7 + ["no"] * 3) == {"yes": 0.7, "no": 0.3}
    assert vqa_answer_weights(["2", "two", "2", "2"]) == {"2": 0.75, "two": 0.25}
    loss = weighted_answer_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.7, 0.3, 1.0]), 2)
    assert math.isclose(float(loss), (0.7 + 0.6 + 4.0) / 2, rel_tol=1e-6)


def _official_vqa_accuracy(pred: str, gts: list[str]) -> float:
    scores = []
    for others in itertools.combinations(range(len(gts)), len(gts) - 1):
        scores.append(min(1.0, sum(gts[j] == pred for j in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("matches", [0, 1, 2, 3, 4, 10])
def test_vqa_accuracy_is_the_leave_one_out_average(matches: int) -> None:
    gts = ["cat"] * matches + ["dog"] * (10 - matches)
    assert math.isclose(vqa_accuracy("cat", gts), _official_vqa_accuracy("cat", gts))
    assert math.isclose(vqa_accuracy("cat", gts),
                        {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}[matches])


def test_answer_normalisation() -> None:
    assert normalise_answer("Two ") == "2"
    assert normalise_answer("a Red circle.") == "red circle"
    assert normalise_answer("3.5") == "3.5"
    assert normalise_answer("yes!") == "yes"


def test_answer_decoder_is_initialised_from_the_fusion_layers_and_is_causal() -> None:
    cfg, albef = _albef(with_mlm=True)
    bert = bert_config(cfg, VOCAB, SPECIAL.pad)
    dec = AnswerDecoder.from_pretrained(bert, albef.text_encoder, albef.fusion_encoder,
                                        albef.mlm_head).eval()
    for mine, theirs in zip(dec.layer, albef.fusion_encoder.layer, strict=True):
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[k], v)
    assert torch.equal(dec.embeddings.word_embeddings.weight,
                       albef.text_encoder.embeddings.word_embeddings.weight)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 64, generator=g)
    q_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]])
    a_mask = (ids != 0).long()
    with torch.no_grad():
        out = dec(ids, a_mask, q, q_mask)
        later = ids.clone()
        later[:, 2] = 11  # change a later token: earlier positions must not move
        assert torch.allclose(dec(later, a_mask, q, q_mask)[:, :2], out[:, :2], atol=1e-6)
        padded = q.clone()
        padded[0, 4:] = 100.0  # padded question tokens are not attended to
        assert torch.allclose(dec(ids, a_mask, padded, q_mask), out, atol=1e-5)


class _Bigram:
    """A stand-in decoder whose next-token log-probabilities depend only on the previous token:
    logits[t] = table[ids[t]], so sequence probabilities are products of table entries."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def answer_logits(self, states, question_mask, ids, mask):
        return self.table[ids]


def test_rank_answers_picks_the_most_likely_answer_as_albef_scores_it() -> None:
    # vocabulary: 0 pad, 2 [CLS]=BOS, 3 [SEP]=EOS, 5 "red", 6 "circle", 7 "yes", 8 "no"
    v = 10
    logp = torch.full((v, v), -20.0)
    logp[2, 7], logp[2, 8], logp[2, 5] = math.log(0.3), math.log(0.25), math.log(0.45)
    logp[7, 3], logp[8, 3] = 0.0, 0.0
    logp[5, 6], logp[5, 3] = math.log(0.5), math.log(0.5)
    logp[6, 3] = 0.0
    answers = torch.tensor([[2, 7, 3, 0], [2, 8, 3, 0], [2, 5, 6, 3], [2, 5, 3, 0]])
    mask = (answers != 0).long()
    states, qmask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.long)
    ids, probs = rank_answers(_Bigram(logp), states, qmask, answers, mask, k=4, pad_id=0)
    # ALBEF's score: log p(first) twice + the rest of the answer.
    score = torch.tensor([2 * math.log(0.3), 2 * math.log(0.25),
                          2 * math.log(0.45) + math.log(0.5), 2 * math.log(0.45) + math.log(0.5)])
    expected = score.softmax(0)
    assert ids[0].tolist()[:2] in ([2, 3], [3, 2]) and ids[0, 2] == 0 and ids[0, 3] == 1
    assert torch.allclose(probs[0], expected.sort(descending=True).values, atol=1e-5)
    # k = 1 keeps only the most likely first token ("red"): the ranking stays inside it.
    ids1, _ = rank_answers(_Bigram(logp), states, qmask, answers, mask, k=1, pad_id=0)
    assert ids1[0, 0] in (2, 3)


def test_rank_answers_equals_scoring_each_answer_alone() -> None:
    cfg, albef = _albef(with_mlm=True)
    model = build_task_model("vqa", albef, bert_config(cfg, VOCAB, SPECIAL.pad)).eval()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    q_ids = torch.randint(5, VOCAB, (2, 5), generator=g)
    q_mask = torch.ones(2, 5, dtype=torch.long)
    answers = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 10, 3, 0], [2, 11, 12, 3]])
    a_mask = (answers != 0).long()
    with torch.no_grad():
        states = model.question_states(images, q_ids, q_mask)
        ids, probs = rank_answers(model, states, q_mask, answers, a_mask, k=4, pad_id=0)
        for b in range(2):
            scores = []
            for a in range(4):
                n = int(a_mask[a].sum())
                logits = model.answer_logits(states[b:b + 1], q_mask[b:b + 1],
                                             answers[a:a + 1, :n], a_mask[a:a + 1, :n])
                logp = F.log_softmax(logits[0], -1)
                total = sum(logp[t - 1, answers[a, t]] for t in range(1, n))
                scores.append(logp[0, answers[a, 1]] + total)
            expected = torch.stack(scores).softmax(0)
            assert torch.allclose(probs[b], expected[ids[b]], atol=1e-5)
            assert torch.equal(ids[b], expected.argsort(descending=True))
