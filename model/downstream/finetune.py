"""The generic fine-tuning loop of every downstream task (ALBEF's VE.py, NLVR.py +
Pretrain_nlvr.py and VQA.py share it; docs/DOWNSTREAM.md); what differs per task is in
model/downstream/tasks/.

Schedule: ALBEF's (``train.schedule = albef``): in epoch 0 a staircase warm-up of
``train.warmup_steps`` plateaus of 100 iterations from ``warmup_lr`` to ``lr`` (its
``warmup_epochs`` are consumed as 100-iteration plateaus), then a per-epoch cosine to ``min_lr``.
Alpha: 0.4, ramped over epoch 0 where ALBEF's ``warm_up`` is on.

Outputs in ``out_dir``: ``metrics.jsonl`` (training and per-epoch evaluation rows),
``result.json`` (the selected epoch's numbers and the provenance), for VQA
``vqa_result.json`` in the official submission format (``[{question_id, answer}]``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from model.config.schema import TrainConfig
from model.downstream.objective import TaskObjective
from model.engine.distributed import DistInfo
from model.engine.optim import alpha_at, build_optimizer, lr_at, set_lr
from model.engine.run_io import append_jsonl
from model.engine.step import autocast_context, move_batch
from model.engine.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    provenance: dict[str, Any]


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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
