"""What the synthetic set is made of: colours, shapes, relations, the spec (its cache key),
and the scene types."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

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
