"""A synthetic, compositional image-caption dataset written in ALBEF's file formats.

Scenes hold one or two coloured shapes on a mildly textured, noisy background. Two-object scenes
put the objects in clearly separated halves of the image (left/right or top/bottom, with jitter
along the other axis), so a spatial relation is visible at the granularity of 8x8 patches on a
32 px image. Objects span 40% ("small") or 48% ("large") of the image side, so even a small
triangle covers more than one patch's area (8x8 at 32 px).

Captions come from five templates per scene (three of them state the relation, phrased from
either object so that "A left of B" and "B right of A" both occur). The test split comes with
compositional hard negatives that a bag-of-words model cannot separate from the truth:

* colour swap: the two objects exchange colours (same bag of words);
* shape swap: the two objects exchange shapes (same bag of words);
* relation swap: left <-> right or above <-> below (same bag of words as the true caption
  phrased from the other object).

Files written under ``root`` (image paths in the JSON files are relative to ``root``):
``images/{train,val,test}/NNNNNN.png``, ``train.json`` (pre-training format), ``val.json`` and
``test.json`` (retrieval-evaluation format), ``test_coco.json`` (COCO captions format),
``test_negatives.json``, ``test_boxes.json`` (every test image's first caption and the box of
each object it names, for scoring Grad-CAM localisation), ``vocab.txt`` and ``manifest.json``
(written last; it caches the set).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.data.tokenizer import build_wordpiece_vocab

logger = logging.getLogger(__name__)

# 2: test_boxes.json (object boxes of every test image); 3: a "random" reference negative in
# test_negatives.json.
FORMAT_VERSION = 3

# The six default colours have hues about 60 degrees apart, so that the strong view's hue
# jitter (up to 0.1 of the colour circle) rarely turns one named colour into another. Orange and
# white are optional extras that give up part of that margin.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (225, 205, 35),
    "green": (40, 175, 60),
    "cyan": (35, 195, 205),
    "blue": (45, 75, 225),
    "purple": (165, 55, 205),
    "orange": (240, 135, 30),
    "white": (235, 235, 235),
}
SUPPORTED_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Per axis: (phrase for the first object, i.e. left/top, phrase for the second object).
RELATIONS: dict[str, tuple[str, str]] = {
    "horizontal": ("to the left of", "to the right of"),
    "vertical": ("above", "below"),
}
SIDES: dict[str, tuple[str, str]] = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
N_TEMPLATES = 5
CAPTION_STYLES = ("mixed", "full", "relational")
# Shapes are drawn at this multiple of the image size and box-filtered down: clean anti-aliased
# edges at 32 px without hand-written rasterisation.
_SUPERSAMPLE = 4
_TEXTURE_GRID = 4  # background texture: a 4x4 grid of random tints, smoothly interpolated
_PNG_COMPRESS_LEVEL = 6  # fixed explicitly: PNG bytes must not depend on a Pillow default
_SPLIT_CODES = {"eval_scenes": 1, "train_scenes": 2, "train": 3, "val": 4, "test": 5}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset; the same spec gives the same files.

    Attributes:
        seed: Master seed for scene sampling and rendering.
        n_train_images: Training images (scenes sampled with replacement, each rendered anew).
        n_test_images: Test images; their scene descriptions are all distinct, and distinct
            from the validation ones, so retrieval ground truth is unambiguous.
        n_val_images: Validation images (0 for none).
        captions_per_image: How many of the five caption templates each image gets (1..5).
        image_size: Side of the square images in pixels (at least 16).
        colours: Colour names (keys of ``PALETTE``); at least two.
        shapes: Shape names (from ``SUPPORTED_SHAPES``); at least two.
        sizes: Size words, e.g. ("small", "large").
        size_fractions: Object extent as a fraction of the image side, one per size (<= 0.5
            so that an object fits in half of the image).
        relation_axes: "horizontal" (left of / right of) and/or "vertical" (above / below).
        single_object_fraction: Probability that a scene holds a single object.
        noise_std: Per-pixel Gaussian noise (grey levels).
        texture_std: Strength of the low-frequency background texture (grey levels).
        colour_jitter: Maximum per-channel deviation of an object's colour (grey levels).
        holdout_eval_scenes: If True, no training image shows a scene description used in test
            or validation (a compositional-generalisation split). By default training images
            are independent renders that may repeat an evaluation description.
        caption_style: "mixed": five templates of which two leave out sizes, one the relation
            and one an object (so one caption can be true of several scenes); "full": every
            caption names every object's size, colour and shape and, with two objects, the
            relation, in five phrasings (a caption is true of its scene description only).
    """

    seed: int = 0
    n_train_images: int = 4000
    n_test_images: int = 500
    n_val_images: int = 200
    captions_per_image: int = 5
    image_size: int = 32
    colours: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    sizes: tuple[str, ...] = ("small", "large")
    size_fractions: tuple[float, ...] = (0.4, 0.48)
    relation_axes: tuple[str, ...] = ("horizontal", "vertical")
    single_object_fraction: float = 0.1
    noise_std: float = 8.0
    texture_std: float = 10.0
    colour_jitter: int = 15
    holdout_eval_scenes: bool = False
    caption_style: str = "mixed"

    def __post_init__(self) -> None:
        """Reject specs that cannot be generated, naming the field."""
        _check(self.n_train_images >= 1, "n_train_images", "at least 1", self.n_train_images)
        _check(self.n_test_images >= 1, "n_test_images", "at least 1", self.n_test_images)
        _check(self.n_val_images >= 0, "n_val_images", "at least 0", self.n_val_images)
        _check(
            1 <= self.captions_per_image <= N_TEMPLATES,
            "captions_per_image",
            f"between 1 and {N_TEMPLATES}",
            self.captions_per_image,
        )
        _check(self.image_size >= 16, "image_size", "at least 16", self.image_size)
        _check_names("colours", self.colours, tuple(PALETTE))
        _check_names("shapes", self.shapes, SUPPORTED_SHAPES)
        _check_names("relation_axes", self.relation_axes, tuple(RELATIONS), minimum=1)
        _check(len(set(self.sizes)) == len(self.sizes) >= 1, "sizes", "distinct words", self.sizes)
        _check(
            len(self.size_fractions) == len(self.sizes)
            and all(0.1 <= f <= 0.5 for f in self.size_fractions),
            "size_fractions",
            "one value in [0.1, 0.5] per size",
            self.size_fractions,
        )
        _check(
            0.0 <= self.single_object_fraction <= 1.0,
            "single_object_fraction",
            "in [0, 1]",
            self.single_object_fraction,
        )
        _check(self.caption_style in CAPTION_STYLES, "caption_style",
               f"one of {list(CAPTION_STYLES)}", self.caption_style)
        for name in ("noise_std", "texture_std", "colour_jitter"):
            _check(getattr(self, name) >= 0, name, "non-negative", getattr(self, name))

    def to_dict(self) -> dict[str, object]:
        """The spec as JSON-ready data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        """A short digest of the spec and the file-format version (the cache key)."""
        payload = json.dumps({"format": FORMAT_VERSION, "spec": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _check(ok: bool, field: str, expected: str, got: object) -> None:
    """Raise a ValueError naming the SyntheticSpec field when ``ok`` is False."""
    if not ok:
        raise ValueError(f"SyntheticSpec.{field}: expected {expected}, got {got!r}")


def _check_names(field: str, names: Sequence[str], known: Sequence[str], minimum: int = 2) -> None:
    """Check a tuple of names: known, distinct, and at least ``minimum`` of them."""
    unknown = [name for name in names if name not in known]
    _check(not unknown, field, f"names from {list(known)}", tuple(names))
    _check(len(set(names)) == len(names), field, "distinct names", tuple(names))
    _check(len(names) >= minimum, field, f"at least {minimum} names", tuple(names))


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives. ``root`` is the image root of every JSON file."""

    root: Path
    train_file: Path
    test_file: Path
    val_file: Path | None
    coco_file: Path
    negatives_file: Path
    boxes_file: Path
    vocab_file: Path
    manifest_file: Path


