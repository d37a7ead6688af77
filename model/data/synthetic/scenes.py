"""Scene sampling: every (colour, shape, size) pair of objects, the held-out evaluation scenes,
and the seeded random streams of each split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.data.synthetic.spec import Scene, SceneObject, SyntheticSpec

SPLIT_CODES = {"eval_scenes": 1, "train_scenes": 2, "train": 3, "val": 4, "test": 5}

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


def sample_train_scenes(spec: SyntheticSpec, held_out: Sequence[Scene] = ()) -> list[Scene]:
    """Training scenes, drawn independently (with replacement), never one of ``held_out``."""
    excluded = set(held_out)
    singles, pairs = (
        [scene for scene in pool if scene not in excluded] for pool in enumerate_scenes(spec)
    )
    if not pairs:
        raise ValueError("SyntheticSpec: the held-out evaluation scenes leave no training scenes")
    rng = split_rng(spec, "train_scenes")
    is_single = rng.random(spec.n_train_images) < spec.single_object_fraction
    if not singles:  # all single-object scenes were held out for evaluation
        is_single[:] = False
    picks = rng.integers(0, len(pairs), spec.n_train_images)
    single_picks = rng.integers(0, max(1, len(singles)), spec.n_train_images)
    return [
        singles[j] if one else pairs[i]
        for one, i, j in zip(is_single, picks, single_picks, strict=True)
    ]


def sample_eval_scenes(spec: SyntheticSpec) -> tuple[list[Scene], list[Scene]]:
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
    rng = split_rng(spec, "eval_scenes")
    chosen = rng.choice(len(scenes), size=wanted, replace=False, p=weights / weights.sum())
    # Weighted sampling without replacement draws the heavier single-object scenes early;
    # shuffling spreads them evenly over test and validation.
    picked = [scenes[int(i)] for i in rng.permutation(chosen)]
    return picked[: spec.n_test_images], picked[spec.n_test_images :]


def split_rng(spec: SyntheticSpec, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, so e.g. n_train does not change test images."""
    return np.random.default_rng(np.random.SeedSequence([spec.seed, SPLIT_CODES[stream]]))
