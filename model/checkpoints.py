"""Official ALBEF checkpoints <-> this project's naming, and loud state-dict loading.

Key mapping (docs/ALBEF.md §8). ``S`` = ``student.``, ``T`` = ``teacher.``, ``k`` = ``text_layers``
(ALBEF's ``fusion_layer``), ``B`` = ``bert.`` in the pre-training format and empty in the
retrieval format (ALBEF's Retrieval.py deletes that infix, docs/ALBEF.md C21):

======================================================  ===========================================
official ALBEF                                          ours
======================================================  ===========================================
``visual_encoder.*`` / ``visual_encoder_m.*``           ``S/T visual_encoder.*`` (timm ViT names)
``vision_proj.*`` / ``vision_proj_m.*``                 ``S/T vision_proj.*``
``text_proj.*`` / ``text_proj_m.*``                     ``S/T text_proj.*``
``itm_head.*``, ``temp``                                ``S itm_head.*``, ``S temp``
``text_encoder[_m].B embeddings.*``                     ``S/T text_encoder.embeddings.*``
``text_encoder[_m].B encoder.layer.{i}.*``, i < k       ``S/T text_encoder.layer.{i}.*``
``text_encoder[_m].B encoder.layer.{i}.*``, i >= k      ``S/T fusion_encoder.layer.{i-k}.*``
``text_encoder[_m].cls.predictions.transform.*``        ``S/T mlm_head.transform.*``
``text_encoder[_m].cls.predictions.bias``               ``S/T mlm_head.bias``
``image_queue``, ``text_queue``, ``queue_ptr``,         ``queue.*`` (same names)
``idx_queue`` (retrieval format only)
======================================================  ===========================================

Entries the official files hold that have no counterpart here, each dropped only after a check:
``cls.predictions.decoder.weight`` (the word-embedding matrix, saved twice by ALBEF: our MLM head
receives it at call time), ``cls.predictions.decoder.bias`` (the same tensor as
``cls.predictions.bias``) and ``embeddings.position_ids`` (a buffer 0..P-1 that transformers now
rebuilds as non-persistent). ``ours_to_albef`` writes all three back, so exported files have
exactly the official key set.

Loading is loud: ``LoadReport`` lists every missing, unexpected, shape-mismatched, interpolated and
allowed key; anything not on an explicit, reasoned allow-list raises ``CheckpointMismatchError``
before a single tensor is copied (a reproduction once lost 12 points to ViT weights that silently
never loaded).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from model.albef import ALBEF
from model.objective import Objective
from model.vit import interpolate_pos_embed

log = logging.getLogger(__name__)

AlbefFormat = Literal["pretrain", "retrieval"]
FormatArg = Literal["auto", "pretrain", "retrieval"]

OURS_ROOTS = ("student.", "teacher.", "queue.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
# Official modules that have a momentum twin named ``<name>_m``.
TWINNED = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")
ALBEF_ROOTS = frozenset(
    [*TWINNED, *(f"{m}_m" for m in TWINNED), "itm_head", "temp", *QUEUE_KEYS]
)

# ------------------------------------------------------------------ known-harmless differences
# Every key that may legitimately differ between a checkpoint and the model is listed here with
# the reason it is harmless. Nothing else is tolerated unless the caller allows it explicitly.
REASON_POSITION_IDS = (
    "BERT position_ids buffer: ALBEF saved it (persistent in its transformers); ours is "
    "non-persistent and rebuilt as 0..P-1 (checked to be 0..P-1)"
)
REASON_TIED_DECODER_WEIGHT = (
    "MLM decoder weight is the word-embedding matrix (tied, docs/ALBEF.md C22); checked equal to it"
)
REASON_TIED_DECODER_BIAS = (
    "MLM decoder bias is cls.predictions.bias (tied, docs/ALBEF.md C22); checked equal to it"
)
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


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model; the message lists every offending key."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class CheckpointReadError(ValueError):
    """A file is not a readable checkpoint of the expected layout (names the file and key)."""


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


# ------------------------------------------------------------------ key mapping (single keys)
def _split_twin(key: str) -> tuple[str, bool]:
    """``visual_encoder_m.x`` -> (``visual_encoder.x``, True); other keys unchanged."""
    head, dot, rest = key.partition(".")
    if head.endswith("_m") and head[:-2] in TWINNED:
        return head[:-2] + dot + rest, True
    return key, False


def _bert_body_to_ours(body: str, text_layers: int, fmt: AlbefFormat) -> str | None:
    """Map the part of a key after ``text_encoder[_m].``; None if it is not a mapped key."""
    if body.startswith("cls.predictions."):
        tail = body[len("cls.predictions."):]
        if tail == "bias" or tail.startswith("transform."):
            return "mlm_head." + tail
        return None
    if fmt == "pretrain":
        if not body.startswith("bert."):
            return None
        body = body[len("bert."):]
    elif body.startswith("bert."):
        return None
    return bert_encoder_key(body, text_layers)


def bert_encoder_key(body: str, text_layers: int) -> str | None:
    """``embeddings.*`` / ``encoder.layer.{i}.*`` of ALBEF's BERT -> our text encoder (i < k) or
    fusion encoder (layer i - k); None for anything else. Shared with the task key maps."""
    if body.startswith("embeddings."):
        return "text_encoder." + body
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", body)
    if match is None:
        return None
    i, tail = int(match[1]), match[2]
    if i < text_layers:
        return f"text_encoder.layer.{i}.{tail}"
    return f"fusion_encoder.layer.{i - text_layers}.{tail}"


def albef_key_to_ours(key: str, text_layers: int, fmt: AlbefFormat) -> str | None:
    """Our name for one official key, or None if the key has no counterpart in the mapping."""
    if key in QUEUE_KEYS:
        return "queue." + key
    base, momentum = _split_twin(key)
    root = "teacher." if momentum else "student."
    head, _, rest = base.partition(".")
    if head in ("visual_encoder", "vision_proj", "text_proj") and rest:
        return root + base
    if not momentum and (base == "temp" or (head == "itm_head" and rest)):
        return root + base
    if head == "text_encoder":
        body = _bert_body_to_ours(rest, text_layers, fmt)
        return None if body is None else root + body
    return None


def _layer_to_albef(prefix: str, tail: str, offset: int) -> str:
    match = re.fullmatch(r"layer\.(\d+)\.(.+)", tail)
    if match is None:
        raise ValueError(f"not a BERT layer key: {tail!r}")
    return f"{prefix}encoder.layer.{int(match[1]) + offset}.{match[2]}"


def ours_key_to_albef(key: str, text_layers: int, fmt: AlbefFormat) -> str:
    """The official name of one of our keys; ValueError for keys outside the mapping."""
    root, _, rest = key.partition(".")
    if root == "queue" and rest in QUEUE_KEYS:
        return rest
    if root not in ("student", "teacher") or not rest:
        raise ValueError(f"{key!r} is not one of our checkpoint keys (student./teacher./queue.)")
    twin = "_m" if root == "teacher" else ""
    head, _, tail = rest.partition(".")
    text = f"text_encoder{twin}." + ("bert." if fmt == "pretrain" else "")
    if head in ("visual_encoder", "vision_proj", "text_proj"):
        return f"{head}{twin}.{tail}"
    if root == "student" and (rest == "temp" or head == "itm_head"):
        return rest
    if head == "text_encoder" and tail.startswith("embeddings."):
        return text + tail
    if head == "text_encoder":
        return _layer_to_albef(text, tail, 0)
    if head == "fusion_encoder":
        return _layer_to_albef(text, tail, text_layers)
    if head == "mlm_head":
        return f"text_encoder{twin}.cls.predictions.{tail}"
    raise ValueError(f"{key!r} has no counterpart in the official ALBEF naming")


# ------------------------------------------------------------------ format detection
def detect_format(state: Mapping[str, Any]) -> Literal["ours", "pretrain", "retrieval"]:
    """Which naming a state dict uses; ValueError for mixed or foreign state dicts."""
    keys = list(state)
    ours = any(k.startswith(OURS_ROOTS) for k in keys)
    albef = any(k.partition(".")[0] in ALBEF_ROOTS for k in keys)
    if ours and albef:
        raise ValueError("state dict mixes our naming (student./teacher./queue.) with the "
                         "official ALBEF naming; expected one of them")
    if ours:
        return "ours"
    if not albef:
        raise ValueError(f"not an ALBEF state dict: expected keys such as visual_encoder.*, "
                         f"text_encoder.*, temp; found e.g. {keys[:5]}")
    bodies = [k.partition(".")[2] for k in keys if k.partition(".")[0].startswith("text_encoder")]
    pretrain = any(b.startswith("bert.") for b in bodies)
    retrieval = any(b.startswith(("embeddings.", "encoder.")) for b in bodies)
    if pretrain and retrieval:
        raise ValueError("state dict mixes text_encoder.bert.* (pre-training format) with "
                         "text_encoder.* without 'bert.' (retrieval format)")
    if pretrain or retrieval:
        return "pretrain" if pretrain else "retrieval"
    return "retrieval" if "idx_queue" in state else "pretrain"


def _resolve_albef_format(state: Mapping[str, Any], fmt: FormatArg) -> AlbefFormat:
    if fmt != "auto":
        return fmt
    found = detect_format(state)
    if found == "ours":
        raise ValueError("state dict is already in our naming (student./teacher./queue.)")
    return found


# ------------------------------------------------------------------ state-level mapping
@dataclass
class MappedState:
    """Result of mapping an official state dict: ``state`` in our naming (keys outside the
    mapping kept under their original name, listed in ``unknown``), ``ignored`` dropped keys with
    their reason, ``names`` our key -> official key, ``problems`` failed consistency checks."""

    state: dict[str, Tensor] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _tie_problem(key: str, partner: str, state: Mapping[str, Tensor]) -> str | None:
    if partner not in state:  # the partner is then reported as missing by the loader
        return None
    a, b = state[key], state[partner]
    if a.shape == b.shape and torch.equal(a, b):
        return None
    return (f"{key} differs from its tied partner {partner} (ALBEF saves one tensor under both "
            "names; this file was edited or does not come from ALBEF)")


def _droppable(key: str, state: Mapping[str, Tensor], fmt: AlbefFormat
               ) -> tuple[str, str | None] | None:
    """(reason, problem or None) if ``key`` is a known duplicate/buffer to drop after a check."""
    prefix, _, body = key.partition(".")
    if prefix not in ("text_encoder", "text_encoder_m"):
        return None
    bert = "bert." if fmt == "pretrain" else ""
    if body == "cls.predictions.decoder.weight":
        partner = f"{prefix}.{bert}embeddings.word_embeddings.weight"
        return REASON_TIED_DECODER_WEIGHT, _tie_problem(key, partner, state)
    if body == "cls.predictions.decoder.bias":
        return REASON_TIED_DECODER_BIAS, _tie_problem(key, f"{prefix}.cls.predictions.bias", state)
    if body == f"{bert}embeddings.position_ids":
        ids = state[key].reshape(-1)
        expected = torch.arange(ids.numel(), dtype=torch.long)
        same = ids.numel() > 0 and torch.equal(ids.to(torch.long), expected)
        problem = None if same else f"{key}: expected positions 0..{ids.numel() - 1}"
        return REASON_POSITION_IDS, problem
    return None


def map_albef_state(
    state: Mapping[str, Tensor],
    text_layers: int,
    fmt: FormatArg = "auto",
    on_problem: Literal["raise", "record"] = "raise",
) -> MappedState:
    """Map an official state dict to our naming, keeping the details a loader reports."""
    albef_fmt = _resolve_albef_format(state, fmt)
    out = MappedState()
    for key, value in state.items():
        dropped = _droppable(key, state, albef_fmt)
        if dropped is not None:
            out.ignored[key] = dropped[0]
            if dropped[1] is not None:
                out.problems.append(dropped[1])
            continue
        ours = albef_key_to_ours(key, text_layers, albef_fmt)
        if ours is None:
            out.unknown.append(key)
            out.state[key] = value
        else:
            out.state[ours] = value
            out.names[ours] = key
    if out.problems and on_problem == "raise":
        raise CheckpointMismatchError("inconsistent ALBEF state dict:\n  " +
                                      "\n  ".join(out.problems))
    return out


def albef_to_ours(
    state: Mapping[str, Tensor], text_layers: int, fmt: FormatArg = "auto"
) -> dict[str, Tensor]:
    """Official ALBEF state dict -> our naming (see the module docstring for the table).

    ``text_layers`` is ALBEF's ``fusion_layer``. Tied duplicates and ``position_ids`` are checked
    and dropped (an inconsistent tie raises ``CheckpointMismatchError``). Keys outside the
    mapping are kept under their original names (a loader then reports them as unexpected) and
    logged as a warning.
    """
    mapped = map_albef_state(state, text_layers, fmt)
    if mapped.unknown:
        log.warning("keys outside the ALBEF mapping kept unchanged: %s", mapped.unknown)
    return mapped.state


def infer_text_layers(state: Mapping[str, Any]) -> int:
    """Number of text-only BERT layers of a state dict in our naming (max layer index + 1)."""
    found = [int(m[1]) for k in state
             if (m := re.match(r"(?:student|teacher)\.text_encoder\.layer\.(\d+)\.", k))]
    if not found:
        raise ValueError("state dict has no text_encoder.layer.* keys to count layers from")
    return max(found) + 1


def _export_format(state: Mapping[str, Any], fmt: FormatArg) -> AlbefFormat:
    has_mlm = any(".mlm_head." in k for k in state)
    has_text = any(".text_encoder." in k for k in state)
    if fmt == "auto":
        return "pretrain" if has_mlm else "retrieval"
    if fmt == "retrieval" and has_mlm:
        raise ValueError("the state has an MLM head (mlm_head.*) but ALBEF's retrieval format has "
                         "none; use fmt='pretrain' or build the model without the MLM head")
    if fmt == "pretrain" and has_text and not has_mlm:
        raise ValueError("ALBEF's pre-training format needs the MLM head (text_encoder.cls.*) "
                         "but the state has no mlm_head.*; use fmt='retrieval'")
    return fmt


def _add_official_extras(out: dict[str, Tensor], state: Mapping[str, Tensor],
                         fmt: AlbefFormat) -> None:
    """Write back what ALBEF files hold twice or as buffers: decoder weight/bias, position_ids."""
    bert = "bert." if fmt == "pretrain" else ""
    for root, twin in (("student", ""), ("teacher", "_m")):
        words = state.get(f"{root}.text_encoder.embeddings.word_embeddings.weight")
        positions = state.get(f"{root}.text_encoder.embeddings.position_embeddings.weight")
        mlm_bias = state.get(f"{root}.mlm_head.bias")
        text = f"text_encoder{twin}."
        if positions is not None:
            ids = torch.arange(positions.shape[0], dtype=torch.long).unsqueeze(0)
            out[f"{text}{bert}embeddings.position_ids"] = ids
        if fmt == "pretrain" and words is not None and mlm_bias is not None:
            # The same tensor objects: torch.save then stores each once, as ALBEF's files do.
            out[f"{text}cls.predictions.decoder.weight"] = words
            out[f"{text}cls.predictions.decoder.bias"] = mlm_bias


def ours_to_albef(
    state: Mapping[str, Tensor], text_layers: int, fmt: FormatArg = "auto"
) -> dict[str, Tensor]:
    """Our state dict (full or student-only) -> the official ALBEF naming.

    ``auto`` picks ``pretrain`` when an MLM head is present, else ``retrieval``. Tied duplicates
    and ``position_ids`` are written as ALBEF does. ALBEF's pre-training model has no
    ``idx_queue`` (and official Pretrain.py loads strictly), so in that format ``queue.idx_queue``
    is left out; it must still hold its initial -100 (pre-training never writes it), otherwise
    ValueError, since image ids would be lost.
    """
    albef_fmt = _export_format(state, fmt)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "queue.idx_queue" and albef_fmt == "pretrain":
            if bool((value != -100).any()):
                raise ValueError("queue.idx_queue holds image ids but ALBEF's pre-training format "
                                 "has no idx_queue; use fmt='retrieval'")
            continue
        out[ours_key_to_albef(key, text_layers, albef_fmt)] = value
    _add_official_extras(out, state, albef_fmt)
    return out


# ------------------------------------------------------------------ reading files
def _numpy_safe_globals() -> list[Any]:
    """NumPy arrays/scalars (e.g. saved RNG states) are plain data; allow them under
    ``weights_only`` so such files need no full unpickling."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def _torch_load(path: Path, weights_only: bool) -> Any:
    # mmap avoids reading what we then discard (optimizer state); legacy non-zip files
    # cannot be mapped, so they are read normally.
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError) as exc:  # torch's zip reader does not name the file
        raise CheckpointReadError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {exc}); if a job was "
            "killed while writing it, the run directory's previous checkpoint is the last good "
            "one") from exc


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only`` (tensors, containers, NumPy data).

    Files holding other Python objects need ``trust_pickle=True``, which runs the full unpickler
    (arbitrary code): only for files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise CheckpointReadError(
                f"{path}: holds Python objects that safe (weights_only) loading refuses "
                f"({', '.join(unsafe) or exc}). If the file comes from a trusted source, pass "
                "trust_pickle=True (CLI: --trust-pickle)"
            ) from exc
    log.warning("%s: loading with full unpickling (trust_pickle=True)", path)
    return _torch_load(path, weights_only=False)


