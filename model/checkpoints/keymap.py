"""Official ALBEF checkpoints <-> this project's naming: the key map, pure (no I/O, no model).

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

"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from model.checkpoints.errors import CheckpointMismatchError

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


def map_keys(state: Mapping[str, Tensor], to_ours: Callable[[str], str | None],
             dropped: Callable[[str], tuple[str, str | None] | None]) -> MappedState:
    """Rename every key of ``state`` with ``to_ours``; ``dropped(key)`` gives (reason, problem
    or None) for keys left out on purpose. Keys outside the map are kept under their own name
    and listed in ``unknown`` (a loader then reports them as unexpected)."""
    out = MappedState()
    for key, value in state.items():
        drop = dropped(key)
        if drop is not None:
            out.ignored[key] = drop[0]
            if drop[1] is not None:
                out.problems.append(drop[1])
            continue
        ours = to_ours(key)
        if ours is None:
            out.unknown.append(key)
            out.state[key] = value
        else:
            out.state[ours] = value
            out.names[ours] = key
    return out


def map_albef_state(
    state: Mapping[str, Tensor],
    text_layers: int,
    fmt: FormatArg = "auto",
    on_problem: Literal["raise", "record"] = "raise",
) -> MappedState:
    """Map an official state dict to our naming, keeping the details a loader reports."""
    albef_fmt = _resolve_albef_format(state, fmt)
    out = map_keys(state, lambda key: albef_key_to_ours(key, text_layers, albef_fmt),
                   lambda key: _droppable(key, state, albef_fmt))
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
