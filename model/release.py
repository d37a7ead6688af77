"""Slim release checkpoints: the student's weights only, for evaluation and sharing.

A full training checkpoint (``{"objective": Objective.state_dict(), "optimizer": ..., "config":
..., "step": ..., "epoch": ..., "rng": ...}``) also holds the momentum twin, the feature queues
and the optimizer moments, i.e. roughly four times the student. A release keeps the student:

    {"model": state, "config": config dict, "format": "ours" | "albef", "step": .., "epoch": ..}

``ours``: keys ``student.*`` (our naming); ``albef``: the official ALBEF naming without the
``_m`` twins and queues (pre-training format if the model has an MLM head, else retrieval).
Note that the official Pretrain.py / Retrieval.py index ``visual_encoder_m.pos_embed``
unconditionally, so they need a full file, not this slim one.

Command line: ``python -m model.cli.export FULL_CKPT OUT [--format albef]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from model.checkpoints import (
    REASON_SLIM,
    AllowRule,
    CheckpointReadError,
    LoadReport,
    copy_student_to_teacher,
    infer_text_layers,
    load_checkpoint_state,
    ours_to_albef,
    read_checkpoint,
    read_state,
)
from model.objective import Objective

log = logging.getLogger(__name__)

MB = 1_000_000


def _compact(t: Tensor) -> Tensor:
    """A tensor that owns exactly its bytes: torch.save writes whole storages, so a view into a
    larger (e.g. flattened) storage would carry the rest of it into the release."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


def _student_state(obj: Any, source: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("objective"), Mapping):
        found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointReadError(
            f"{source}: expected a training checkpoint with an 'objective' entry "
            f"(Objective.state_dict()); found {found}")
    student = {k: _compact(v) for k, v in obj["objective"].items() if k.startswith("student.")}
    if not student:
        raise CheckpointReadError(f"{source}: 'objective' has no student.* keys")
    return student


def export_release(
    checkpoint_path: str | Path,
    out_path: str | Path,
    fmt: Literal["ours", "albef"] = "ours",
    *,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Write a slim release of a full training checkpoint; return the sizes before and after.

    Reads only the "objective" (student part) and "config" entries. Returns
    ``{"input", "output", "format", "tensors", "before_bytes", "after_bytes", "before_mb",
    "after_mb"}`` (MB = 10^6 bytes).
    """
    if fmt not in ("ours", "albef"):
        raise ValueError(f"fmt must be 'ours' or 'albef', got {fmt!r}")
    src, out = Path(checkpoint_path), Path(out_path)
    obj = read_checkpoint(src, trust_pickle=trust_pickle)
    state = _student_state(obj, src)
    if fmt == "albef":
        state = ours_to_albef(state, infer_text_layers(state))
    payload = {"model": state, "config": obj.get("config"), "format": fmt,
               "step": obj.get("step"), "epoch": obj.get("epoch")}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    before, after = src.stat().st_size, out.stat().st_size
    sizes = {"input": str(src), "output": str(out), "format": fmt, "tensors": len(state),
             "before_bytes": before, "after_bytes": after,
             "before_mb": before / MB, "after_mb": after / MB}
    log.info("release %s: %d -> %d bytes (%.1f -> %.1f MB), %d tensors, format %s",
             out, before, after, before / MB, after / MB, len(state), fmt)
    return sizes


def load_release(
    objective_or_student: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load a slim release (either format) into an ``Objective`` or a bare ``ALBEF``.

    The momentum twin and queues are absent from the file (allowed). Into an ``Objective``, the
    twin is then set equal to the student, as at ALBEF's construction; queues keep their
    initial values.
    """
    state, source = read_state(path, trust_pickle=trust_pickle)
    rules = [AllowRule("missing", "teacher.*", REASON_SLIM),
             AllowRule("missing", "queue.*", REASON_SLIM)]
    report = load_checkpoint_state(objective_or_student, state, source=source, rules=rules,
                                   strict=strict)
    if isinstance(objective_or_student, Objective) and any(
            k.startswith("teacher.") for k in report.allowed_missing):
        copy_student_to_teacher(objective_or_student)
        report.notes.append("momentum twin set equal to the student (not in the release)")
    return report
