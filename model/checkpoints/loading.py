"""Loud state-dict loading into an ALBEF or an ``Objective``.

Loading is loud: ``LoadReport`` lists every missing, unexpected, shape-mismatched, interpolated and
allowed key; anything not on an explicit, reasoned allow-list raises ``CheckpointMismatchError``
before a single tensor is copied (a reproduction once lost 12 points to ViT weights that silently
never loaded).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from model.albef import ALBEF
from model.checkpoints.errors import CheckpointMismatchError
from model.checkpoints.io import read_state
from model.checkpoints.keymap import (
    OURS_ROOTS,
    MappedState,
    detect_format,
    map_albef_state,
    ours_key_to_albef,
)
from model.objective import Objective
from model.vit import interpolate_pos_embed

log = logging.getLogger(__name__)

REASON_NO_MLM_HEAD = (
    "model built without an MLM head (retrieval): ALBEF's Retrieval.py drops "
    "text_encoder.cls.* the same way (docs/ALBEF.md §5)"
)
REASON_NO_IDX_QUEUE = (
    "pre-training checkpoints have no idx_queue; it stays -100 as in ALBEF's retrieval "
    "fine-tuning (docs/ALBEF.md §1.5, docs/ALBEF.md C20)"
)
REASON_NO_TWIN = (
    "target is a bare ALBEF (evaluation): it has no momentum twin and no feature queues"
)
REASON_SLIM = (
    "slim release file holds the student only; the momentum twin and queues are training state"
)
REASON_CALLER = "allowed by the caller"



@dataclass(frozen=True)
class AllowRule:
    """A key pattern (fnmatch, ``*`` crosses dots) that may be missing or unexpected, and why."""

    kind: Literal["missing", "unexpected"]
    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return fnmatchcase(key, self.pattern)


def caller_rules(allow_missing: Sequence[str], allow_unexpected: Sequence[str]) -> list[AllowRule]:
    """Allow-rules from caller-supplied patterns (matched against our key names)."""
    return [AllowRule("missing", p, REASON_CALLER) for p in allow_missing] + [
        AllowRule("unexpected", p, REASON_CALLER) for p in allow_unexpected
    ]


Shape = tuple[int, ...]


@dataclass
class LoadReport:
    """What a load did. Keys are in the target module's naming; ``names`` maps a key to the name
    it has (or would have) in the source file. ``ok`` is False if anything is not allowed."""

    source: str
    fmt: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    interpolated: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    allowed_missing: dict[str, str] = field(default_factory=dict)
    allowed_unexpected: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched or self.problems)

    def _named(self, key: str) -> str:
        other = self.names.get(key)
        return f"{key}  [in file: {other}]" if other and other != key else key

    def offending_text(self) -> str:
        """Only the keys that make the load fail, every one of them."""
        lines: list[str] = []
        if self.missing:
            lines.append(f"  MISSING from the checkpoint ({len(self.missing)}):")
            lines += [f"    {self._named(k)}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  UNEXPECTED in the checkpoint ({len(self.unexpected)}):")
            lines += [f"    {self._named(k)}" for k in self.unexpected]
        if self.shape_mismatched:
            lines.append(f"  SHAPE MISMATCH ({len(self.shape_mismatched)}):")
            lines += [f"    {self._named(k)}: checkpoint {tuple(a)} vs model {tuple(b)}"
                      for k, a, b in self.shape_mismatched]
        if self.problems:
            lines.append(f"  INCONSISTENT ({len(self.problems)}):")
            lines += [f"    {p}" for p in self.problems]
        return "\n".join(lines)

    def to_text(self) -> str:
        """Human-readable report: header, interpolations, allowed keys by reason, offenders."""
        status = "OK" if self.ok else "MISMATCH"
        lines = [f"load report for {self.source} (format: {self.fmt}): {status}, "
                 f"{len(self.loaded)} tensors matched"]
        lines += [f"  interpolated {k}: {tuple(a)} -> {tuple(b)}" for k, a, b in self.interpolated]
        lines += _grouped("ignored (checked, known harmless)", self.ignored)
        lines += _grouped("allowed missing", self.allowed_missing)
        lines += _grouped("allowed unexpected", self.allowed_unexpected)
        lines += [f"  note: {n}" for n in self.notes]
        offending = self.offending_text()
        return "\n".join(lines + ([offending] if offending else []))


def _grouped(title: str, items: Mapping[str, str], limit: int = 6) -> list[str]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason in items.items():
        by_reason[reason].append(key)
    lines = []
    for reason, keys in by_reason.items():
        more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        lines.append(f"  {title} ({len(keys)}): {reason}\n      {', '.join(keys[:limit])}{more}")
    return lines


def split_target(target: nn.Module) -> tuple[ALBEF, ALBEF | None]:
    """(student, teacher or None) of an ``Objective`` or a bare ``ALBEF``."""
    if isinstance(target, Objective):
        return target.student, target.teacher
    if isinstance(target, ALBEF):
        return target, None
    raise TypeError(f"expected an Objective or an ALBEF model, got {type(target).__name__}")


def copy_student_to_teacher(objective: Objective, modules: Sequence[str] | None = None) -> None:
    """Make the momentum twin equal to the student (all of it, or the named sub-modules), as
    ALBEF's ``copy_params`` does at construction."""
    source = objective.student.state_dict()
    keys = [k for k in objective.teacher.state_dict()
            if modules is None or k.split(".", 1)[0] in modules]
    objective.teacher.load_state_dict({k: source[k] for k in keys}, strict=False)


