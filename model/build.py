"""The only place where configuration meets constructors."""

from __future__ import annotations

import logging

from model.albef import ALBEF
from model.bert import FusionEncoder, MLMHead, TextEncoder, make_bert_config
from model.config.schema import ExperimentConfig, ModelConfig
from model.momentum import FeatureQueue, make_momentum_twin
from model.objective import Objective, ObjectiveConfig
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


def compile_layers(albef: ALBEF, gradcam_layer: int) -> None:
    """``torch.compile`` the ViT blocks and BERT layers in place (``train.compile``), except
    the fusion layer Grad-CAM explains (SoftMask, and the localisation evaluation of every
    cell): a compiled layer returns its attention probabilities as an output of one fused
    autograd node, so no gradient can be taken with respect to them. The step as a whole is
    not compiled for the same reason."""
    for block in albef.visual_encoder.blocks:
        block.compile()
    for layer in albef.text_encoder.layer:
        layer.compile()
    for i, layer in enumerate(albef.fusion_encoder.layer):
        if i != gradcam_layer:
            layer.compile()


def build_objective(cfg: ExperimentConfig, special: SpecialIds, seed: int | None = None,
                    student: ALBEF | None = None) -> Objective:
    """Student (built or injected), its momentum twin, the queues and the step settings.

    Modules whose loss weight is 0 are not built (no MLM head for retrieval fine-tuning), so
    DDP sees no unused parameters and benchmarks reflect the saved compute.
    """
    objective_cfg = ObjectiveConfig.of(cfg)
    if student is None:
        student = build_albef(cfg.model, resolve_vocab_size(cfg.model, special.vocab_size),
                              special.pad, with_mlm=objective_cfg.weights["mlm"] > 0)
    teacher = make_momentum_twin(student)
    # After the twin is made: the teacher runs without gradients, where checkpointing is moot.
    student.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_layers(student, cfg.softmask.layer)
    queue = FeatureQueue(cfg.model.embed_dim, cfg.model.queue_size)
    return Objective(student, teacher, queue, special, objective_cfg,
                     seed=cfg.train.seed if seed is None else seed)
