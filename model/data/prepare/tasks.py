"""SNLI-VE, NLVR2 and VQA v2 (+ VG-QA) -> the downstream task files (model/data/task_data.py).

* ``snli-ve``: ``snli_ve_{train,dev,test}.jsonl`` (one JSON object per line: ``Flickr30K_ID``,
  ``sentence2`` = the hypothesis, ``gold_label``) -> ``ve_{train,dev,test}.json``.
* ``nlvr2``: ``{train,dev,test1}.json`` (one object per line: ``identifier``
  ``<split>-<set>-<pair>-<sentence>``, ``sentence``, ``label`` True/False, ``directory`` for
  train) -> ``nlvr_{train,dev,test}.json`` with the pair's two images
  ``<split>[/<directory>]/<split>-<set>-<pair>-img{0,1}.png``.
* ``vqa``: VQA v2 questions + annotations (train2014, val2014; test2015 questions) and
  optionally Visual Genome's ``question_answers.json`` -> ``vqa_{train,val,test}.json``,
  ``vg_qa.json`` and ``answer_list.json`` (given with ``--answer-list``, e.g. ALBEF's 3,128
  answers, or the ``--top-answers`` most frequent training answers). VG-QA questions whose
  answer is not in the list are dropped (counted), as the answer decoder is trained towards the
  list.

Every input line or entry is validated; an error names the file, the line (or entry) and what
was expected. With ``--image-root`` each referenced image must exist there (a summary of the
missing ones is an error; ``--allow-missing-images`` drops those entries instead, counted).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.data.jsonio import DataFileError, read_json, require_file, write_json_list
from model.data.prepare import OutputCount, PrepareSummary

VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR_SPLITS = {"train": "train", "dev": "dev", "test1": "test"}


def iter_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; errors name the file and line."""
    require_file(path, what)
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{what} {path}: line {n}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataFileError(f"{what} {path}: line {n}: expected a JSON object")
            yield n, obj


