"""The training step shared by the trainer, the benchmarks and the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from model.engine.guard import total_grad_norm
from model.objective import StepOutput


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op otherwise (CPU runs stay fp32 and exact)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def move_batch(batch: dict[str, torch.Tensor], device: torch.device
               ) -> dict[str, torch.Tensor]:
    """Copy tensors to ``device``; non_blocking pairs with the loader's pinned memory."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    alpha: float,
    precision: str = "fp32",
    enqueue: bool = True,
    hardness: float = 1.0,
    grad_clip: float | None = None,
) -> StepOutput:
    """Forward (``Objective`` or its DDP wrapper), backward, optimizer step.

    Nothing here reads a value back to the host: the returned tensors are detached, and the
    caller decides when to synchronise (e.g. only on logging steps).
    """
    device = next(iter(_params(objective))).device
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, precision):
        out: StepOutput = objective(batch, alpha, enqueue, hardness)
    out.loss.backward()
    # The gradient norm (a device tensor: no sync) feeds the divergence guard and the logs.
    # ALBEF does not clip; with ``grad_clip`` the norm is clipped and the pre-clip norm logged.
    params = [p for p in _params(objective) if p.grad is not None]
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = total_grad_norm(params)
    optimizer.step()
    return StepOutput(
        loss=out.loss.detach(),
        losses={k: v.detach() for k, v in out.losses.items()},
        stats={**{k: v.detach() for k, v in out.stats.items()}, "grad_norm": grad_norm.detach()},
    )


def _params(module: nn.Module) -> Iterator[torch.nn.Parameter]:
    return module.parameters()