@dataclass(frozen=True)
class SceneObject:
    """One shape: its attributes, the words captions use for it."""

    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, ``objects[0]`` is the left (or top) one along ``axis``."""

    objects: tuple[SceneObject, ...]
    axis: str | None = None


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _all_objects(spec: SyntheticSpec) -> list[SceneObject]:
    """Every (size, colour, shape) combination, in a fixed order."""
    return [
        SceneObject(colour=c, shape=s, size=z)
        for z in spec.sizes
        for c in spec.colours
        for s in spec.shapes
    ]


def enumerate_scenes(spec: SyntheticSpec) -> tuple[list[Scene], list[Scene]]:
    """All distinct scene descriptions: (single-object scenes, two-object scenes).

    The two objects of a scene differ in colour **and** in shape, so that swapping colours or
    shapes between them always yields a false caption.
    """
    objects = _all_objects(spec)
    singles = [Scene(objects=(obj,)) for obj in objects]
    pairs = [
        Scene(objects=(first, second), axis=axis)
        for axis in spec.relation_axes
        for first in objects
        for second in objects
        if first.colour != second.colour and first.shape != second.shape
    ]
    return singles, pairs


def _sample_train_scenes(spec: SyntheticSpec, held_out: Sequence[Scene] = ()) -> list[Scene]:
    """Training scenes, drawn independently (with replacement), never one of ``held_out``."""
    excluded = set(held_out)
    singles, pairs = (
        [scene for scene in pool if scene not in excluded] for pool in enumerate_scenes(spec)
    )
    if not pairs:
        raise ValueError("SyntheticSpec: the held-out evaluation scenes leave no training scenes")
    rng = _rng(spec, "train_scenes")
    is_single = rng.random(spec.n_train_images) < spec.single_object_fraction
    if not singles:  # all single-object scenes were held out for evaluation
        is_single[:] = False
    picks = rng.integers(0, len(pairs), spec.n_train_images)
    single_picks = rng.integers(0, max(1, len(singles)), spec.n_train_images)
    return [
        singles[j] if one else pairs[i]
        for one, i, j in zip(is_single, picks, single_picks, strict=True)
    ]


def _sample_eval_scenes(spec: SyntheticSpec) -> tuple[list[Scene], list[Scene]]:
    """Test and validation scenes: all distinct descriptions, single-object share as specified.

    Raises:
        ValueError: If the spec's vocabulary has fewer distinct scenes than requested.
    """
    singles, pairs = enumerate_scenes(spec)
    scenes = singles + pairs
    frac = spec.single_object_fraction
    weights = np.array(
        [frac / len(singles)] * len(singles) + [(1 - frac) / len(pairs)] * len(pairs)
    )
    wanted = spec.n_test_images + spec.n_val_images
    available = int(np.count_nonzero(weights))
    if wanted > available:
        raise ValueError(
            f"SyntheticSpec: n_test_images + n_val_images = {wanted} exceeds the {available} "
            "distinct scene descriptions of this spec; add colours/shapes or ask for fewer images"
        )
    rng = _rng(spec, "eval_scenes")
    chosen = rng.choice(len(scenes), size=wanted, replace=False, p=weights / weights.sum())
    # Weighted sampling without replacement draws the heavier single-object scenes early;
    # shuffling spreads them evenly over test and validation.
    picked = [scenes[int(i)] for i in rng.permutation(chosen)]
    return picked[: spec.n_test_images], picked[spec.n_test_images :]


def _rng(spec: SyntheticSpec, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, so e.g. n_train does not change test images."""
    return np.random.default_rng(np.random.SeedSequence([spec.seed, _SPLIT_CODES[stream]]))


