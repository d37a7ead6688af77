"""Fine-tune and evaluate one downstream task from a pre-training checkpoint (ALBEF's VE.py,
NLVR.py + Pretrain_nlvr.py and VQA.py; docs/DOWNSTREAM.md).

Schedule: ALBEF's (``train.schedule = albef``): in epoch 0 a staircase warm-up of
``train.warmup_steps`` plateaus of 100 iterations from ``warmup_lr`` to ``lr`` (its
``warmup_epochs`` are consumed as 100-iteration plateaus), then a per-epoch cosine to ``min_lr``.
Alpha: 0.4, ramped over epoch 0 where ALBEF's ``warm_up`` is on.

Outputs in ``out_dir``: ``metrics.jsonl`` (training and per-epoch evaluation rows),
``result.json`` (the selected epoch's numbers and the provenance), for VQA
``vqa_result.json`` in the official submission format (``[{question_id, answer}]``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from model.albef import ALBEF
from model.checkpoints import AllowRule, LoadReport, apply_state
from model.config.schema import ExperimentConfig, TrainConfig
from model.config.task import TaskConfig
from model.data.task_data import encode_answers
from model.downstream.backbone import Backbones
from model.downstream.data import build_ta_loader
from model.downstream.models import build_task_model
from model.downstream.objective import (
    ClassifyObjective,
    TaskObjective,
    TextAssignmentObjective,
    VQAObjective,
)
from model.engine.data import resolve_sources
from model.engine.distributed import DistInfo
from model.engine.optim import alpha_at, build_optimizer, lr_at, set_lr
from model.engine.run_io import append_jsonl
from model.engine.step import autocast_context, move_batch
from model.engine.tracking import Tracker

log = logging.getLogger(__name__)

# The paper's names of each task's splits, in table order.
SPLIT_NAMES = {"ve": ("val", "test"), "nlvr": ("dev", "test-P"), "vqa": ("test",)}


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    provenance: dict[str, Any]


def _reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_accuracy(objective: ClassifyObjective, loader: DataLoader, device: torch.device
                      ) -> float:
    """Accuracy (%) of the student over every sample of ``loader`` (summed over ranks)."""
    objective.eval()
    correct = total = 0.0
    for batch in loader:
        batch = move_batch(batch, device)
        correct += float((objective.predict(batch) == batch["labels"]).sum())
        total += batch["labels"].numel()
    correct, total = _reduce_sum([correct, total], device)
    objective.train()
    return 100.0 * correct / max(total, 1.0)


@torch.no_grad()
def predict_vqa(objective: VQAObjective, loader: DataLoader, answers: list[str], tokenizer,
                k: int, device: torch.device) -> list[dict[str, Any]]:
    """``[{question_id, answer}]`` for every question of ``loader`` (this rank's share)."""
    objective.eval()
    enc = encode_answers(tokenizer, answers)
    ids, mask = enc["answer_ids"].to(device), enc["answer_mask"].to(device)
    records = loader.dataset.records
    out = []
    for batch in loader:
        batch = move_batch(batch, device)
        top_ids, top_prob = objective.rank(batch, ids, mask, k)
        best = top_ids[torch.arange(top_ids.shape[0]), top_prob.argmax(dim=1)]
        for index, a in zip(batch["index"].tolist(), best.tolist(), strict=True):
            out.append({"question_id": records[index].question_id, "answer": answers[a]})
    objective.train()
    return out


def gather_objects(items: list[Any]) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


@dataclass
class _Log:
    """Where a training loop's logged rows go (metrics.jsonl on rank 0, the tracker)."""

    stage: str
    metrics: Path | None
    is_main: bool
    tracker: Tracker | None
    t0: float = field(default_factory=time.time)

    def row(self, out, step: int, epoch: int, lr: float, alpha: float) -> None:
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.stage}: non-finite loss {loss} at step {step} "
                                     f"(epoch {epoch}, learning rate {lr:.4g})")
        row = {"kind": "train", "stage": self.stage, "step": step, "epoch": epoch, "loss": loss,
               "lr": lr, "alpha": alpha, "wall_s": time.time() - self.t0,
               **{k: float(v) for k, v in out.stats.items()}}
        if self.metrics is not None and self.is_main:
            append_jsonl(self.metrics, row)
        if self.tracker is not None:
            self.tracker.log(row, step, prefix=f"{self.stage}/")


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    for setter in (getattr(loader.dataset, "set_epoch", None),
                   getattr(loader.sampler, "set_epoch", None)):
        if setter is not None:
            setter(epoch)


def train_epochs(objective: TaskObjective, model: nn.Module, loader: DataLoader,
                 train: TrainConfig, alpha: float, alpha_warmup: bool, dist_info: DistInfo,
                 metrics: Path | None, stage: str,
                 on_epoch: Callable[[int], None] | None = None,
                 tracker: Tracker | None = None) -> int:
    """ALBEF's fine-tuning loop; returns the number of optimizer steps."""
    optimizer = build_optimizer(objective, train)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: the training set is smaller than one batch "
                         f"({train.batch_size}); nothing to train")
    logger, step = _Log(stage, metrics, dist_info.is_main, tracker), 0
    limit = train.max_steps if train.max_steps is not None else float("inf")
    objective.train()
    for epoch in range(train.epochs):
        _set_epoch(loader, epoch)
        for i, batch in enumerate(loader):
            lr = lr_at(train, epoch, i)
            set_lr(optimizer, lr)
            a = alpha_at(alpha, alpha_warmup, epoch, i, steps_per_epoch)
            batch = move_batch(batch, dist_info.device)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(dist_info.device, train.precision):
                out = model(batch, a)
            out.loss.backward()
            optimizer.step()
            step += 1
            if step % train.log_every == 0 or step == 1:
                logger.row(out, step, epoch, lr, a)
            if step >= limit:
                break
        if on_epoch is not None:
            on_epoch(epoch)
        if step >= limit:
            break
    return step


