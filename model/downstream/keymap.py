"""Official ALBEF fine-tuned task files (VE.py, NLVR.py, Pretrain_nlvr.py, VQA.py) <-> the task
models' naming (docs/DOWNSTREAM.md). ``k`` = ``text_layers`` (ALBEF's ``fusion_layer``):

==================================================  ==============================================
official ALBEF                                      ours (task model)
==================================================  ==============================================
``visual_encoder.*``                                ``visual_encoder.*``
``text_encoder.embeddings.*``                       ``text_encoder.embeddings.*``
``text_encoder.encoder.layer.{i}.*``, i < k         ``text_encoder.layer.{i}.*``
``text_encoder.encoder.layer.{i}.*``, i >= k        ``fusion_encoder.layer.{i-k}.*`` (NLVR2: 2F
                                                    layers, the pair stack)
``cls_head.*`` (VE, NLVR2) / ``ta_head.*`` (TA)     ``cls_head.*``
``vision_proj.*`` (TA)                              ``vision_proj.*``
``text_decoder.bert.embeddings.*``                  ``decoder.embeddings.*``
``text_decoder.bert.encoder.layer.{i}.*``           ``decoder.layer.{i}.*``
``text_decoder.cls.predictions.transform.*``/bias   ``decoder.head.transform.*`` / ``.bias``
==================================================  ==============================================

Dropped after a check: the tied LM decoder weight (= the decoder's word embeddings) and bias,
``position_ids`` buffers. Dropped with a reason: every ``*_m`` momentum module (evaluation uses
the student, as ALBEF's evaluation does), and the TA file's ``text_proj`` / ``temp``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from model.checkpoints import MappedState, bert_encoder_key, map_keys

REASON_MOMENTUM = "momentum twin (*_m): not used to evaluate (ALBEF evaluates the student)"
REASON_TA_UNUSED = "text-assignment file: text_proj / temp are not used by NLVR2"
REASON_POSITION_IDS = "BERT position_ids buffer (0..P-1, rebuilt by transformers)"
REASON_TIED = "LM decoder weight / bias tied to the decoder's word embeddings / head bias"


def _decoder(body: str) -> str | None:
    if body.startswith("bert.embeddings."):
        return "decoder." + body[len("bert."):]
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", body)
    if m is not None:
        return f"decoder.layer.{m[1]}.{m[2]}"
    if body == "cls.predictions.bias" or body.startswith("cls.predictions.transform."):
        return "decoder.head." + body[len("cls.predictions."):]
    return None


def official_task_key_to_ours(key: str, text_layers: int) -> str | None:
    """Our task-model name of one official key; None if it has no counterpart."""
    head, _, body = key.partition(".")
    if head == "visual_encoder" and body:
        return key
    if head in ("cls_head", "ta_head") and body:
        return "cls_head." + body
    if head == "vision_proj" and body:
        return key
    if head == "text_encoder":
        return bert_encoder_key(body.removeprefix("bert."), text_layers)
    if head == "text_decoder":
        return _decoder(body)
    return None


def ours_task_key_to_official(key: str, text_layers: int, ta: bool = False) -> str:
    """The official name of one of our task-model keys (the inverse of the map above)."""
    head, _, body = key.partition(".")
    if head in ("visual_encoder", "vision_proj"):
        return key
    if head == "cls_head":
        return ("ta_head." if ta else "cls_head.") + body
    m = re.fullmatch(r"layer\.(\d+)\.(.+)", body)
    if head == "text_encoder":
        if body.startswith("embeddings."):
            return "text_encoder." + body
        assert m is not None, key
        return f"text_encoder.encoder.layer.{m[1]}.{m[2]}"
    if head == "fusion_encoder" and m is not None:
        return f"text_encoder.encoder.layer.{int(m[1]) + text_layers}.{m[2]}"
    if head == "decoder":
        if body.startswith("embeddings."):
            return "text_decoder.bert." + body
        if m is not None:
            return f"text_decoder.bert.encoder.layer.{m[1]}.{m[2]}"
        if body.startswith("head."):
            return "text_decoder.cls.predictions." + body[len("head."):]
    raise ValueError(f"{key!r} has no counterpart in ALBEF's task checkpoints")


def _dropped(key: str, state: Mapping[str, Tensor]) -> tuple[str, str | None] | None:
    """(reason, problem or None) for official keys dropped on purpose."""
    head, _, body = key.partition(".")
    if head.endswith("_m"):
        return REASON_MOMENTUM, None
    if head in ("text_proj", "temp"):
        return REASON_TA_UNUSED, None
    if body.endswith("embeddings.position_ids"):
        return REASON_POSITION_IDS, None
    if head == "text_decoder" and body.startswith("cls.predictions.decoder."):
        partner = ("text_decoder.bert.embeddings.word_embeddings.weight"
                   if body.endswith("weight") else "text_decoder.cls.predictions.bias")
        same = partner in state and torch.equal(state[partner], state[key])
        return REASON_TIED, None if same else f"{key} differs from its tied partner {partner}"
    return None


def map_official_task_state(state: Mapping[str, Tensor], text_layers: int) -> MappedState:
    """An official fine-tuned (or TA) state dict in the task models' naming."""
    return map_keys(state, lambda key: official_task_key_to_ours(key, text_layers),
                    lambda key: _dropped(key, state))


def is_official_task_state(state: Mapping[str, Tensor]) -> bool:
    """ALBEF's naming (``text_encoder.encoder.layer.*``) rather than ours
    (``text_encoder.layer.*``)."""
    return any(k.startswith(("text_encoder.encoder.", "text_encoder.bert.")) for k in state)