def _interpolate_pos_embeds(state: dict[str, Tensor], model_state: Mapping[str, Tensor],
                            report: LoadReport) -> None:
    """Resize every ViT ``pos_embed`` whose grid differs from the model's (docs/ALBEF.md §1.7)."""
    for key in [k for k in state if k.endswith("pos_embed") and k in model_state]:
        src, dst = state[key], model_state[key]
        if src.shape == dst.shape or src.dim() != 3 or src.shape[-1] != dst.shape[-1]:
            continue
        n = dst.shape[1]
        extra = n - int(round((n - 1) ** 0.5)) ** 2  # the model's prefix (CLS) tokens
        try:
            new = interpolate_pos_embed(src, n - extra)
        except ValueError as exc:  # not a square grid: left to the shape check
            report.notes.append(f"{key}: not interpolated ({exc})")
            continue
        state[key] = new
        report.interpolated.append((key, tuple(src.shape), tuple(new.shape)))


def classify_keys(keys: Sequence[str], kind: Literal["missing", "unexpected"],
                  rules: Sequence[AllowRule], report: LoadReport) -> None:
    """Sort keys into the allowed (with the first matching rule's reason) and offending lists."""
    allowed = report.allowed_missing if kind == "missing" else report.allowed_unexpected
    offending = report.missing if kind == "missing" else report.unexpected
    for key in keys:
        rule = next((r for r in rules if r.kind == kind and r.matches(key)), None)
        if rule is None:
            offending.append(key)
        else:
            allowed[key] = rule.reason


def apply_state(
    module: nn.Module,
    state: Mapping[str, Tensor],
    report: LoadReport,
    *,
    rules: Sequence[AllowRule] = (),
    scope: tuple[str, ...] = (),
    strict: bool = True,
    source_name: Callable[[str], str | None] | None = None,
) -> LoadReport:
    """Compare ``state`` (already in the module's naming) with ``module``, report, then load.

    ``scope`` restricts the comparison to model keys with these prefixes (e.g. only the ViT).
    With ``strict`` any offending key raises ``CheckpointMismatchError`` before anything is
    copied; otherwise a warning lists the offenders and every matching tensor is loaded.
    """
    model_state = {k: v for k, v in module.state_dict().items()
                   if not scope or k.startswith(scope)}
    state = dict(state)
    _interpolate_pos_embeds(state, model_state, report)
    classify_keys(sorted(model_state.keys() - state.keys()), "missing", rules, report)
    classify_keys(sorted(state.keys() - model_state.keys()), "unexpected", rules, report)
    loadable: dict[str, Tensor] = {}
    for key in sorted(model_state.keys() & state.keys()):
        if state[key].shape != model_state[key].shape:
            report.shape_mismatched.append(
                (key, tuple(state[key].shape), tuple(model_state[key].shape)))
        else:
            loadable[key] = state[key]
    report.loaded = sorted(loadable)
    if source_name is not None:
        for key in [*report.missing, *report.unexpected, *(k for k, _, _ in
                                                           report.shape_mismatched)]:
            report.names.setdefault(key, source_name(key) or key)
    log.info("%s", report.to_text())
    if not report.ok:
        hint = ("nothing was loaded. Pass allow_missing=/allow_unexpected= patterns for keys "
                "known to be harmless, or strict=False to load the matching tensors anyway.")
        if strict:
            raise CheckpointMismatchError(f"{report.to_text()}\n{hint}", report)
        log.warning("%s: loading anyway (strict=False) despite:\n%s",
                    report.source, report.offending_text())
    result = module.load_state_dict(loadable, strict=False)
    if result.unexpected_keys:  # cannot happen: loadable keys come from the model itself
        raise RuntimeError(f"internal error, keys not consumed: {result.unexpected_keys}")
    return report


