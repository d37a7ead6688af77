"""SNLI-VE (ALBEF's VE.py): entailment / neutral / contradiction of a statement about an image;
a 3-way MLP on the fused [CLS]; val and test accuracy of the best-val epoch."""

from __future__ import annotations

import copy

from model.data.task_data import VEDataset, load_ve
from model.downstream.models import VEModel
from model.downstream.tasks.base import ClassifyTask


class VETask(ClassifyTask):
    name = "ve"
    splits = ("val", "test")
    loader_fn = staticmethod(load_ve)
    dataset_cls = VEDataset
    n_classes = 3

    def model(self, albef, bert_cfg):
        return VEModel(copy.deepcopy(albef.visual_encoder), copy.deepcopy(albef.text_encoder),
                       copy.deepcopy(albef.fusion_encoder), bert_cfg.hidden_size, self.n_classes)


VE = VETask()