# ---------------------------------------------------------------------------------------------
# Captions and hard negatives


def _full(obj: SceneObject) -> str:
    """``size colour shape``."""
    return f"{obj.size} {obj.colour} {obj.shape}"


def _short(obj: SceneObject) -> str:
    """``colour shape``."""
    return f"{obj.colour} {obj.shape}"


def relation_caption(subject: SceneObject, relation: str, other: SceneObject) -> str:
    """The main two-object template: ``a <size colour shape> <relation> a <size colour shape>``."""
    return f"a {_full(subject)} {relation} a {_full(other)}"


def _oriented(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, str, SceneObject]:
    """Describe a two-object scene from a randomly chosen object: (subject, relation, other)."""
    first, second = scene.objects
    forward, backward = RELATIONS[str(scene.axis)]
    if rng.random() < 0.5:
        return first, forward, second
    return second, backward, first


Triple = tuple[SceneObject, str, SceneObject]


def scene_captions(
    scene: Scene, count: int, rng: np.random.Generator, style: str = "mixed"
) -> tuple[list[str], Triple | None]:
    """The first ``count`` template captions of a scene (``style``: see ``SyntheticSpec``).

    Returns:
        The captions, and for a two-object scene the (subject, relation, other) triple that the
        first caption states (the hard negatives are built from it); None for one object.
    """
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        if style in ("full", "relational"):
            captions = [
                f"a {_full(obj)}",
                f"there is a {_full(obj)}",
                f"the {obj.shape} is {obj.size} and {obj.colour}",
                f"a single {_full(obj)}",
                f"one {_full(obj)}",
            ]
            return captions[:count], None
        captions = [
            f"a {_full(obj)}",
            f"there is a {_short(obj)}",
            f"the {obj.shape} is {obj.colour}",
            f"a single {obj.size} {obj.shape} that is {obj.colour}",
            f"one {_short(obj)}",
        ]
        return captions[:count], None
    main = _oriented(scene, rng)
    s2, r2, o2 = _oriented(scene, rng)
    s3, r3, o3 = _oriented(scene, rng)
    if style in ("full", "relational"):
        # Every caption states both objects and the relation; "relational" names sizes only
        # in the first (main) caption.
        name = _full if style == "full" else _short
        s4, r4, o4 = _oriented(scene, rng)
        s5, r5, o5 = _oriented(scene, rng)
        captions = [
            relation_caption(*main),
            f"there is a {name(s2)} {r2} a {name(o2)}",
            f"the {name(s3)} is {r3} the {name(o3)}",
            f"a {name(o4)} with a {name(s4)} {r4} it",
            f"{r5} a {name(o5)} is a {name(s5)}",
        ]
        return captions[:count], main
    x, y = scene.objects if rng.random() < 0.5 else scene.objects[::-1]
    side_index = int(rng.integers(0, 2))
    lone = scene.objects[side_index]
    captions = [
        relation_caption(*main),
        f"there is a {_short(s2)} {r2} a {_short(o2)}",
        f"the {_short(s3)} is {r3} the {_short(o3)}",
        f"a {_full(x)} and a {_full(y)}",
        f"a {_short(lone)} on the {SIDES[str(scene.axis)][side_index]}",
    ]
    return captions[:count], main


