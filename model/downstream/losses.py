"""Loss and metric math of the downstream tasks (docs/DOWNSTREAM.md), shared by the fine-tuning
loop, the tests and the benchmarks. Pure functions of tensors and strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def distilled_cross_entropy(logits: Tensor, targets: Tensor, teacher_logits: Tensor | None,
                            alpha: float) -> Tensor:
    """ALBEF's classification loss with momentum distillation (SNLI-VE, NLVR2, TA):

        L = (1 - alpha) CE(p, y) - alpha * mean_b sum_c softmax(q)_c log softmax(p)_c

    with p the student's and q the momentum model's logits; without a teacher, plain CE.
    """
    hard = F.cross_entropy(logits, targets)
    if teacher_logits is None:
        return hard
    soft = -(F.log_softmax(logits, dim=1) * F.softmax(teacher_logits, dim=1)).sum(dim=1).mean()
    return (1.0 - alpha) * hard + alpha * soft


def answer_targets(answer_ids: Tensor, pad_id: int) -> Tensor:
    """Teacher-forcing targets: the answer ids with padding ignored."""
    return answer_ids.masked_fill(answer_ids == pad_id, IGNORE)


def sequence_nll(logits: Tensor, targets: Tensor, soft_targets: Tensor | None = None,
                 alpha: float = 0.0) -> Tensor:
    """Per-sequence negative log-likelihood of ``targets[:, 1:]`` given ``logits[:, :-1]``.

    logits: (N, L, V) of the decoder fed with the answer (its first token is [CLS] = BOS);
    targets: (N, L) with IGNORE at padding. Summed over tokens: (N,). With ``soft_targets``
    ((N, L-1, V) momentum-decoder probabilities) the loss is (1 - alpha) NLL + alpha * the soft
    cross-entropy over the same (non-padding) tokens, as ALBEF's VQA decoder computes it.
    """
    shifted = logits[:, :-1].float()
    labels = targets[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), labels, ignore_index=IGNORE,
                          reduction="none").sum(dim=1)
    if soft_targets is None:
        return nll
    soft = -(F.log_softmax(shifted, dim=-1) * soft_targets).sum(dim=-1)
    soft = (soft * (labels != IGNORE)).sum(dim=1)
    return (1.0 - alpha) * nll + alpha * soft


def weighted_answer_loss(per_answer: Tensor, weights: Tensor, n_questions: int) -> Tensor:
    """VQA's loss: sum over every (question, candidate answer) of weight x NLL, divided by the
    number of questions in the batch (ALBEF divides by the number of images = questions)."""
    return (weights * per_answer).sum() / n_questions



# The official VQA evaluation normalises answers before matching (lower case, punctuation,
# number words to digits, articles removed, common contractions). This is an independent,
# smaller version of that normalisation: enough for the answer lists the harness produces.
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def normalise_answer(answer: str) -> str:
    """Lower case, punctuation dropped (a period only when not inside a number), number words to
    digits, articles removed, whitespace collapsed."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PUNCT.sub("", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction: min(#humans who gave it / 3, 1), averaged over the
    leave-one-annotator-out subsets as the official evaluation does (with 10 answers: 4 or more
    matching humans give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3)."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs the human answers of the question")
    pred = normalise_answer(prediction)
    gold = [normalise_answer(a) for a in human_answers]
    if len(gold) == 1:
        return float(pred == gold[0])
    scores = []
    for left_out in range(len(gold)):
        matches = sum(1 for j, g in enumerate(gold) if j != left_out and g == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Share of argmax predictions equal to the targets (a 0-d tensor; no host sync)."""
    return (logits.argmax(dim=1) == targets).float().mean()


def ta_labels_and_pairs(weights: Tensor, generator: torch.Generator
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """NLVR2's text-assignment sampling for a batch of B (image, caption) pairs.

    weights: (B, B) image-image sampling weights with a zero diagonal (ALBEF: softmax of the
    projected [CLS] similarities / 0.07). For each caption b: with probability 2/3 its own image
    goes to slot 0 (label 0) or slot 1 (label 1), equally likely, and the other slot gets an image
    drawn from weights[b]; with probability 1/3 both slots get drawn images (label 2, "neither").
    Returns (slot-0 indices, slot-1 indices, labels), each (B,).
    """
    b = weights.shape[0]
    device = weights.device
    keep = torch.rand(b, generator=generator, device=device) > 1.0 / 3.0
    own_first = torch.rand(b, generator=generator, device=device) > 0.5
    drawn = torch.multinomial(weights, 2, generator=generator)  # without replacement
    own = torch.arange(b, device=device)
    first = torch.where(keep, torch.where(own_first, own, drawn[:, 0]), drawn[:, 0])
    second = torch.where(keep, torch.where(own_first, drawn[:, 0], own), drawn[:, 1])
    labels = torch.where(keep, torch.where(own_first, 0, 1), 2)
    return first, second, labels
