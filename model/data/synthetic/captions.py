"""Captions (five templates per scene) and the compositional hard negatives (colour, shape and
relation swaps; a reference caption of another scene)."""

from __future__ import annotations

import dataclasses

import numpy as np

from model.data.synthetic.spec import RELATIONS, SIDES, Scene, SceneObject


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
