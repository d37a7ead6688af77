"""Pre-trained ALBEF (student and momentum twin) for a task stage, loaded loudly.

The task's student starts from the checkpoint's student; its momentum teacher from the
checkpoint's momentum weights when the file has them (ALBEF's SNLI-VE and VQA loaders fill their
``*_m`` modules from the pre-training ``*_m`` weights), else from a copy of the loaded student.
ALBEF's NLVR2 script copies the teacher *before* loading its TA checkpoint (which has no ``*_m``
weights), so its teacher starts from the un-loaded model; this harness copies after loading.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from model.albef import ALBEF
from model.bert import make_bert_config
from model.build import build_albef, resolve_vocab_size
from model.checkpoints import (
    AllowRule,
    LoadReport,
    apply_state,
    detect_format,
    load_checkpoint_state,
    map_albef_state,
)
from model.config.loader import replace_path
from model.config.schema import ExperimentConfig

log = logging.getLogger(__name__)

REASON_TWIN_HEADS = ("the momentum twin has no ITM head and no temperature (ALBEF keeps none); "
                     "the task heads replace them")


@dataclass
class Backbones:
    student: ALBEF
    teacher: ALBEF | None
    teacher_source: str
    reports: list[LoadReport]


def bert_config(cfg: ExperimentConfig, vocab_size: int, pad_id: int):
    t = cfg.model.text
    return make_bert_config(vocab_size, t.hidden, t.heads, t.intermediate, t.max_positions,
                            t.hidden_dropout, t.attn_dropout, pad_id, t.init_std)


def _teacher_state(state: Mapping[str, Tensor], text_layers: int) -> dict[str, Tensor]:
    fmt = detect_format(state)
    mapped = dict(state) if fmt == "ours" else map_albef_state(state, text_layers, fmt,
                                                               on_problem="record").state
    return {k.removeprefix("teacher."): v for k, v in mapped.items() if k.startswith("teacher.")}


def load_backbones(cfg: ExperimentConfig, state: Mapping[str, Tensor], source: str,
                   tokenizer_vocab: int, pad_id: int, image_size: int, *, with_mlm: bool,
                   want_teacher: bool) -> Backbones:
    """Build ALBEF at ``image_size`` (pos_embed interpolated) and load the checkpoint into it."""
    model_cfg = replace_path(cfg.model, "vision.image_size", image_size)
    vocab = resolve_vocab_size(cfg.model, tokenizer_vocab)
    rules = [] if with_mlm else [AllowRule("unexpected", "mlm_head.*", "task without an LM "
                                           "head (only VQA's decoder starts from it)")]
    student = build_albef(model_cfg, vocab, pad_id, with_mlm=with_mlm)
    reports = [load_checkpoint_state(student, state, source=source, rules=rules)]
    if not want_teacher:
        return Backbones(student, None, "none (distillation off)", reports)
    twin = _teacher_state(state, cfg.model.text.text_layers)
    if not twin:
        log.info("%s has no momentum weights: the task teacher starts as a copy of the student",
                 source)
        return Backbones(student, copy.deepcopy(student), "copy of the loaded student", reports)
    teacher = build_albef(model_cfg, vocab, pad_id, with_mlm=with_mlm)
    report = LoadReport(source=f"{source} (momentum weights)", fmt=detect_format(state))
    twin_rules = [*rules, AllowRule("missing", "itm_head.*", REASON_TWIN_HEADS),
                  AllowRule("missing", "temp", REASON_TWIN_HEADS)]
    reports.append(apply_state(teacher, twin, report, rules=twin_rules))
    return Backbones(student, teacher, "the checkpoint's momentum weights", reports)
