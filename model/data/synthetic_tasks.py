"""The machinery of the downstream tasks' synthetic stand-ins, drawn from the shapes set's scenes.

Each task declares its stand-in (:class:`StandIn`: how one split's records are drawn from scenes)
in its own module (``model/downstream/tasks/``); this module draws the scenes, renders each image
once, gives every task and split its own random stream and writes the files. Deterministic (a
seed and the pre-training set's :class:`SyntheticSpec` fix every byte) and cached next to that
set, in the downstream files' formats (``model/data/task_data.py``): ``<task>_<split>.json``
plus any extra file the task declares (VQA's answer list).
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
    render_scene,
)

log = logging.getLogger(__name__)

TASKS_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class TaskSizes:
    """Images (VE, VQA) or image pairs (NLVR2) per split; the single-object scene share."""

    train: int = 1200
    val: int = 150
    test: int = 300
    single_object_fraction: float = 0.3


def _no_extra_files(spec: SyntheticSpec) -> dict[str, object]:
    return {}


@dataclass(frozen=True)
class StandIn:
    """A task's generated stand-in.

    ``name``: its files' prefix and cache folder (``synthetic_<name>_<hash>``); ``stream``: its
    own random stream (no two tasks share draws); ``draw(scenes, rng, split, n)``: the records of
    one split from ``n`` images (or image pairs); ``per_item``: records per image or pair;
    ``extra_files(spec)``: other files it needs, name -> JSON value.
    """

    name: str
    stream: int
    draw: Callable[[Scenes, np.random.Generator, str, int], list[dict]]
    per_item: int = 1
    extra_files: Callable[[SyntheticSpec], dict[str, object]] = _no_extra_files


@dataclass(frozen=True)
class TaskFiles:
    """The files of one generated stand-in."""

    root: Path
    name: str

    def split(self, split: str) -> Path:
        return self.root / f"{self.name}_{split}.json"


def object_name(o: SceneObject) -> str:
    return f"{o.colour} {o.shape}"


class Scenes:
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


def relation(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, str, SceneObject]:
    """A true (subject, relation, other) statement about a two-object scene."""
    first, second = scene.objects
    forward, backward = RELATIONS[str(scene.axis)]
    return (first, forward, second) if rng.random() < 0.5 else (second, backward, first)


def has_object(scene: Scene, colour: str, shape: str) -> bool:
    return any(o.colour == colour and o.shape == shape for o in scene.objects)


def tasks_hash(task: str, spec: SyntheticSpec, sizes: TaskSizes, seed: int) -> str:
    payload = json.dumps({"format": TASKS_FORMAT_VERSION, "task": task, "spec": spec.hash(),
                          "sizes": sizes.__dict__, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write(root: Path, name: str, data: object) -> None:
    (root / name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _build(tmp: Path, stand_in: StandIn, spec: SyntheticSpec, sizes: TaskSizes, seed: int
           ) -> dict[str, int]:
    scenes = Scenes(spec, tmp, sizes)
    counts: dict[str, int] = {}
    for split in SPLITS:
        # one stream per (seed, task, split): a split's draws never depend on another's size
        rng = np.random.default_rng(np.random.SeedSequence([seed, stand_in.stream,
                                                            SPLIT_SEEDS[split]]))
        entries = stand_in.draw(scenes, rng, split, getattr(sizes, split))
        _write(tmp, f"{stand_in.name}_{split}.json", entries)
        counts[f"{stand_in.name}_{split}"] = len(entries)
    for name, data in stand_in.extra_files(spec).items():
        _write(tmp, name, data)
    return counts


def generate_task(cache_dir: str | Path, stand_in: StandIn, spec: SyntheticSpec,
                  sizes: TaskSizes | None = None, seed: int = 0) -> TaskFiles:
    """Write (or reuse) one task's stand-in under ``cache_dir/synthetic_<name>_<hash>``.

    Written into a temporary directory and renamed into place, so concurrent callers and an
    interrupted generation never leave a half-written set behind.
    """
    sizes = sizes or TaskSizes()
    name = stand_in.name
    key = tasks_hash(name, spec, sizes, seed)
    root = Path(cache_dir) / f"synthetic_{name}_{key}"
    if (root / "manifest.json").is_file():
        return TaskFiles(root, name)
    tmp = Path(cache_dir) / f".synthetic_{name}_{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = _build(tmp, stand_in, spec, sizes, seed)
    _write(tmp, "manifest.json", {"hash": key, "task": name, "spec": spec.to_dict(),
                                  "sizes": sizes.__dict__,
                                  "seed": seed, "counts": counts})
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic %s stand-in at %s: %s", name, root, counts)
    return TaskFiles(root, name)