def _field(obj: dict[str, Any], key: str, where: str, kinds: type | tuple = str) -> Any:
    if key not in obj:
        raise DataFileError(f"{where}: missing key {key!r} (keys: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        raise DataFileError(f"{where}: {key!r} must be a non-empty {kinds}, got {value!r}")
    return value


class _ImageCheck:
    """Optional existence check of referenced images under an image root."""

    def __init__(self, root: Path | None, allow_missing: bool) -> None:
        self.root, self.allow_missing = root, allow_missing
        self.missing: list[str] = []

    def ok(self, *relative: str) -> bool:
        if self.root is None:
            return True
        absent = [r for r in relative if not (self.root / r).is_file()]
        self.missing += absent
        return not absent

    def finish(self, summary: PrepareSummary) -> None:
        if not self.missing:
            return
        if not self.allow_missing:
            raise DataFileError(f"{len(self.missing)} referenced images are missing under "
                               f"{self.root} (e.g. {self.missing[:3]}); fix --image-root or "
                               "pass --allow-missing-images to drop those entries")
        summary.stats["dropped_missing_images"] = len(self.missing)


def _write(summary: PrepareSummary, name: str, path: Path, entries: list[dict[str, Any]],
           images: int) -> None:
    write_json_list(path, entries)
    summary.outputs.append(OutputCount(name, path, len(entries), images, len(entries)))


def prepare_snli_ve(ve_dir: Path, out_dir: Path, image_prefix: str = "",
                    image_root: Path | None = None, allow_missing_images: bool = False
                    ) -> PrepareSummary:
    summary = PrepareSummary("snli-ve")
    check = _ImageCheck(image_root, allow_missing_images)
    for split in ("train", "dev", "test"):
        path = ve_dir / f"snli_ve_{split}.jsonl"
        entries = []
        for n, obj in iter_jsonl(path, "SNLI-VE file"):
            where = f"{path}: line {n}"
            label = _field(obj, "gold_label", where)
            if label not in VE_LABELS:
                raise DataFileError(f"{where}: gold_label {label!r} is not one of {VE_LABELS}")
            image = f"{image_prefix}{_field(obj, 'Flickr30K_ID', where, (str, int))}.jpg"
            if check.ok(image):
                entries.append({"image": image, "sentence": _field(obj, "sentence2", where),
                                "label": label})
        _write(summary, f"ve_{split}", out_dir / f"ve_{split}.json", entries,
               len({e["image"] for e in entries}))
    check.finish(summary)
    return summary


def _nlvr_images(identifier: str, directory: Any, where: str, split: str) -> list[str]:
    parts = identifier.split("-")
    if len(parts) != 4:
        raise DataFileError(f"{where}: identifier {identifier!r} is not "
                           "<split>-<set>-<pair>-<sentence>")
    stem = "-".join(parts[:3])
    folder = f"{split}/{directory}/" if split == "train" and directory is not None else f"{split}/"
    return [f"{folder}{stem}-img0.png", f"{folder}{stem}-img1.png"]


def prepare_nlvr2(nlvr_dir: Path, out_dir: Path, image_prefix: str = "",
                  image_root: Path | None = None, allow_missing_images: bool = False
                  ) -> PrepareSummary:
    summary = PrepareSummary("nlvr2")
    check = _ImageCheck(image_root, allow_missing_images)
    for source, split in NLVR_SPLITS.items():
        path = nlvr_dir / f"{source}.json"
        entries = []
        for n, obj in iter_jsonl(path, "NLVR2 file"):
            where = f"{path}: line {n}"
            label = str(_field(obj, "label", where, (str, bool)))
            if label not in ("True", "False"):
                raise DataFileError(f"{where}: label {obj['label']!r} is not True or False")
            images = [image_prefix + p for p in _nlvr_images(
                _field(obj, "identifier", where), obj.get("directory"), where, source)]
            if check.ok(*images):
                entries.append({"images": images, "sentence": _field(obj, "sentence", where),
                                "label": label})
        _write(summary, f"nlvr_{split}", out_dir / f"nlvr_{split}.json", entries,
               2 * len(entries))
    check.finish(summary)
    return summary


def _vqa_questions(path: Path) -> list[dict[str, Any]]:
    data = read_json(path, "VQA questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DataFileError(f"{path}: expected an object with a 'questions' list")
    return data["questions"]


def _vqa_answers(path: Path) -> dict[int, list[str]]:
    data = read_json(path, "VQA annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFileError(f"{path}: expected an object with an 'annotations' list")
    out = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {i}"
        answers = _field(ann, "answers", where, list)
        out[int(_field(ann, "question_id", where, int))] = [
            _field(a, "answer", f"{where} answer {j}") for j, a in enumerate(answers)]
    return out


def _vqa_split(q_path: Path, a_path: Path | None, folder: str, prefix: str,
               check: _ImageCheck) -> list[dict[str, Any]]:
    answers = _vqa_answers(a_path) if a_path is not None else None
    entries = []
    for i, q in enumerate(_vqa_questions(q_path)):
        where = f"{q_path}: question {i}"
        qid = int(_field(q, "question_id", where, int))
        image = f"{prefix}{folder}/COCO_{folder}_{int(_field(q, 'image_id', where, int)):012d}.jpg"
        entry = {"question_id": qid, "question": _field(q, "question", where), "image": image,
                 "dataset": "vqa"}
        if answers is not None:
            if qid not in answers:
                raise DataFileError(f"{where}: question_id {qid} has no annotation in {a_path}")
            entry["answer"] = answers[qid]
        if check.ok(image):
            entries.append(entry)
    return entries


def _vg_qa(path: Path, answer_set: set[str], prefix: str, summary: PrepareSummary
           ) -> list[dict[str, Any]]:
    data = read_json(path, "Visual Genome question_answers file")
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a list of images with 'qas'")
    entries, dropped = [], 0
    for i, image in enumerate(data):
        for j, qa in enumerate(_field(image, "qas", f"{path}: entry {i}", list)):
            where = f"{path}: entry {i} qa {j}"
            answer = _field(qa, "answer", where).lower().strip().rstrip(".")
            if answer not in answer_set:
                dropped += 1
                continue
            entries.append({"question_id": int(_field(qa, "qa_id", where, int)),
                            "question": _field(qa, "question", where), "answer": answer,
                            "image": f"{prefix}{_field(qa, 'image_id', where, int)}.jpg",
                            "dataset": "vg"})
    summary.stats["vg_qa_answers_not_in_list"] = dropped
    return entries


def _answer_list(path: Path | None, train: list[dict[str, Any]], top: int) -> list[str]:
    if path is not None:
        data = read_json(path, "answer list")
        if not isinstance(data, list) or not all(isinstance(a, str) and a for a in data):
            raise DataFileError(f"{path}: expected a JSON list of non-empty answer strings")
        return data
    counts = Counter(a for e in train for a in e["answer"])  # every human answer counts
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def prepare_vqa(vqa_dir: Path, out_dir: Path, image_prefix: str = "",
                vg_qa: Path | None = None, vg_prefix: str = "", answer_list: Path | None = None,
                top_answers: int = 3128, image_root: Path | None = None,
                allow_missing_images: bool = False) -> PrepareSummary:
    summary = PrepareSummary("vqa")
    check = _ImageCheck(image_root, allow_missing_images)
    q = "v2_OpenEnded_mscoco_{}_questions.json"
    splits = {
        "train": _vqa_split(vqa_dir / q.format("train2014"),
                            vqa_dir / "v2_mscoco_train2014_annotations.json", "train2014",
                            image_prefix, check),
        "val": _vqa_split(vqa_dir / q.format("val2014"),
                          vqa_dir / "v2_mscoco_val2014_annotations.json", "val2014",
                          image_prefix, check),
        "test": _vqa_split(vqa_dir / q.format("test2015"), None, "test2015", image_prefix,
                           check),
    }
    check.finish(summary)
    answers = _answer_list(answer_list, splits["train"], top_answers)
    for name, entries in splits.items():
        _write(summary, f"vqa_{name}", out_dir / f"vqa_{name}.json", entries,
               len({e["image"] for e in entries}))
    if vg_qa is not None:
        vg = _vg_qa(vg_qa, set(answers), vg_prefix, summary)
        _write(summary, "vg_qa", out_dir / "vg_qa.json", vg, len({e["image"] for e in vg}))
    (out_dir / "answer_list.json").write_text(json.dumps(answers) + "\n", encoding="utf-8")
    summary.stats["answer_list"] = len(answers)
    return summary
