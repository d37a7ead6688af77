"""One objective per downstream task: student, momentum teacher, loss and prediction.

Shared by the fine-tuning loop (``model/downstream/finetune.py``), the tests and the benchmarks.
Momentum distillation as ALBEF does it for every task: before each step the teacher moves
towards the student (theta_m <- m theta_m + (1 - m) theta), then its predictions become soft
targets weighted by ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.downstream.losses import (
    accuracy,
    answer_targets,
    distilled_cross_entropy,
    sequence_nll,
    ta_labels_and_pairs,
    weighted_answer_loss,
)
from model.downstream.models import NLVRModel, VEModel, VQAModel
from model.momentum import ema_update


@dataclass
class TaskStep:
    """A step's loss (with graph) and detached statistics (device tensors: no host sync)."""

    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class TaskObjective(nn.Module):
    """Base: ``student`` (trained), optional ``teacher`` (its momentum twin, frozen here: it
    only moves by the EMA)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, momentum: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.momentum = momentum
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update_teacher(self) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.student, self.momentum)


class ClassifyObjective(TaskObjective):
    """SNLI-VE (3 classes) and NLVR2 (2 classes): distilled cross-entropy on the [CLS] head."""

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        if isinstance(model, NLVRModel):
            return model(batch["images0"], batch["images1"], batch["input_ids"],
                         batch["attention_mask"])
        assert isinstance(model, VEModel)
        return model(batch["images"], batch["input_ids"], batch["attention_mask"])

    def forward(self, batch: dict[str, Tensor], alpha: float) -> TaskStep:
        logits = self.logits(self.student, batch)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                self.update_teacher()
                teacher_logits = self.logits(self.teacher, batch)
        loss = distilled_cross_entropy(logits, batch["labels"], teacher_logits, alpha)
        return TaskStep(loss, {"acc": accuracy(logits.detach(), batch["labels"])})

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        return self.logits(self.student, batch).argmax(dim=1)


class TextAssignmentObjective(TaskObjective):
    """NLVR2's TA step on (image, caption) pre-training pairs (no teacher, as in ALBEF)."""

    def forward(self, batch: dict[str, Tensor], alpha: float = 0.0) -> TaskStep:
        model: NLVRModel = self.student
        tokens = model.encode_images(batch["images"])
        weights = model.image_similarity_weights(tokens)
        first, second, labels = ta_labels_and_pairs(weights, self.generator)
        logits = model.classify(tokens[first], tokens[second], batch["input_ids"],
                                batch["attention_mask"])
        loss = F.cross_entropy(logits, labels)
        return TaskStep(loss, {"acc": accuracy(logits.detach(), labels)})


def _repeat_rows(x: Tensor, counts: Tensor) -> Tensor:
    return x.repeat_interleave(counts, dim=0)


class VQAObjective(TaskObjective):
    """VQA: weighted (distilled) answer NLL; prediction by ranking a fixed answer list."""

    def __init__(self, student: VQAModel, teacher: VQAModel | None, momentum: float,
                 pad_id: int, seed: int = 0) -> None:
        super().__init__(student, teacher, momentum, seed)
        self.pad_id = pad_id

    def _logits(self, model: VQAModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        states = model.question_states(batch["images"], batch["input_ids"],
                                       batch["attention_mask"])
        counts = batch["answer_counts"]
        logits = model.answer_logits(_repeat_rows(states, counts),
                                     _repeat_rows(batch["attention_mask"], counts),
                                     batch["answer_ids"], batch["answer_mask"])
        return logits, counts

    def forward(self, batch: dict[str, Tensor], alpha: float) -> TaskStep:
        logits, _ = self._logits(self.student, batch)
        soft = None
        if self.teacher is not None:
            with torch.no_grad():
                self.update_teacher()
                teacher_logits, _ = self._logits(self.teacher, batch)
                soft = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
        targets = answer_targets(batch["answer_ids"], self.pad_id)
        per_answer = sequence_nll(logits, targets, soft, alpha)
        loss = weighted_answer_loss(per_answer, batch["answer_weights"],
                                    batch["input_ids"].shape[0])
        return TaskStep(loss, {"answer_nll": per_answer.detach().mean()})

    @torch.no_grad()
    def rank(self, batch: dict[str, Tensor], answer_ids: Tensor, answer_mask: Tensor, k: int
             ) -> tuple[Tensor, Tensor]:
        """(top-k answer indices, their probabilities), both (B, k), best first."""
        model: VQAModel = self.student
        states = model.question_states(batch["images"], batch["input_ids"],
                                       batch["attention_mask"])
        return rank_answers(model, states, batch["attention_mask"], answer_ids, answer_mask,
                            k, self.pad_id)


@torch.no_grad()
def rank_answers(model: VQAModel, states: Tensor, question_mask: Tensor, answer_ids: Tensor,
                 answer_mask: Tensor, k: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """ALBEF's answer ranking over a fixed list of A answers (each ``[CLS] pieces [SEP]``).

    1. One decoder step from BOS gives every answer's first-token probability; keep the top k.
    2. Teacher-force those k answers; score = log p(first token) + sum of the answer's token
       log-likelihoods. ALBEF's sum starts at the first answer token too, so the first token's
       log-probability counts twice; kept, as the ranking it produces is ALBEF's.
    3. Softmax over the k scores; re-sort.

    states: (B, Lq, D); question_mask: (B, Lq); answer_ids / answer_mask: (A, La).
    Returns indices into the answer list and their probabilities, (B, k) each, best first.
    """
    b = states.shape[0]
    k = min(k, answer_ids.shape[0])
    bos = answer_ids[:1, :1].expand(b, 1)
    first_logits = model.answer_logits(states, question_mask, bos, torch.ones_like(bos))[:, 0]
    first_prob = first_logits.float().softmax(dim=-1).index_select(1, answer_ids[:, 1])
    topk_prob, topk_ids = first_prob.topk(k, dim=1)
    cand_ids = answer_ids[topk_ids.reshape(-1)]
    cand_mask = answer_mask[topk_ids.reshape(-1)]
    logits = model.answer_logits(states.repeat_interleave(k, 0),
                                 question_mask.repeat_interleave(k, 0), cand_ids, cand_mask)
    nll = sequence_nll(logits, answer_targets(cand_ids, pad_id)).view(b, k)
    score = topk_prob.log() - nll
    prob = score.softmax(dim=1)
    prob, order = prob.topk(k, dim=1)
    return topk_ids.gather(1, order), prob
