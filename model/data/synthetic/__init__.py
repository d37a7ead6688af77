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

The package: ``spec.py`` (colours, shapes, relations, the spec and the scene types),
``scenes.py`` (scene sampling), ``captions.py`` (captions, hard negatives), ``render.py``
(pixels and object boxes), ``files.py`` (writing and caching a set); ``python -m
model.cli.synthetic`` writes one from the command line.

Files written under ``root`` (image paths in the JSON files are relative to ``root``):
``images/{train,val,test}/NNNNNN.png``, ``train.json`` (pre-training format), ``val.json`` and
``test.json`` (retrieval-evaluation format), ``test_coco.json`` (COCO captions format),
``test_negatives.json``, ``test_boxes.json`` (every test image's first caption and the box of
each object it names, for scoring Grad-CAM localisation), ``vocab.txt`` and ``manifest.json``
(written last; it caches the set).
"""

from __future__ import annotations

from model.data.synthetic.captions import (
    hard_negatives,
    opposite_relation,
    relation_caption,
    scene_captions,
)
from model.data.synthetic.files import SyntheticPaths, generate
from model.data.synthetic.render import render_scene, render_scene_with_boxes
from model.data.synthetic.scenes import enumerate_scenes, sample_eval_scenes, sample_train_scenes
from model.data.synthetic.spec import (
    PALETTE,
    RELATIONS,
    SUPPORTED_SHAPES,
    Scene,
    SceneObject,
    SyntheticSpec,
)

__all__ = [
    "PALETTE", "RELATIONS", "SUPPORTED_SHAPES", "Scene", "SceneObject", "SyntheticPaths",
    "SyntheticSpec", "enumerate_scenes", "generate", "hard_negatives", "opposite_relation",
    "relation_caption", "render_scene", "render_scene_with_boxes", "sample_eval_scenes",
    "sample_train_scenes", "scene_captions",
]
