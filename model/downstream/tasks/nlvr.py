"""NLVR2 (ALBEF's Pretrain_nlvr.py + NLVR.py): is a statement true of a pair of images?

The doubled fusion stack (:class:`PairFusionEncoder`) and a 2-way MLP; first ALBEF's
text-assignment (TA) step at the pre-training resolution (a 3-way head: which of two images, or
neither, a caption belongs to), then fine-tuning; dev and test-P accuracy of the best-dev epoch.
A released TA file (``pretrain_model_nlvr.pth``) starts fine-tuning directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from model.albef import ALBEF
from model.build import build_albef, resolve_vocab_size
from model.checkpoints import AllowRule, LoadReport, apply_state
from model.config.schema import ExperimentConfig, TrainConfig
from model.config.task import TaskConfig
from model.data.datasets import PretrainDataset
from model.data.synthetic import Scene, SceneObject
from model.data.synthetic_tasks import Scenes, StandIn, has_object, object_name
from model.data.task_data import NLVRDataset, load_nlvr
from model.data.transforms import build_transform
from model.downstream.backbone import Backbones, load_backbones
from model.downstream.data import make_loader
from model.downstream.finetune import train_epochs, wrap_ddp
from model.downstream.heads import PairFusionEncoder
from model.downstream.keymap import map_official_task_state
from model.downstream.models import NLVRModel
from model.downstream.objective import TextAssignmentObjective
from model.downstream.tasks.base import ClassifyTask, TaskRun, task_bert_config
from model.engine.data import DataSources, crop_scale, resolve_sources
from model.engine.distributed import DistInfo

REASON_TA_HEAD = ("the text-assignment step's 3-way head and its vision_proj are not part of "
                  "the NLVR2 model (ALBEF loads the TA checkpoint with strict=False)")
REASON_NEW_HEAD = "the NLVR2 classifier is new (randomly initialised, as in ALBEF)"


def is_ta_state(state: Mapping[str, Tensor]) -> bool:
    """ALBEF's released text-assignment file (``pretrain_model_nlvr.pth``): NLVR2 starts from
    it without running the TA step again."""
    return any(k.startswith("ta_head.") for k in state)


def pair_model(albef: ALBEF, bert_cfg: Any, n_classes: int, with_proj: bool) -> NLVRModel:
    """The pair network from an ALBEF's modules (deep-copied); the TA network keeps
    ``vision_proj`` for its image sampling."""
    visual = copy.deepcopy(albef.visual_encoder)
    text = copy.deepcopy(albef.text_encoder)
    pair = PairFusionEncoder.from_fusion(albef.fusion_encoder)
    proj = copy.deepcopy(albef.vision_proj) if with_proj else None
    return NLVRModel(visual, text, pair, bert_cfg.hidden_size, n_classes, vision_proj=proj)


def ta_to_nlvr(ta_state: Mapping[str, torch.Tensor], template: ALBEF, bert_cfg,
               source: str = "text-assignment model", fmt: str = "ours",
               ) -> tuple[nn.Module, LoadReport]:
    """The NLVR2 model at the fine-tuning resolution, loaded (loudly, pos_embed interpolated)
    from a TA-trained state in the task naming: its encoders carry over, the head is new."""
    model = NLVR.model(template, bert_cfg)
    rules = [AllowRule("unexpected", "cls_head.*", REASON_TA_HEAD),
             AllowRule("unexpected", "vision_proj.*", REASON_TA_HEAD),
             AllowRule("missing", "cls_head.*", REASON_NEW_HEAD)]
    report = apply_state(model, ta_state, LoadReport(source, fmt), rules=rules)
    return model, report


def build_ta_loader(cfg: ExperimentConfig, task: TaskConfig, sources: DataSources, tokenizer,
                    dist: DistInfo, image_size: int) -> DataLoader:
    """Pre-training (image, caption) pairs for the TA step, at the pre-training resolution with
    the pre-training transform (ALBEF's Pretrain_nlvr.py)."""
    from model.data.collate import PretrainCollate

    files = tuple(Path(f) for f in task.ta.train_files) or sources.train_files
    if not files:
        raise ValueError("nlvr2's text-assignment step reads ALBEF caption files and the cell "
                         "has none (data.format = shards): set task.ta.train_files")
    tf = build_transform("pretrain", image_size, hflip=cfg.data.hflip,
                         crop_scale=crop_scale(cfg), randaugment=cfg.data.randaugment)
    ds = PretrainDataset(files, sources.image_root, tf, cfg.data.max_words)
    collate = PretrainCollate(tokenizer, cfg.data.max_tokens, truncation=True)
    return make_loader(ds, task.ta.batch_size, collate, True, cfg, dist, cfg.train.seed)


def _ta_train_config(cfg: ExperimentConfig, task: TaskConfig) -> TrainConfig:
    ta = task.ta
    return replace(cfg.train, epochs=ta.epochs, lr=ta.lr, min_lr=ta.min_lr,
                   warmup_lr=ta.warmup_lr, warmup_steps=ta.warmup_steps,
                   batch_size=ta.batch_size, max_steps=ta.max_steps, schedule="albef")


def _rename_image(collate: Callable) -> Callable:
    def call(items):
        batch = collate(items)
        batch["images"] = batch.pop("image")
        return batch
    return call


def run_text_assignment(cfg: ExperimentConfig, task: TaskConfig, backbones: Backbones,
                        bert_cfg, tokenizer, dist_info: DistInfo, metrics: Path | None
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """The TA step at the checkpoint's resolution; returns the trained 18-layer model."""
    model = pair_model(backbones.student, bert_cfg, 3, with_proj=True).to(dist_info.device)
    objective = TextAssignmentObjective(model, None, cfg.model.momentum,
                                        seed=cfg.train.seed + dist_info.rank)
    size = backbones.student.visual_encoder.patch_embed.img_size[0]  # the checkpoint's
    loader = build_ta_loader(cfg, task, resolve_sources(cfg), tokenizer, dist_info, size)
    loader.collate_fn = _rename_image(loader.collate_fn)
    steps = train_epochs(objective, wrap_ddp(objective, dist_info), loader,
                         _ta_train_config(cfg, task), 0.0, False, dist_info, metrics, "ta")
    return model, {"ta_steps": steps, "ta_pairs": len(loader.dataset)}


# ------------------------------------------------------------------ the synthetic stand-in
# ``both images contain a <colour> <shape>`` / ``only one image contains ...``: the label needs
# both images; each template is True for half of its pairs.
def _scene_with(scenes: Scenes, rng: np.random.Generator, target: SceneObject, wanted: bool
                ) -> Scene:
    while True:  # rejection sampling; each outcome has probability >= ~1/6 for the defaults
        scene = scenes.draw(rng)
        if has_object(scene, target.colour, target.shape) == wanted:
            return scene


def nlvr_example(scenes: Scenes, rng: np.random.Generator) -> tuple[Scene, Scene, str, bool]:
    """(left scene, right scene, statement, label) of one stand-in example."""
    spec = scenes.spec
    target = SceneObject(spec.colours[int(rng.integers(len(spec.colours)))],
                         spec.shapes[int(rng.integers(len(spec.shapes)))], spec.sizes[0])
    label = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        sentence = f"both images contain a {object_name(target)}"
        left_has = bool(label or rng.random() < 0.5)
        right_has = label or not left_has and rng.random() < 0.5
    else:
        sentence = f"only one image contains a {object_name(target)}"
        left_has = bool(rng.random() < 0.5)
        right_has = (not left_has) if label else left_has
    return (_scene_with(scenes, rng, target, left_has),
            _scene_with(scenes, rng, target, bool(right_has)), sentence, label)


def _draw(scenes: Scenes, rng: np.random.Generator, split: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        left, right, sentence, label = nlvr_example(scenes, rng)
        images = [scenes.save(left, rng, f"images/nlvr_{split}/{i:06d}_0.png"),
                  scenes.save(right, rng, f"images/nlvr_{split}/{i:06d}_1.png")]
        out.append({"images": images, "sentence": sentence, "label": str(label)})
    return out


STAND_IN = StandIn("nlvr", stream=12, draw=_draw)


class NLVRTask(ClassifyTask):
    name = "nlvr"
    splits = ("dev", "test-P")
    stand_in = STAND_IN
    text_and_label = ("sentence", "label")
    loader_fn = staticmethod(load_nlvr)
    dataset_cls = NLVRDataset

    def model(self, albef, bert_cfg):
        return pair_model(albef, bert_cfg, 2, with_proj=False)

    def ta_model(self, albef: ALBEF, bert_cfg: Any) -> NLVRModel:
        """The text-assignment network: 3-way head, ``vision_proj`` kept."""
        return pair_model(albef, bert_cfg, 3, with_proj=True)

    def fine_tuned_objective(self, run, state, source, init_size):
        if is_ta_state(state):
            return self._from_ta_file(run, state, source)
        if not run.task.ta.enabled:
            return super().fine_tuned_objective(run, state, source, init_size)
        cfg, task, tok, device = run.cfg, run.task, run.tokenizer, run.dist_info.device
        bert_cfg = task_bert_config(run)
        backbones = load_backbones(cfg, state, source, tok.vocab_size, tok.pad_id, init_size,
                                   with_mlm=False, want_teacher=False)
        # the NLVR2 model is rebuilt at the fine-tuning resolution after the TA step
        template = build_albef(cfg.model, resolve_vocab_size(cfg.model, tok.vocab_size),
                               tok.pad_id, with_mlm=False)
        backbones.student.to(device)
        ta_model, info = run_text_assignment(cfg, task, backbones, bert_cfg, tok, run.dist_info,
                                             run.metrics)
        student, report = ta_to_nlvr(ta_model.cpu().state_dict(), template, bert_cfg)
        info["ta_to_nlvr_load"] = report.to_text()
        teacher = copy.deepcopy(student) if task.distill else None
        info["teacher_init"] = "copy of the TA-trained student" if teacher is not None else "none"
        objective = self.objective(task, student, teacher, cfg, tok.pad_id, run.dist_info.rank)
        info["load_reports"] = [r.to_text() for r in backbones.reports]
        return objective.to(device), info

    def _from_ta_file(self, run: TaskRun, state: Mapping[str, Tensor], source: str):
        cfg, task, tok = run.cfg, run.task, run.tokenizer
        bert_cfg = task_bert_config(run)
        template = build_albef(cfg.model, resolve_vocab_size(cfg.model, tok.vocab_size),
                               tok.pad_id, with_mlm=False)
        mapped = map_official_task_state(state, cfg.model.text.text_layers)
        student, report = ta_to_nlvr(mapped.state, template, bert_cfg, source,
                                     "official ALBEF text-assignment")
        teacher = copy.deepcopy(student) if task.distill else None
        objective = self.objective(task, student, teacher, cfg, tok.pad_id, run.dist_info.rank)
        info = {"load_reports": [report.to_text()], "ta_steps": 0,
                "ta": "skipped: the checkpoint is a text-assignment model",
                "teacher_init": "copy of the loaded student" if teacher is not None else "none"}
        return objective.to(run.dist_info.device), info


NLVR = NLVRTask()
