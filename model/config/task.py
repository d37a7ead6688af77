"""Typed settings of a downstream task stage (the ``task:`` block of a protocol in
ablations/protocols.yaml). Optimisation (lr, schedule, epochs, batch, image size, seed) comes from
the stage's ``ExperimentConfig`` like every other stage; this holds what only the task has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.config.loader import FieldError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise FieldError(name, message)


@dataclass(frozen=True)
class TextAssignmentConfig:
    """NLVR2's text-assignment (TA) step before fine-tuning (ALBEF's Pretrain_nlvr.py /
    NLVR_pretrain.yaml): one epoch over the pre-training pairs at the pre-training resolution,
    AdamW 2e-5 -> 1e-5 (warm-up from 1e-5 over one 100-iteration plateau), batch 64 per GPU.
    ``train_files`` empty = the cell's own pre-training files (the synthetic set's train.json
    when data.kind = synthetic)."""

    enabled: bool = True
    epochs: int = 1
    lr: float = 2e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 1
    batch_size: int = 64
    max_steps: int | None = None
    train_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 3, "batch_size",
               f"must be >= 3 (two other images are drawn per caption), got {self.batch_size}")
        _check(0 < self.lr < float("inf"), "lr", f"must be finite and > 0, got {self.lr}")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Size of the generated stand-in (used when the stage's data.kind = synthetic): images
    per split for VE and VQA, image pairs for NLVR2."""

    train: int = 1200
    val: int = 150
    test: int = 300
    single_object_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(0.0 <= self.single_object_fraction <= 1.0, "single_object_fraction",
               f"must be in [0, 1], got {self.single_object_fraction}")


@dataclass(frozen=True)
class TaskConfig:
    """One downstream task. Files are relative to the working directory (docs/DATA.md).

    ``alpha`` / ``distill``: ALBEF's momentum distillation (0.4, on for all three tasks);
    ``alpha_warmup``: alpha ramps from 0 over the first epoch (ALBEF: NLVR2 and VQA yes, SNLI-VE
    no). ``select``: which epoch's numbers are reported - ``best_val`` (ALBEF's SNLI-VE and
    NLVR2 keep the epoch with the best validation accuracy) or ``last`` (VQA has no validation
    split: train + val are both trained on).
    """

    name: Literal["ve", "nlvr", "vqa"]
    train_files: tuple[str, ...] = ()
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""
    vg_root: str = ""
    answer_list: str = ""
    # Test questions whose answers are known locally (a VQA minival split): scored with the VQA
    # accuracy. Official test-dev / test-std questions have none: only the submission file.
    alpha: float = 0.4
    distill: bool = True
    alpha_warmup: bool = True
    k_test: int = 128
    eval_batch_size: int = 64
    select: Literal["best_val", "last"] = "best_val"
    ta: TextAssignmentConfig = field(default_factory=TextAssignmentConfig)
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.k_test >= 1, "k_test", f"must be >= 1, got {self.k_test}")
        _check(self.eval_batch_size >= 1, "eval_batch_size",
               f"must be >= 1, got {self.eval_batch_size}")
        if self.name == "vqa":
            _check(self.select == "last", "select",
                   "VQA trains on train + val: there is no validation split to select on; "
                   "use select: last")
