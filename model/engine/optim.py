"""ALBEF's optimiser groups, learning-rate schedule and alpha ramp.

See docs/ALBEF.md §3 and docs/ALBEF.md C13-C15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.config.schema import LossConfig, TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[no-decay, decay] groups by ALBEF's rule: 1-D tensors and biases get no decay.

    Everything else decays, including ``temp`` (0-D, so not "1-D"), the ViT ``cls_token`` and
    ``pos_embed`` and all embedding tables (docs/ALBEF.md C13). Frozen (momentum) parameters are
    skipped.
    """
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim == 1 or name.endswith(".bias")) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def _impl_kwargs(impl: str) -> dict[str, bool]:
    """AdamW's implementation switch (``train.optimizer_impl``); "default" lets torch pick."""
    return {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(impl, {})


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8) as ALBEF's optimiser factory builds it.

    ``cfg.zero``: under torch.distributed, PyTorch's ZeroRedundancyOptimizer wraps it, so each
    rank keeps the AdamW state of its shard of the parameters only (about 1/world of it); the
    update is the same. Checkpoints hold the consolidated state (model/engine/resume.py).
    """
    kwargs = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8, **_impl_kwargs(cfg.optimizer_impl)}
    groups = param_groups(model, cfg.weight_decay)
    if cfg.zero and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def consolidate(optimizer: torch.optim.Optimizer) -> None:
    """Gather a sharded optimizer's state on rank 0 before it is saved (every rank calls this;
    a no-op for a plain optimizer)."""
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(to=0)


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> float:
    """Learning rate used by the optimizer step of iteration ``step_in_epoch`` of ``epoch``.

    ``albef`` (pre-training): in epoch 0 a staircase warm-up of ``warmup_steps`` plateaus of
    ``warmup_every`` iterations from ``warmup_lr`` to ``lr`` (the timm scheduler is stepped after
    iterations 0, 100, ..., 2000, and a new value applies from the next iteration); from epoch
    e >= 1 a per-epoch cosine  min + (lr - min)(1 + cos(pi e / E)) / 2.
    ``albef_finetune``: epoch e uses  min + (lr - min)(1 + cos(pi e / E)) / 2 (epoch 0 = lr).
    ``constant``: lr.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "albef_finetune" or epoch > 0:
        return cosine
    # Iteration i runs with the value set by the last scheduler call made after iteration
    # j < i with j % warmup_every == 0, i.e. plateau t = ceil(i / warmup_every) - 1.
    plateau = max(0, math.ceil(step_in_epoch / cfg.warmup_every) - 1)
    if plateau >= cfg.warmup_steps:
        return cfg.lr
    return cfg.warmup_lr + plateau * (cfg.lr - cfg.warmup_lr) / cfg.warmup_steps


def alpha_at(base_alpha: float, warmup: bool, epoch: int, step_in_epoch: int,
             steps_per_epoch: int) -> float:
    """ALBEF's distillation weight: linear from 0 over the first epoch, per iteration."""
    if not warmup or epoch > 0:
        return base_alpha
    return base_alpha * min(1.0, step_in_epoch / max(1, steps_per_epoch))


def hardness_at(ramp: tuple[int, int], global_step: int, final: float = 1.0) -> float:
    """ITM negative-sampling sharpness at ``global_step`` (``loss.itm_neg_ramp``).

    0 before ``start`` (random in-batch negatives), ``final`` from ``end`` on (1 = ALBEF's
    similarity-weighted hard negatives), linear in between; ``(0, 0)`` with ``final = 1`` is
    ALBEF: always 1.
    """
    start, end = ramp
    if global_step >= end:
        return final
    if global_step < start:
        return 0.0
    return final * (global_step - start) / (end - start)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class StepSchedule:
    """Everything of one step that follows from where training is: the learning rate, the
    distillation weight, the ITM negatives' hardness and whether the queues are fed."""

    lr: float
    alpha: float
    hardness: float
    enqueue: bool


def step_schedule(train: TrainConfig, loss: LossConfig, queue_warmup_steps: int, epoch: int,
                  step_in_epoch: int, global_step: int, steps_per_epoch: int) -> StepSchedule:
    """The one schedule the trainer and the diagnostics benchmarks use (``train``: the
    launch's learning rates, model/config/recipe.py ``scaled_train``)."""
    return StepSchedule(
        lr=lr_at(train, epoch, step_in_epoch),
        alpha=alpha_at(loss.alpha, loss.alpha_warmup, epoch, step_in_epoch, steps_per_epoch),
        hardness=hardness_at(loss.itm_neg_ramp, global_step, loss.itm_neg_hardness),
        enqueue=global_step >= queue_warmup_steps,
    )