def opposite_relation(relation: str) -> str:
    """left of <-> right of, above <-> below."""
    for forward, backward in RELATIONS.values():
        if relation == forward:
            return backward
        if relation == backward:
            return forward
    raise ValueError(f"unknown relation phrase {relation!r}")


def hard_negatives(subject: SceneObject, relation: str, other: SceneObject) -> dict[str, str]:
    """Colour-, shape- and relation-swapped versions of ``relation_caption(subject, ...)``."""
    colour_swapped = (
        dataclasses.replace(subject, colour=other.colour),
        dataclasses.replace(other, colour=subject.colour),
    )
    shape_swapped = (
        dataclasses.replace(subject, shape=other.shape),
        dataclasses.replace(other, shape=subject.shape),
    )
    return {
        "colour": relation_caption(colour_swapped[0], relation, colour_swapped[1]),
        "shape": relation_caption(shape_swapped[0], relation, shape_swapped[1]),
        "relation": relation_caption(subject, opposite_relation(relation), other),
    }


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) matrix of linear-interpolation weights (pixel centres, edges clamped)."""
    positions = (np.arange(size) + 0.5) * coarse / size - 0.5
    basis = np.eye(coarse)
    return np.stack([np.interp(positions, np.arange(coarse), basis[k]) for k in range(coarse)], 1)


def _background(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """A grey, slightly tinted background with a smooth low-frequency texture, float32 HxWx3."""
    grey = rng.uniform(70.0, 130.0)
    tint = rng.uniform(-10.0, 10.0, 3)
    coarse = rng.normal(0.0, spec.texture_std, (_TEXTURE_GRID, _TEXTURE_GRID, 3))
    # Bilinear upsampling of a 4x4 grid gives blobs larger than a patch: texture, not a cue.
    # Done as two small matrix products, which is much cheaper per image than image resizes.
    up = _upsampling_matrix(spec.image_size, _TEXTURE_GRID)
    texture = (up @ coarse.transpose(2, 0, 1) @ up.T).transpose(1, 2, 0)
    return (grey + tint + texture).astype(np.float32)


def _place(
    scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Centre (x, y) and extent in pixels of every object.

    With two objects, the first lies entirely in the left (top) half and the second entirely in
    the right (bottom) half, so the relation never depends on a pixel or two; the position along
    the other axis is free.
    """
    size = float(spec.image_size)
    placed = []
    for k, obj in enumerate(scene.objects):
        extent = spec.size_fractions[spec.sizes.index(obj.size)] * size
        radius = extent / 2
        if scene.axis is None:
            lo, hi = radius, size - radius
        elif k == 0:
            lo, hi = radius, size / 2 - radius
        else:
            lo, hi = size / 2 + radius, size - radius
        along = rng.uniform(lo, max(lo, hi))
        across = rng.uniform(radius, size - radius)
        x, y = (across, along) if scene.axis == "vertical" else (along, across)
        placed.append((x, y, extent))
    return placed