def known_rules(target: nn.Module, fmt: str) -> list[AllowRule]:
    """The allow-list entries that apply to this target and source format."""
    student, teacher = split_target(target)
    rules = []
    if student.mlm_head is None:
        rules.append(AllowRule("unexpected", "*mlm_head.*", REASON_NO_MLM_HEAD))
    if teacher is not None and fmt == "pretrain":
        rules.append(AllowRule("missing", "queue.idx_queue", REASON_NO_IDX_QUEUE))
    if teacher is None:
        rules += [AllowRule("unexpected", "teacher.*", REASON_NO_TWIN),
                  AllowRule("unexpected", "queue.*", REASON_NO_TWIN)]
    return rules


def load_checkpoint_state(
    target: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    rules: Sequence[AllowRule] = (),
    strict: bool = True,
) -> LoadReport:
    """Load a state dict in the official or our naming into an Objective or a bare ALBEF.

    ``rules`` are consulted before the built-in allow-list (``known_rules``).
    """
    student, teacher = split_target(target)
    text_layers = len(student.text_encoder.layer)
    fmt = detect_format(state)
    if fmt == "ours":
        mapped = MappedState(state=dict(state))
    else:
        mapped = map_albef_state(state, text_layers, fmt, on_problem="record")
    mapped_state, names = mapped.state, mapped.names
    if teacher is None:  # a bare ALBEF is the student: drop our 'student.' root
        mapped_state = {k.removeprefix("student."): v for k, v in mapped_state.items()}
        names = {k.removeprefix("student."): v for k, v in names.items()}
    report = LoadReport(source=source, fmt=fmt, ignored=dict(mapped.ignored),
                        problems=list(mapped.problems), names=dict(names))

    def official_name(key: str) -> str | None:
        if fmt == "ours":
            return None
        full = key if teacher is not None or key.startswith(OURS_ROOTS) else "student." + key
        try:
            return ours_key_to_albef(full, text_layers, fmt)
        except ValueError:
            return None

    return apply_state(target, mapped_state, report,
                       rules=[*rules, *known_rules(target, fmt)], strict=strict,
                       source_name=official_name)


def load_albef_checkpoint(
    objective: nn.Module,
    path_or_state: str | Path | Mapping[str, Any],
    *,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    strict: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load an official ALBEF checkpoint (pre-training or retrieval format; also files in our
    naming) into an ``Objective`` or a bare ``ALBEF``.

    Accepts ``{'model': state, 'optimizer': ..., 'config': ..., 'epoch': ...}`` files (only
    'model' is read), bare state dicts, or in-memory dicts. Both ViT ``pos_embed`` are resized to
    the model's grid (e.g. 256 -> 384 px). Queues are loaded when present (ALBEF fine-tuning
    inherits them, docs/ALBEF.md C20); ``idx_queue`` stays -100 for pre-training files.
    ``allow_missing`` / ``allow_unexpected``: fnmatch patterns over our key names.
    """
    state, source = read_state(path_or_state, trust_pickle=trust_pickle)
    return load_checkpoint_state(objective, state, source=source,
                                 rules=caller_rules(allow_missing, allow_unexpected),
                                 strict=strict)
