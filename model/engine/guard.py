"""Divergence guard: a non-finite loss or gradient norm stops the run and says what happened.

Checking ``torch.isfinite(loss)`` on the host every step would synchronise the device every
step. Instead the guard keeps two small tensors on the device: the global step of the first
non-finite value (0 = none yet) and which watched terms were non-finite then. ``update`` folds
one step in without reading anything back; ``check`` reads the flag once (the trainer calls it
on logging steps, where it synchronises anyway, and before every checkpoint, so that a poisoned
state is never written over the last good one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


class Diverged(RuntimeError):
    """Training produced a non-finite value; the message names step, terms, lr, checkpoint."""

    def __init__(self, step: int, terms: Sequence[str], lr: float | None,
                 checkpoint: Path | None, checkpoint_step: int | None) -> None:
        where = (f"the last good checkpoint is {checkpoint} (step {checkpoint_step}), kept "
                 "unchanged" if checkpoint is not None else "no checkpoint was written before it")
        lr_text = f"{lr:.4g}" if lr is not None else "unknown"
        super().__init__(f"training diverged at step {step}: non-finite "
                         f"{', '.join(terms) or 'value'} (learning rate {lr_text}); {where}")
        self.step, self.terms, self.lr = step, list(terms), lr


class DivergenceGuard:
    """First non-finite step and terms, accumulated on ``device`` without host syncs."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = tuple(names)
        self.first_step = torch.zeros((), dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=device)
        self._lrs: dict[int, float] = {}

    def update(self, step: int, values: Mapping[str, Tensor], lr: float) -> None:
        """Fold in one step's watched values (every name must be present)."""
        finite = torch.stack([torch.isfinite(values[n].detach()).all() for n in self.names])
        new = (self.first_step == 0) & ~finite.all()
        self.first_step = torch.where(new, torch.full_like(self.first_step, step),
                                      self.first_step)
        self.bad_terms = torch.where(new, ~finite, self.bad_terms)
        self._lrs[step] = lr

    def check(self, checkpoint: Path | None = None, checkpoint_step: int | None = None
              ) -> None:
        """Raise :class:`Diverged` if any step so far was non-finite (one host sync)."""
        step = int(self.first_step)
        if step == 0:
            self._lrs.clear()  # only the steps since the last check can still fail
            return
        terms = [n for n, bad in zip(self.names, self.bad_terms.tolist(), strict=True) if bad]
        raise Diverged(step, terms, self._lrs.get(step), checkpoint, checkpoint_step)


def total_grad_norm(parameters: Sequence[torch.nn.Parameter]) -> Tensor:
    """L2 norm of all gradients (a device tensor, no sync). The gradients are only read, so
    training is bit-identical to not measuring."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float())
                                                 for g in grads]))


EARLY_WINDOW = 3  # logged steps whose smallest loss is the early loss


def detect_blowup(rows: Sequence[Mapping[str, float]], factor: float | None,
                  key: str = "loss/total") -> dict[str, float] | None:
    """The first logged step whose ``key`` exceeds ``factor`` x the early value (the smallest
    of the first :data:`EARLY_WINDOW` logged values: a loss can blow up within them), as
    ``{step, loss, early_loss, factor}``; None if there is none (or the check is off).
    Non-finite losses are the guard's business: they stop the run before this is asked."""
    values = [(int(r["step"]), float(r[key])) for r in rows if key in r and "step" in r]
    if factor is None or len(values) < 2:
        return None
    early = min(v for _, v in values[:EARLY_WINDOW])
    for step, value in values[1:]:
        if value > factor * early:
            return {"step": step, "loss": value, "early_loss": early, "factor": factor}
    return None


def blowup_text(blowup: Mapping[str, float]) -> str:
    return (f"finite blow-up at step {int(blowup['step'])}: total loss {blowup['loss']:.4g} > "
            f"{blowup['factor']:g} x the early {blowup['early_loss']:.4g} "
            "(train.blowup_factor); its metrics are not reported")