def wrap_ddp(objective: TaskObjective, dist_info: DistInfo) -> nn.Module:
    if dist_info.world_size == 1:
        return objective
    return DistributedDataParallel(
        objective, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
        broadcast_buffers=False)


def _ta_train_config(cfg: ExperimentConfig, task: TaskConfig) -> TrainConfig:
    ta = task.ta
    return replace(cfg.train, epochs=ta.epochs, lr=ta.lr, min_lr=ta.min_lr,
                   warmup_lr=ta.warmup_lr, warmup_steps=ta.warmup_steps,
                   batch_size=ta.batch_size, max_steps=ta.max_steps, schedule="albef")


def run_text_assignment(cfg: ExperimentConfig, task: TaskConfig, backbones: Backbones,
                        bert_cfg, tokenizer, dist_info: DistInfo, metrics: Path | None
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """NLVR2's TA step at the pre-training resolution; returns the trained 18-layer model."""
    model = build_task_model("nlvr_ta", backbones.student, bert_cfg).to(dist_info.device)
    objective = TextAssignmentObjective(model, None, cfg.model.momentum,
                                        seed=cfg.train.seed + dist_info.rank)
    size = backbones.student.visual_encoder.patch_embed.img_size[0]  # the checkpoint's
    loader = build_ta_loader(cfg, task, resolve_sources(cfg), tokenizer, dist_info, size)
    loader.collate_fn = _rename_image(loader.collate_fn)
    steps = train_epochs(objective, wrap_ddp(objective, dist_info), loader,
                          _ta_train_config(cfg, task), 0.0, False, dist_info, metrics, "ta")
    return model, {"ta_steps": steps, "ta_pairs": len(loader.dataset)}


def _rename_image(collate: Callable) -> Callable:
    def call(items):
        batch = collate(items)
        batch["images"] = batch.pop("image")
        return batch
    return call


def make_objective(task: TaskConfig, student: nn.Module, teacher: nn.Module | None,
               cfg: ExperimentConfig, pad_id: int, rank: int) -> TaskObjective:
    seed = cfg.train.seed + rank
    if task.name == "vqa":
        return VQAObjective(student, teacher, cfg.model.momentum, pad_id, seed)
    return ClassifyObjective(student, teacher, cfg.model.momentum, seed)


REASON_TA_HEAD = ("the text-assignment step's 3-way head and its vision_proj are not part of "
                  "the NLVR2 model (ALBEF loads the TA checkpoint with strict=False)")
REASON_NEW_HEAD = "the NLVR2 classifier is new (randomly initialised, as in ALBEF)"


def ta_to_nlvr(ta_state: Mapping[str, torch.Tensor], template: ALBEF, bert_cfg,
               source: str = "text-assignment model", fmt: str = "ours",
               ) -> tuple[nn.Module, LoadReport]:
    """The NLVR2 model at the fine-tuning resolution, loaded (loudly, pos_embed interpolated)
    from a TA-trained state in the task naming: its encoders carry over, the head is new."""
    model = build_task_model("nlvr", template, bert_cfg)
    rules = [AllowRule("unexpected", "cls_head.*", REASON_TA_HEAD),
             AllowRule("unexpected", "vision_proj.*", REASON_TA_HEAD),
             AllowRule("missing", "cls_head.*", REASON_NEW_HEAD)]
    report = apply_state(model, ta_state, LoadReport(source, fmt), rules=rules)
    return model, report


def build_task_objective(cfg: ExperimentConfig, task: TaskConfig, backbones: Backbones,
                         template: ALBEF, bert_cfg, tokenizer, dist_info: DistInfo,
                         metrics: Path | None) -> tuple[TaskObjective, dict[str, Any]]:
    """Student (after the TA step for NLVR2) and its momentum teacher. ``template``: an ALBEF
    at the stage's resolution (the NLVR2 model is rebuilt at it after the TA step)."""
    info: dict[str, Any] = {}
    if task.name == "nlvr" and task.ta.enabled:
        ta_model, info = run_text_assignment(cfg, task, backbones, bert_cfg, tokenizer,
                                             dist_info, metrics)
        student, report = ta_to_nlvr(ta_model.cpu().state_dict(), template, bert_cfg)
        info["ta_to_nlvr_load"] = report.to_text()
        teacher = copy.deepcopy(student) if task.distill else None
        info["teacher_init"] = "copy of the TA-trained student" if teacher is not None else "none"
    else:
        student = build_task_model(task.name, backbones.student, bert_cfg)
        teacher = None
        if task.distill and backbones.teacher is not None:
            teacher = build_task_model(task.name, backbones.teacher, bert_cfg)
            if hasattr(student, "cls_head"):  # ALBEF copies the fresh head into its twin
                teacher.cls_head.load_state_dict(student.cls_head.state_dict())
        info["teacher_init"] = backbones.teacher_source if teacher is not None else "none"
    objective = make_objective(task, student, teacher, cfg, tokenizer.pad_id, dist_info.rank)
    return objective.to(dist_info.device), info
