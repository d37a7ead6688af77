"""Runtime files, datasets and collates of the downstream tasks (docs/DATA.md, "Downstream").

The files are ALBEF's formats (JSON lists), written by the converters in ``model/data/prepare/``
or by the synthetic stand-ins (``model/data/synthetic_tasks.py``, each task's ``STAND_IN``):

* SNLI-VE: ``{"image", "sentence", "label": entailment | neutral | contradiction}``
* NLVR2:   ``{"images": [left, right], "sentence", "label": "True" | "False"}``
* VQA:     ``{"question_id", "question", "image", "dataset": vqa | vg, "answer"}`` where
  ``answer`` is the list of human answers (vqa), one string (vg), or absent (test questions);
  plus ``answer_list.json``, the candidate answers ranked at test time.

Every reader validates each entry and names the file and the entry index in its error.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from model.data.captions import pre_caption
from model.data.datasets import IMAGE_ERRORS, AnnotationError, UnreadableImageError
from model.data.tokenizer import TextTokenizer

# ALBEF's label ids (its SNLI-VE dataset maps entailment 2, neutral 1, contradiction 0).
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
NLVR_LABELS = {"False": 0, "True": 1}
Transform = Callable[[Image.Image], torch.Tensor]


def vqa_answer_weights(answers: Sequence[str]) -> dict[str, float]:
    """ALBEF's per-answer training weights for one VQA question: each distinct human answer gets
    (its count among the annotations) / (number of annotations). VG-QA answers get 0.5 instead
    (:data:`VG_WEIGHT`), set by the dataset."""
    if not answers:
        raise ValueError("a VQA question needs at least one answer")
    counts = Counter(answers)
    return {a: c / len(answers) for a, c in counts.items()}


VG_WEIGHT = 0.5


def pre_question(question: str, max_words: int) -> str:
    """ALBEF's question cleaning: lower case, drop ``, . ' ! ? " ( ) * # : ; ~``, ``-`` and ``/``
    to spaces, trailing spaces stripped, at most ``max_words`` words."""
    text = re.sub(r"[,.'!?\"()*#:;~]", "", question.lower()).replace("-", " ").replace("/", " ")
    words = text.rstrip(" ").split(" ")
    return " ".join(words[:max_words])


def read_entries(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of objects; errors name the file (and the entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path}: entry {i}: expected an object, got "
                                  f"{type(entry).__name__}")
    return data


def _need(path: Path, i: int, entry: dict[str, Any], key: str, kind: type | tuple) -> Any:
    if key not in entry:
        raise AnnotationError(f"{path}: entry {i}: missing key {key!r} (keys: {sorted(entry)})")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise AnnotationError(f"{path}: entry {i}: {key!r} must be a non-empty "
                              f"{getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _text(path: Path, i: int, entry: dict[str, Any], key: str, max_words: int,
          clean: Callable[[str, int], str]) -> str:
    text = clean(_need(path, i, entry, key, str), max_words)
    if not text.strip():
        raise AnnotationError(f"{path}: entry {i}: {key!r} is empty after cleaning "
                              f"({entry[key]!r})")
    return text


@dataclass(frozen=True)
class VERecord:
    image: str
    sentence: str
    label: int


@dataclass(frozen=True)
class NLVRRecord:
    images: tuple[str, str]
    sentence: str
    label: int


@dataclass(frozen=True)
class VQARecord:
    question_id: int
    image: str
    question: str
    answers: tuple[str, ...]          # the human answers (vqa), the one answer (vg), or ()
    weights: tuple[float, ...]        # training weight of each distinct answer
    distinct: tuple[str, ...]         # the distinct answers the weights belong to
    source: str


def load_ve(path: str | Path, max_words: int = 30) -> list[VERecord]:
    path = Path(path)
    out = []
    for i, e in enumerate(read_entries(path)):
        label = _need(path, i, e, "label", str)
        if label not in VE_LABELS:
            raise AnnotationError(f"{path}: entry {i}: label {label!r} is not one of "
                                  f"{sorted(VE_LABELS)}")
        out.append(VERecord(_need(path, i, e, "image", str),
                            _text(path, i, e, "sentence", max_words, pre_caption),
                            VE_LABELS[label]))
    return out


def load_nlvr(path: str | Path, max_words: int = 30) -> list[NLVRRecord]:
    path = Path(path)
    out = []
    for i, e in enumerate(read_entries(path)):
        images = _need(path, i, e, "images", list)
        if len(images) != 2 or not all(isinstance(p, str) and p for p in images):
            raise AnnotationError(f"{path}: entry {i}: 'images' must list two image paths, got "
                                  f"{images!r}")
        label = str(_need(path, i, e, "label", (str, bool)))
        if label not in NLVR_LABELS:
            raise AnnotationError(f"{path}: entry {i}: label {e['label']!r} is not 'True' or "
                                  "'False'")
        out.append(NLVRRecord((images[0], images[1]),
                              _text(path, i, e, "sentence", max_words, pre_caption),
                              NLVR_LABELS[label]))
    return out


def _vqa_answers(path: Path, i: int, e: dict[str, Any], answer_set: set[str] | None
                 ) -> tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]:
    if "answer" not in e:
        return (), (), ()
    raw = e["answer"]
    answers = [raw] if isinstance(raw, str) else raw
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) and a.strip() for a in answers):
        raise AnnotationError(f"{path}: entry {i}: 'answer' must be a non-empty string or list "
                              f"of non-empty strings, got {raw!r}")
    if answer_set is not None:
        unknown = [a for a in answers if a not in answer_set]
        if len(unknown) == len(answers):
            raise AnnotationError(f"{path}: entry {i}: none of the answers {answers!r} is in "
                                  "the answer list")
    if e.get("dataset", "vqa") == "vg":
        return tuple(answers), (VG_WEIGHT,), (answers[0],)
    weights = vqa_answer_weights(answers)
    return tuple(answers), tuple(weights.values()), tuple(weights)


def load_vqa(path: str | Path, max_words: int = 30, answer_list: Sequence[str] | None = None,
             need_answers: bool = False) -> list[VQARecord]:
    path = Path(path)
    answer_set = set(answer_list) if answer_list is not None else None
    out = []
    for i, e in enumerate(read_entries(path)):
        source = e.get("dataset", "vqa")
        if source not in ("vqa", "vg"):
            raise AnnotationError(f"{path}: entry {i}: 'dataset' must be 'vqa' or 'vg', got "
                                  f"{source!r}")
        answers, weights, distinct = _vqa_answers(path, i, e, answer_set)
        if need_answers and not answers:
            raise AnnotationError(f"{path}: entry {i}: training questions need 'answer'")
        qid = e.get("question_id", i)
        out.append(VQARecord(int(qid), _need(path, i, e, "image", str),
                             _text(path, i, e, "question", max_words, pre_question),
                             answers, weights, distinct, source))
    return out


def load_answer_list(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer list {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of answers")
    for i, a in enumerate(data):
        if not isinstance(a, str) or not a.strip():
            raise AnnotationError(f"{path}: entry {i}: answer must be a non-empty string, got "
                                  f"{a!r}")
    if len(set(data)) != len(data):
        raise AnnotationError(f"{path}: the answer list repeats an answer")
    return data


class _Images:
    """Task images under one root; an unreadable one is an error naming the file (task splits
    are small and scored per example: no silent substitution)."""

    def __init__(self, image_root: str | Path, transform: Transform) -> None:
        self.root = Path(image_root)
        self.transform = transform

    def load(self, relative: str) -> torch.Tensor:
        path = self.root / relative
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")  # the full decode: corrupt data fails here
        except IMAGE_ERRORS as err:
            raise UnreadableImageError(f"cannot read image {path}: {err}") from err
        return self.transform(image)  # outside the try: a transform error is a bug


class _RecordDataset(Dataset):
    """Validated records and the image loader of one split."""

    def __init__(self, records: Sequence[Any], image_root: str | Path,
                 transform: Transform) -> None:
        self.records, self.images = list(records), _Images(image_root, transform)

    def __len__(self) -> int:
        return len(self.records)


class VEDataset(_RecordDataset):
    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"images": self.images.load(r.image), "text": r.sentence, "labels": r.label}


class NLVRDataset(_RecordDataset):
    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"images0": self.images.load(r.images[0]),
                "images1": self.images.load(r.images[1]), "text": r.sentence, "labels": r.label}


class VQADataset(_RecordDataset):
    def __init__(self, records: Sequence[VQARecord], image_root: str | Path,
                 transform: Transform, vg_root: str | Path | None = None) -> None:
        super().__init__(records, image_root, transform)
        self.vg_images = _Images(vg_root, transform) if vg_root else self.images

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        loader = self.vg_images if r.source == "vg" else self.images
        return {"images": loader.load(r.image), "text": r.question, "index": i}


class ClassifyCollate:
    """Stack images and labels, tokenise the statements (ALBEF: padding to the longest)."""

    def __init__(self, tokenizer: TextTokenizer, max_tokens: int | None = None) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]
               if k.startswith("images")}
        out["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        enc = self.tokenizer([it["text"] for it in items], max_length=self.max_tokens,
                             truncation=self.max_tokens is not None)
        return {**out, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def encode_answers(tokenizer: TextTokenizer, answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """``[CLS] pieces [SEP] [PAD]...``: ALBEF appends [SEP] to each answer as its end token, and
    its tokenizer writes [CLS] (the decoder's BOS) and no trailing [SEP] of its own."""
    enc = tokenizer(list(answers), truncation=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(dim=1)
    ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), tokenizer.pad_id)], dim=1)
    mask = torch.cat([mask, mask.new_zeros((mask.shape[0], 1))], dim=1)
    rows = torch.arange(ids.shape[0])
    ids[rows, lengths] = tokenizer.sep_id
    mask[rows, lengths] = 1
    return {"answer_ids": ids, "answer_mask": mask}


class VQACollate:
    """Images, questions and, for training, every distinct answer of each question with its
    weight (``answer_counts`` says how many answers belong to each question)."""

    def __init__(self, tokenizer: TextTokenizer, records: Sequence[VQARecord], train: bool,
                 max_tokens: int | None = None) -> None:
        self.tokenizer, self.records = tokenizer, records
        self.train, self.max_tokens = train, max_tokens

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([it["text"] for it in items], max_length=self.max_tokens,
                             truncation=self.max_tokens is not None)
        out = {"images": torch.stack([it["images"] for it in items]),
               "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if self.train:
            recs = [self.records[it["index"]] for it in items]
            answers = [a for r in recs for a in r.distinct]
            out.update(encode_answers(self.tokenizer, answers))
            out["answer_weights"] = torch.tensor([w for r in recs for w in r.weights])
            out["answer_counts"] = torch.tensor([len(r.distinct) for r in recs])
        return out