def _shape_alpha(shape: str, x: float, y: float, extent: float, size: int) -> np.ndarray:
    """Coverage (0..1, float32 HxW) of one shape, drawn supersampled and box-filtered down."""
    k = _SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = x * k, y * k, extent * k / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = 0.89 * r  # about the circle's area, so shape is not read off the area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SUPPORTED_SHAPES}")
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


Box = tuple[float, float, float, float]


def render_scene(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: background, objects (jittered colours), then pixel noise. uint8 HxWx3."""
    return render_scene_with_boxes(scene, spec, rng)[0]


def render_scene_with_boxes(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
                            ) -> tuple[np.ndarray, list[Box]]:
    """:func:`render_scene` plus each object's box ``(x0, y0, x1, y1)`` in pixels.

    The box is the square of side ``extent`` centred on the object: the circle's and the
    triangle's bounding box exactly, a little larger than the square (drawn at 0.89 of it).
    """
    canvas = _background(spec, rng)
    boxes: list[Box] = []
    for obj, (x, y, extent) in zip(scene.objects, _place(scene, spec, rng), strict=True):
        alpha = _shape_alpha(obj.shape, x, y, extent, spec.image_size)[:, :, None]
        jitter = rng.uniform(-spec.colour_jitter, spec.colour_jitter, 3)
        colour = np.asarray(PALETTE[obj.colour], dtype=np.float32) + jitter
        canvas = canvas * (1.0 - alpha) + colour * alpha
        half = extent / 2
        boxes.append((x - half, y - half, x + half, y + half))
    canvas = canvas + rng.normal(0.0, spec.noise_std, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class _Record:
    """One rendered image: its path relative to the root, captions, and main relation triple."""

    image: str
    captions: list[str]
    main: Triple | None
    objects: tuple[SceneObject, ...] = ()
    boxes: tuple[Box, ...] = ()


def _render_split(
    split: str, scenes: list[Scene], spec: SyntheticSpec, root: Path
) -> list[_Record]:
    """Render and save one split's images; captions are drawn from the same stream."""
    rng = _rng(spec, split)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(scenes):
        captions, main = scene_captions(scene, spec.captions_per_image, rng,
                                        spec.caption_style)
        pixels, boxes = render_scene_with_boxes(scene, spec, rng)
        relative = f"images/{split}/{index:06d}.png"
        Image.fromarray(pixels).save(
            root / relative, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
        )
        records.append(_Record(image=relative, captions=captions, main=main,
                               objects=scene.objects, boxes=tuple(boxes)))
    return records


def _write_json(path: Path, data: object) -> None:
    """Deterministic JSON (insertion order, fixed indent, trailing newline)."""
    path.write_text(json.dumps(data, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")


def _caption_entries(records: list[_Record]) -> list[dict[str, object]]:
    """ALBEF's caption-file entries: {"image": path, "caption": [captions]}."""
    return [{"image": r.image, "caption": list(r.captions)} for r in records]


def _coco_captions(records: list[_Record], size: int) -> dict[str, object]:
    """The COCO captions format; image ids follow the order of ``test.json`` (starting at 1)."""
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record.image, "width": size, "height": size})
        for caption in record.captions:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "caption": caption}
            )
    info = {
        "description": "synthetic compositional shapes (test split)",
        "version": str(FORMAT_VERSION),
    }
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