def extract_state(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside a loaded file: ``obj['model']`` (ALBEF, releases),
    ``obj['objective']`` (our training checkpoints) or ``obj`` itself. Other entries
    (optimizer, config, epoch, ...) are ignored. A DDP ``module.`` prefix is removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{source}: expected a dict (a state dict or {{'model': state}}),"
                                  f" got {type(obj).__name__}")
    inner = obj
    for key in ("model", "objective"):
        if isinstance(obj.get(key), Mapping):
            inner = obj[key]
            break
    bad = [k for k, v in inner.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointReadError(
            f"{source}: entries {bad[:5]} are not tensors; expected a state dict, or a dict "
            f"holding one under 'model' (ALBEF) or 'objective' (our training checkpoints); "
            f"top-level keys: {sorted(map(str, obj))[:10]}")
    state = dict(inner)
    if state and all(k.startswith("module.") for k in state):
        log.info("%s: removing the DistributedDataParallel 'module.' prefix", source)
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state(path_or_state: str | Path | Mapping[str, Any], *, trust_pickle: bool = False
               ) -> tuple[dict[str, Tensor], str]:
    """(state dict, source description) from a file path or an in-memory (wrapped) state."""
    if isinstance(path_or_state, Mapping):
        return extract_state(path_or_state, "<in-memory state>"), "<in-memory state>"
    obj = read_checkpoint(path_or_state, trust_pickle=trust_pickle)
    return extract_state(obj, str(path_or_state)), str(path_or_state)


# ------------------------------------------------------------------ loading
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
