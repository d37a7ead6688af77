"""Synthetic stand-ins for SNLI-VE, NLVR2 and VQA, drawn from the shapes set's scenes.

Deterministic (a seed and the pre-training set's :class:`SyntheticSpec` fix every byte) and cached
next to that set, in the downstream files' formats (``model/data/task_data.py``). Each task needs
the image *and* the text: every template is used for every label, so no text-only prior helps.

* **VE** (``the <shape> is <colour>`` / ``the <shape> is <relation> the <shape>``): entailment
  when true of the scene, contradiction when the named shape is there but the colour or
  relation is wrong, neutral when the named shape is not in the scene (the image cannot settle
  it). One statement per label for every image.
* **NLVR2** (``both images contain a <colour> <shape>`` / ``only one image contains ...``): the
  label needs both images; each template is True for half of its pairs.
* **VQA** (colour / shape / size / count / yes-no relation / "what is <relation> the ..."): the
  answers come from a fixed list (colours, shapes, sizes, yes, no, one, two and every
  ``<colour> <shape>``); ten identical human answers per question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.data.synthetic import (
    RELATIONS,
    Scene,
    SceneObject,
    SyntheticSpec,
    enumerate_scenes,
    opposite_relation,
    render_scene,
)

log = logging.getLogger(__name__)

TASKS_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
VE_FILES = {s: f"ve_{s}.json" for s in SPLITS}
NLVR_FILES = {s: f"nlvr_{s}.json" for s in SPLITS}
VQA_FILES = {s: f"vqa_{s}.json" for s in SPLITS}
ANSWER_LIST = "answer_list.json"
_STREAMS = {"ve": 11, "nlvr": 12, "vqa": 13}
VE_STATEMENTS_PER_IMAGE = 3  # one per label: entailment, contradiction, neutral
VQA_QUESTIONS_PER_IMAGE = 3
_SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class TaskSizes:
    """Images (VE, VQA) or image pairs (NLVR2) per split; the single-object scene share."""

    train: int = 1200
    val: int = 150
    test: int = 300
    single_object_fraction: float = 0.3


@dataclass(frozen=True)
class TaskFiles:
    root: Path

    def ve(self, split: str) -> Path:
        return self.root / VE_FILES[split]

    def nlvr(self, split: str) -> Path:
        return self.root / NLVR_FILES[split]

    def vqa(self, split: str) -> Path:
        return self.root / VQA_FILES[split]

    @property
    def answer_list(self) -> Path:
        return self.root / ANSWER_LIST


def _name(o: SceneObject) -> str:
    return f"{o.colour} {o.shape}"


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[task],
                                                         _SPLIT_SEEDS[split]]))


class _Scenes:
    """Scene pools and a renderer that writes each image once."""

    def __init__(self, spec: SyntheticSpec, root: Path, sizes: TaskSizes) -> None:
        self.spec, self.root, self.sizes = spec, root, sizes
        self.singles, self.pairs = enumerate_scenes(spec)

    def draw(self, rng: np.random.Generator) -> Scene:
        pool = self.singles if rng.random() < self.sizes.single_object_fraction else self.pairs
        return pool[int(rng.integers(len(pool)))]

    def save(self, scene: Scene, rng: np.random.Generator, relative: str) -> str:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_scene(scene, self.spec, rng)).save(path, format="PNG",
                                                                  compress_level=6)
        return relative


def _relation(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, str, SceneObject]:
    first, second = scene.objects
    forward, backward = RELATIONS[str(scene.axis)]
    return (first, forward, second) if rng.random() < 0.5 else (second, backward, first)


def _ve_statements(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
                   ) -> list[tuple[str, str]]:
    """One (statement, label) per label for one scene."""
    present = {o.shape: o for o in scene.objects}
    absent = [s for s in spec.shapes if s not in present]
    relational = len(scene.objects) == 2 and rng.random() < 0.5
    if relational:
        subject, rel, other = _relation(scene, rng)
        missing = absent[int(rng.integers(len(absent)))]
        neutral = (f"the {missing} is {rel} the {other.shape}" if rng.random() < 0.5
                   else f"the {subject.shape} is {rel} the {missing}")
        return [(f"the {subject.shape} is {rel} the {other.shape}", "entailment"),
                (f"the {subject.shape} is {opposite_relation(rel)} the {other.shape}",
                 "contradiction"),
                (neutral, "neutral")]
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    wrong = [c for c in spec.colours if c != target.colour]
    missing = absent[int(rng.integers(len(absent)))]
    return [(f"the {target.shape} is {target.colour}", "entailment"),
            (f"the {target.shape} is {wrong[int(rng.integers(len(wrong)))]}", "contradiction"),
            (f"the {missing} is {spec.colours[int(rng.integers(len(spec.colours)))]}",
             "neutral")]


def _ve_split(scenes: _Scenes, seed: int, split: str, n: int) -> list[dict]:
    rng = _rng(seed, "ve", split)
    out = []
    for i in range(n):
        scene = scenes.draw(rng)
        image = scenes.save(scene, rng, f"images/ve_{split}/{i:06d}.png")
        out += [{"image": image, "sentence": s, "label": lab}
                for s, lab in _ve_statements(scene, scenes.spec, rng)]
    return out


def _has(scene: Scene, colour: str, shape: str) -> bool:
    return any(o.colour == colour and o.shape == shape for o in scene.objects)


def _scene_with(scenes: _Scenes, rng: np.random.Generator, target: SceneObject, wanted: bool
                ) -> Scene:
    while True:  # rejection sampling; each outcome has probability >= ~1/6 for the defaults
        scene = scenes.draw(rng)
        if _has(scene, target.colour, target.shape) == wanted:
            return scene


def _nlvr_example(scenes: _Scenes, rng: np.random.Generator) -> tuple[Scene, Scene, str, bool]:
    spec = scenes.spec
    target = SceneObject(spec.colours[int(rng.integers(len(spec.colours)))],
                         spec.shapes[int(rng.integers(len(spec.shapes)))], spec.sizes[0])
    label = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        sentence = f"both images contain a {_name(target)}"
        left_has = bool(label or rng.random() < 0.5)
        right_has = label or not left_has and rng.random() < 0.5
    else:
        sentence = f"only one image contains a {_name(target)}"
        left_has = bool(rng.random() < 0.5)
        right_has = (not left_has) if label else left_has
    return (_scene_with(scenes, rng, target, left_has),
            _scene_with(scenes, rng, target, bool(right_has)), sentence, label)


def _nlvr_split(scenes: _Scenes, seed: int, split: str, n: int) -> list[dict]:
    rng = _rng(seed, "nlvr", split)
    out = []
    for i in range(n):
        left, right, sentence, label = _nlvr_example(scenes, rng)
        images = [scenes.save(left, rng, f"images/nlvr_{split}/{i:06d}_0.png"),
                  scenes.save(right, rng, f"images/nlvr_{split}/{i:06d}_1.png")]
        out.append({"images": images, "sentence": sentence, "label": str(label)})
    return out


def _vqa_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """:data:`VQA_QUESTIONS_PER_IMAGE` (question, answer) pairs about one scene."""
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    pool = [(f"what colour is the {target.shape}", target.colour),
            (f"what shape is the {target.colour} object", target.shape),
            (f"what size is the {_name(target)}", target.size),
            ("how many objects are there", ["one", "two"][len(scene.objects) - 1])]
    if len(scene.objects) == 2:
        subject, rel, other = _relation(scene, rng)
        asked = rel if rng.random() < 0.5 else opposite_relation(rel)
        pool += [(f"is the {subject.shape} {asked} the {other.shape}",
                  "yes" if asked == rel else "no"),
                 (f"what is {rel} the {_name(other)}", _name(subject))]
    picks = rng.choice(len(pool), size=VQA_QUESTIONS_PER_IMAGE, replace=False)
    return [pool[int(p)] for p in picks]


def _vqa_split(scenes: _Scenes, seed: int, split: str, n: int, first_id: int) -> list[dict]:
    rng = _rng(seed, "vqa", split)
    out = []
    for i in range(n):
        scene = scenes.draw(rng)
        image = scenes.save(scene, rng, f"images/vqa_{split}/{i:06d}.png")
        for question, answer in _vqa_questions(scene, rng):
            out.append({"question_id": first_id + len(out), "question": question,
                        "image": image, "dataset": "vqa", "answer": [answer] * 10})
    return out


def answer_list(spec: SyntheticSpec) -> list[str]:
    combos = [f"{c} {s}" for c in spec.colours for s in spec.shapes]
    return [*spec.colours, *spec.shapes, *spec.sizes, "yes", "no", "one", "two", *combos]


def tasks_hash(task: str, spec: SyntheticSpec, sizes: TaskSizes, seed: int) -> str:
    payload = json.dumps({"format": TASKS_FORMAT_VERSION, "task": task, "spec": spec.hash(),
                          "sizes": sizes.__dict__, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write(root: Path, name: str, data: object) -> None:
    (root / name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _build(tmp: Path, task: str, spec: SyntheticSpec, sizes: TaskSizes, seed: int
           ) -> dict[str, int]:
    scenes = _Scenes(spec, tmp, sizes)
    makers: dict[str, Callable[[str, int], list[dict]]] = {
        "ve": lambda split, n: _ve_split(scenes, seed, split, n),
        "nlvr": lambda split, n: _nlvr_split(scenes, seed, split, n),
        "vqa": lambda split, n: _vqa_split(scenes, seed, split, n,
                                           1_000_000 * (_SPLIT_SEEDS[split])),
    }
    counts: dict[str, int] = {}
    for split in SPLITS:
        entries = makers[task](split, getattr(sizes, split))
        _write(tmp, f"{task}_{split}.json", entries)
        counts[f"{task}_{split}"] = len(entries)
    if task == "vqa":
        _write(tmp, ANSWER_LIST, answer_list(spec))
    return counts


def generate_task(cache_dir: str | Path, task: str, spec: SyntheticSpec,
                  sizes: TaskSizes | None = None, seed: int = 0) -> TaskFiles:
    """Write (or reuse) one stand-in (``ve``, ``nlvr`` or ``vqa``) under
    ``cache_dir/synthetic_<task>_<hash>``.

    Written into a temporary directory and renamed into place, so concurrent callers and an
    interrupted generation never leave a half-written set behind.
    """
    if task not in _STREAMS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_STREAMS)}")
    sizes = sizes or TaskSizes()
    key = tasks_hash(task, spec, sizes, seed)
    root = Path(cache_dir) / f"synthetic_{task}_{key}"
    if (root / "manifest.json").is_file():
        return TaskFiles(root)
    tmp = Path(cache_dir) / f".synthetic_{task}_{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = _build(tmp, task, spec, sizes, seed)
    _write(tmp, "manifest.json", {"hash": key, "task": task, "spec": spec.to_dict(),
                                  "sizes": sizes.__dict__,
                                  "seed": seed, "counts": counts})
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic %s stand-in at %s: %s", task, root, counts)
    return TaskFiles(root)