def _negative_entries(records: list[_Record]) -> list[dict[str, object]]:
    """Hard negatives for every two-object image, plus an easy reference negative ("random":
    the main caption of the two-object image half the list away, a different scene since test
    descriptions are distinct): accuracy on it says whether ITM matches at all."""
    pairs = [r for r in records if r.main is not None]
    return [
        {
            "image": r.image,
            "caption": relation_caption(*r.main),
            "negatives": {
                **hard_negatives(*r.main),
                **({"random": relation_caption(*pairs[(i + len(pairs) // 2) % len(pairs)].main)}
                   if len(pairs) > 1 else {}),
            },
        }
        for i, r in enumerate(pairs)
    ]


def _box_entries(records: list[_Record]) -> list[dict[str, object]]:
    """Every image's first caption and, per object, its words and box (pixels, x0 y0 x1 y1)."""
    return [
        {
            "image": r.image,
            "caption": r.captions[0],
            "objects": [
                {"colour": o.colour, "shape": o.shape, "size": o.size,
                 "box": [round(v, 3) for v in box]}
                for o, box in zip(r.objects, r.boxes, strict=True)
            ],
        }
        for r in records
    ]


def _split_counts(records: list[_Record]) -> dict[str, int]:
    """Images, captions and the one/two-object breakdown of a split (for the manifest)."""
    two = sum(r.main is not None for r in records)
    return {
        "images": len(records),
        "captions": sum(len(r.captions) for r in records),
        "single_object": len(records) - two,
        "two_object": two,
    }


_FILE_NAMES = {
    "train": "train.json",
    "val": "val.json",
    "test": "test.json",
    "coco": "test_coco.json",
    "negatives": "test_negatives.json",
    "boxes": "test_boxes.json",
    "vocab": "vocab.txt",
}


def _paths(root: Path, has_val: bool) -> SyntheticPaths:
    """The dataset's file layout under ``root``."""
    return SyntheticPaths(
        root=root,
        train_file=root / _FILE_NAMES["train"],
        test_file=root / _FILE_NAMES["test"],
        val_file=root / _FILE_NAMES["val"] if has_val else None,
        coco_file=root / _FILE_NAMES["coco"],
        negatives_file=root / _FILE_NAMES["negatives"],
        boxes_file=root / _FILE_NAMES["boxes"],
        vocab_file=root / _FILE_NAMES["vocab"],
        manifest_file=root / "manifest.json",
    )


def _read_manifest(path: Path) -> dict[str, object] | None:
    """The existing manifest, {} if it is unreadable, None if there is none."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable synthetic manifest %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _is_complete(paths: SyntheticPaths) -> bool:
    """Whether every file of a generated dataset is present."""
    files = [
        paths.train_file,
        paths.test_file,
        paths.coco_file,
        paths.negatives_file,
        paths.boxes_file,
        paths.vocab_file,
    ]
    if paths.val_file is not None:
        files.append(paths.val_file)
    return all(f.is_file() for f in files) and (paths.root / "images").is_dir()


def _remove_previous(root: Path) -> None:
    """Delete a previous generation's outputs (only called when its manifest proves it is ours)."""
    (root / "manifest.json").unlink(missing_ok=True)
    for name in _FILE_NAMES.values():
        (root / name).unlink(missing_ok=True)
    if (root / "images").is_dir():
        shutil.rmtree(root / "images")


def generate(root: str | Path, spec: SyntheticSpec | None = None) -> SyntheticPaths:
    """Generate the dataset under ``root``, or reuse it if the same spec was generated there.

    The manifest is written last, so an interrupted generation is redone on the next call. A
    different spec over an earlier generation deletes that generation's files first (only files
    this module writes; nothing else in ``root`` is touched). Two processes must not generate
    into the same ``root`` at the same time.

    Args:
        root: Output directory; it becomes the ``image_root`` of every JSON file.
        spec: What to generate (defaults to ``SyntheticSpec()``).

    Returns:
        The paths of the generated files.
    """
    spec = spec if spec is not None else SyntheticSpec()
    root = Path(root)
    paths = _paths(root, has_val=spec.n_val_images > 0)
    previous = _read_manifest(paths.manifest_file)
    if previous is not None and previous.get("spec_hash") == spec.hash() and _is_complete(paths):
        logger.info("synthetic dataset at %s is up to date (spec %s)", root, spec.hash())
        return paths
    start = time.perf_counter()
    test_scenes, val_scenes = _sample_eval_scenes(spec)  # may reject the spec: before any I/O
    held_out = test_scenes + val_scenes if spec.holdout_eval_scenes else []
    if previous is not None:
        logger.info("regenerating synthetic dataset at %s (spec changed or files missing)", root)
        _remove_previous(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _render_split("train", _sample_train_scenes(spec, held_out), spec, root),
        "test": _render_split("test", test_scenes, spec, root),
    }
    if val_scenes:
        splits["val"] = _render_split("val", val_scenes, spec, root)
    manifest = _write_annotations(paths, splits, spec)
    logger.info(
        "generated synthetic dataset at %s in %.1f s: %s",
        root,
        time.perf_counter() - start,
        json.dumps(manifest["counts"]),
    )
    return paths


def _write_annotations(
    paths: SyntheticPaths, splits: dict[str, list[_Record]], spec: SyntheticSpec
) -> dict[str, object]:
    """Write the JSON files, the vocabulary and, last, the manifest (returned)."""
    _write_json(paths.train_file, _caption_entries(splits["train"]))
    _write_json(paths.test_file, _caption_entries(splits["test"]))
    if paths.val_file is not None:
        _write_json(paths.val_file, _caption_entries(splits["val"]))
    _write_json(paths.coco_file, _coco_captions(splits["test"], spec.image_size))
    negatives = _negative_entries(splits["test"])
    _write_json(paths.negatives_file, negatives)
    _write_json(paths.boxes_file, _box_entries(splits["test"]))
    all_captions = [c for records in splits.values() for r in records for c in r.captions]
    build_wordpiece_vocab(all_captions, paths.vocab_file)
    counts: dict[str, object] = {name: _split_counts(records) for name, records in splits.items()}
    counts["test_negatives"] = len(negatives)
    manifest: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "spec_hash": spec.hash(),
        "spec": spec.to_dict(),
        "counts": counts,
        "vocab_size": len(paths.vocab_file.read_text(encoding="utf-8").splitlines()),
        "files": {key: name for key, name in _FILE_NAMES.items() if key != "val" or paths.val_file},
    }
    _write_json(paths.manifest_file, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; defaults come from SyntheticSpec."""
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m model.data.synthetic",
        description="Generate the synthetic compositional image-caption dataset.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (image root)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--n-train", type=int, default=defaults.n_train_images)
    parser.add_argument("--n-test", type=int, default=defaults.n_test_images)
    parser.add_argument("--n-val", type=int, default=defaults.n_val_images)
    parser.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image)
    parser.add_argument(
        "--single-object-fraction", type=float, default=defaults.single_object_fraction
    )
    parser.add_argument(
        "--holdout-eval-scenes",
        action="store_true",
        help="keep test/val scene descriptions out of training (compositional generalisation)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate (or reuse) a dataset and print its counts."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    spec = SyntheticSpec(
        seed=args.seed,
        n_train_images=args.n_train,
        n_test_images=args.n_test,
        n_val_images=args.n_val,
        captions_per_image=args.captions_per_image,
        image_size=args.image_size,
        single_object_fraction=args.single_object_fraction,
        holdout_eval_scenes=args.holdout_eval_scenes,
    )
    paths = generate(args.out, spec)
    manifest = json.loads(paths.manifest_file.read_text(encoding="utf-8"))
    print(f"synthetic dataset at {paths.root} (spec {manifest['spec_hash']})")
    for split, counts in manifest["counts"].items():
        print(f"  {split}: {counts}")
    print(f"  vocab_size: {manifest['vocab_size']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
