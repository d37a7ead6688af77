"""The only place where configuration meets constructors."""

from __future__ import annotations

import logging

from model.albef import ALBEF
from model.bert import FusionEncoder, MLMHead, TextEncoder, make_bert_config
from model.config.schema import ExperimentConfig, ModelConfig
from model.momentum import FeatureQueue, make_momentum_twin
from model.objective import Objective, ObjectiveSettings
from model.text_masking import SpecialIds
from model.vit import build_vit

log = logging.getLogger(__name__)


def resolve_vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary must equal the tokenizer's (MLM draws ids from it)."""
    if cfg.text.vocab_size is None:
        return tokenizer_vocab
    if cfg.text.vocab_size != tokenizer_vocab:
        raise ValueError(
            f"model.text.vocab_size={cfg.text.vocab_size} but the tokenizer has "
            f"{tokenizer_vocab} tokens; set model.text.vocab_size: null to follow the tokenizer"
        )
    return cfg.text.vocab_size


def build_albef(cfg: ModelConfig, vocab_size: int, pad_id: int = 0,
                with_mlm: bool = True) -> ALBEF:
    """ALBEF at any size from the config, randomly initialised.

    model.pretrained loads BERT / DeiT weights; model.checkpoints loads whole checkpoints.
    """
    v, t = cfg.vision, cfg.text
    bert_cfg = make_bert_config(vocab_size, t.hidden, t.heads, t.intermediate, t.max_positions,
                                t.hidden_dropout, t.attn_dropout, pad_id, t.init_std)
    return ALBEF(
        visual_encoder=build_vit(v.image_size, v.patch_size, v.width, v.depth, v.heads,
                                 v.mlp_ratio),
        text_encoder=TextEncoder(bert_cfg, t.text_layers),
        fusion_encoder=FusionEncoder(bert_cfg, t.fusion_layers, image_width=v.width),
        mlm_head=MLMHead(bert_cfg) if with_mlm else None,
        vision_width=v.width,
        text_width=t.hidden,
        embed_dim=cfg.embed_dim,
        temp=cfg.temp,
    )


def objective_settings(cfg: ExperimentConfig) -> ObjectiveSettings:
    """Flatten the experiment config into the step's plain settings."""
    retrieval = cfg.train.mode == "retrieval"
    mmda = cfg.mmda
    return ObjectiveSettings(
        itc_weight=cfg.loss.itc,
        itm_weight=cfg.loss.itm,
        mlm_weight=0.0 if retrieval else cfg.loss.mlm,
        mlm_prob=cfg.loss.mlm_prob,
        focal_gamma=cfg.loss.focal_gamma,
        focal_detach=cfg.loss.focal_detach,
        momentum=cfg.model.momentum,
        retrieval=retrieval,
        patch_mask_mode=cfg.softmask.mode,
        softmask_layer=cfg.softmask.layer,
        softmask_word=cfg.softmask.word,
        random_p=cfg.softmask.random_p,
        softmask_mlm=cfg.softmask.apply_to == "itm_mlm",
        mmda_strong_image=mmda.enabled and mmda.strong_image,
        mmda_masked_text=mmda.enabled and mmda.masked_text and not retrieval,
    )


def build_objective(cfg: ExperimentConfig, special: SpecialIds, seed: int | None = None,
                    student: ALBEF | None = None) -> Objective:
    """Student (built or injected), its momentum twin, the queues and the step settings.

    Modules whose loss weight is 0 are not built (no MLM head for retrieval fine-tuning), so
    DDP sees no unused parameters and benchmarks reflect the saved compute.
    """
    settings = objective_settings(cfg)
    if student is None:
        student = build_albef(cfg.model, resolve_vocab_size(cfg.model, special.vocab_size),
                              special.pad, with_mlm=settings.mlm_weight > 0)
    teacher = make_momentum_twin(student)
    queue = FeatureQueue(cfg.model.embed_dim, cfg.model.queue_size)
    return Objective(student, teacher, queue, special, settings,
                     seed=cfg.train.seed if seed is None else seed)
