"""Optional gradient-norm clipping (train.grad_clip, off = ALBEF): the math, and that the knob
leaves every existing run's identity alone while off."""

from __future__ import annotations

import pytest
import torch

from model.config.experiment import experiment_hash, load_experiment
from model.config.loader import ConfigError
from model.engine.guard import total_grad_norm
from model.engine.optim import build_optimizer
from model.engine.step import train_step
from tests.tiny import random_batch, tiny_objective


def _step(grad_clip: float | None):
    objective = tiny_objective("model.text.hidden_dropout=0.0", "model.text.attn_dropout=0.0")
    cfg = load_experiment(preset="tiny")
    optimizer = build_optimizer(objective, cfg.train)
    batch = random_batch(generator=torch.Generator().manual_seed(3))
    seen = {}
    step = optimizer.step

    def record(*args, **kwargs):  # the gradients the optimizer actually applies
        seen["norm"] = total_grad_norm(list(objective.parameters()))
        return step(*args, **kwargs)

    optimizer.step = record
    out = train_step(objective, optimizer, batch, alpha=0.4, grad_clip=grad_clip)
    return out, seen["norm"], objective


def test_clipping_scales_the_applied_gradient_and_logs_the_unclipped_norm() -> None:
    plain, applied_plain, plain_model = _step(None)
    clipped, applied_clipped, _ = _step(0.5)
    raw = float(plain.stats["grad_norm"])
    assert raw > 0.5  # so that the clip acts
    assert float(clipped.stats["grad_norm"]) == pytest.approx(raw, rel=1e-5)  # pre-clip, logged
    assert float(applied_plain) == pytest.approx(raw, rel=1e-5)
    assert float(applied_clipped) == pytest.approx(0.5, rel=1e-4)
    assert torch.equal(plain.loss, clipped.loss)  # the same forward


def test_the_knob_is_validated_and_off_keeps_the_run_identity() -> None:
    base = load_experiment(preset="tiny")
    off = load_experiment(preset="tiny", sets=["train.grad_clip=null"])
    on = load_experiment(preset="tiny", sets=["train.grad_clip=1.0"])
    assert experiment_hash(off) == experiment_hash(base) != experiment_hash(on)
    with pytest.raises(ConfigError, match="grad_clip"):
        load_experiment(preset="tiny", sets=["train.grad_clip=0"])
