"""SNLI-VE (ALBEF's VE.py): entailment / neutral / contradiction of a statement about an image;
a 3-way MLP on the fused [CLS]; val and test accuracy of the best-val epoch."""

from __future__ import annotations

import copy

import numpy as np

from model.data.synthetic import Scene, SyntheticSpec, opposite_relation
from model.data.synthetic_tasks import Scenes, StandIn, relation
from model.data.task_data import VEDataset, load_ve
from model.downstream.models import VEModel
from model.downstream.tasks.base import ClassifyTask


# ------------------------------------------------------------------ the synthetic stand-in
# ``the <shape> is <colour>`` / ``the <shape> is <relation> the <shape>``: entailment when true of
# the scene, contradiction when the named shape is there but the colour or relation is wrong,
# neutral when the named shape is not in the scene (the image cannot settle it). One statement
# per label for every image, so no text-only prior helps.
def ve_statements(scene: Scene, spec: SyntheticSpec, rng: np.random.Generator
                  ) -> list[tuple[str, str]]:
    """One (statement, label) per label for one scene."""
    present = {o.shape: o for o in scene.objects}
    absent = [s for s in spec.shapes if s not in present]
    relational = len(scene.objects) == 2 and rng.random() < 0.5
    if relational:
        subject, rel, other = relation(scene, rng)
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


def _draw(scenes: Scenes, rng: np.random.Generator, split: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        scene = scenes.draw(rng)
        image = scenes.save(scene, rng, f"images/ve_{split}/{i:06d}.png")
        out += [{"image": image, "sentence": s, "label": lab}
                for s, lab in ve_statements(scene, scenes.spec, rng)]
    return out


STAND_IN = StandIn("ve", stream=11, draw=_draw, per_item=3)


class VETask(ClassifyTask):
    name = "ve"
    splits = ("val", "test")
    stand_in = STAND_IN
    text_and_label = ("sentence", "label")
    loader_fn = staticmethod(load_ve)
    dataset_cls = VEDataset
    n_classes = 3

    def model(self, albef, bert_cfg):
        return VEModel(copy.deepcopy(albef.visual_encoder), copy.deepcopy(albef.text_encoder),
                       copy.deepcopy(albef.fusion_encoder), bert_cfg.hidden_size, self.n_classes)


VE = VETask()
