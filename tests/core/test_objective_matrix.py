"""Every cell of ablations/matrix.yaml trains: 3 real optimizer steps on random batches.

The cell list comes from ``ablations.grid.expand`` (the same expansion the launcher submits), so a
new matrix line is covered without editing this file. Per cell and step: finite losses with the
expected keys (and the method statistic when a mask is on), a finite gradient on every student
parameter, none on the momentum teacher (updated by EMA only), and parameters that move.
"""

from __future__ import annotations

import pytest
import torch

from ablations.grid import expand
from model.build import build_objective
from model.engine.optim import build_optimizer
from model.engine.step import train_step
from model.text_masking import SpecialIds

VOCAB = 60
SPECIAL = SpecialIds(pad=0, cls=2, mask=4, vocab_size=VOCAB)
BATCH, LENGTH, STEPS = 8, 12, 3

SPECS = {s.cell: s for s in expand(preset="tiny", seeds=[0],
                                   sets=[f"model.text.vocab_size={VOCAB}"])}


def random_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g)
    ids[:, 0] = SPECIAL.cls
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(BATCH, 3, 32, 32, generator=g),
        "image_strong": torch.randn(BATCH, 3, 32, 32, generator=g),
        "input_ids": torch.where(mask.bool(), ids, torch.zeros_like(ids)),
        "attention_mask": mask,
    }


def test_matrix_has_the_papers_cells() -> None:
    assert {"albef", "softmask", "focal", "mmda", "full", "randmask_p03", "randmask_p05",
            "full_mlm"} <= set(SPECS)


@pytest.mark.parametrize("cell", sorted(SPECS))
def test_cell_trains_three_steps(cell: str) -> None:
    cfg = SPECS[cell].config
    torch.manual_seed(0)
    objective = build_objective(cfg, SPECIAL, seed=0)
    objective.train()
    optimizer = build_optimizer(objective, cfg.train)
    start = {n: p.detach().clone() for n, p in objective.student.named_parameters()}
    teacher_start = {n: p.detach().clone() for n, p in objective.teacher.named_parameters()}
    masked = cfg.softmask.mode != "off"
    for step in range(STEPS):
        out = train_step(objective, optimizer, random_batch(step), alpha=0.4)
        assert set(out.losses) == {"itc", "itm", "mlm"}, out.losses
        itm_groups = {f"itm/{g}_{k}" for g in ("pos", "neg_img", "neg_txt", "clean")
                      for k in ("loss", "acc")}
        if masked:
            itm_groups |= {"itm/masked_loss", "itm/masked_acc", "itm/shortcut"}
        assert set(out.stats) == (({"temp", "mask_mean"} if masked else {"temp"}) | itm_groups
                                  | {"grad_norm"})
        for key, value in {**out.losses, "total": out.loss}.items():
            assert value.ndim == 0 and torch.isfinite(value), (cell, step, key, value)
        if masked:
            assert 0.0 <= float(out.stats["mask_mean"]) <= 1.0
        for name, p in objective.student.named_parameters():
            assert p.grad is not None, f"{cell} step {step}: {name} has no gradient"
            assert torch.isfinite(p.grad).all(), f"{cell} step {step}: {name} non-finite grad"
        for name, p in objective.teacher.named_parameters():
            assert p.grad is None and not p.requires_grad, f"{cell}: teacher {name} has a grad"
    moved = [n for n, p in objective.student.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start), set(start) - set(moved)
    # the teacher follows by EMA (updated before each forward: steps 2 and 3 see moved weights)
    t_moved = [n for n, p in objective.teacher.named_parameters()
               if not torch.equal(p, teacher_start[n])]
    assert t_moved, "the momentum teacher never moved"
