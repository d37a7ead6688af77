"""The one training-step objective: ALBEF (ITC + ITM + MLM) with SoftMask++'s switches.

``Objective.forward(batch, alpha)`` is what training, the benchmarks and the tests call (and what
DDP wraps). With every switch at its identity value (softmask off, focal_gamma 0, MMDA off) the
code path is ALBEF's forward (docs/ALBEF.md §2) step for step:

1. clamp temp; 2. online image/text features; 3. EMA update, momentum features (clean text,
standard view); 4. ITC with momentum distillation against batch + queue keys; 5. enqueue;
6. ITM on positives + in-batch hard negatives; 7. MLM with momentum distillation.

Method switches (docs/METHOD.md §1-3):
* focal ITC: (1 - p)^gamma on the distilled ITC terms (``loss.focal_gamma``);
* MMDA: student sees the strong view and masked text; one fusion pass feeds ITM and MLM;
* SoftMask / RandMask: the positive pass's Grad-CAM (or a random hard mask) masks the patch
  tokens; the masked pairs are extra ITM positives (and optionally MLM inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.albef import ALBEF, ImageOutput, TextOutput
from model.config.schema import ExperimentConfig, LossConfig, MMDAConfig, SoftMaskConfig
from model.losses import itc_loss, itm_loss, itm_pair_stats, mlm_loss, soft_targets, wide
from model.method.gradcam import gradcam_maps
from model.method.softmask import (
    apply_patch_mask,
    choose_words,
    random_patch_mask,
    real_word_mask,
    soft_mask_from_maps,
)
from model.momentum import FeatureQueue, ema_update
from model.negatives import sample_hard_negatives
from model.text_masking import IGNORE, SpecialIds, mask_tokens


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the step reads, as the config names it (no renaming layer): the loss, SoftMask and
    MMDA sections, the EMA momentum and whether this is ALBEF's retrieval fine-tuning."""

    loss: LossConfig = field(default_factory=LossConfig)
    softmask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    mmda: MMDAConfig = field(default_factory=MMDAConfig)
    momentum: float = 0.995
    retrieval: bool = False

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ObjectiveConfig:
        return cls(cfg.loss, cfg.softmask, cfg.mmda, cfg.model.momentum,
                   cfg.train.mode == "retrieval")

    @property
    def weights(self) -> dict[str, float]:
        """Every loss term's weight (LossConfig.TERMS); ALBEF's retrieval fine-tuning has no
        MLM."""
        weights = self.loss.weights()
        if self.retrieval:
            weights["mlm"] = 0.0
        return weights

    @property
    def strong_image(self) -> bool:
        return self.mmda.enabled and self.mmda.strong_image

    @property
    def masked_text(self) -> bool:
        """MMDA's masked caption in the student's text encoder (one shared ITM + MLM pass)."""
        return self.mmda.enabled and self.mmda.masked_text and not self.retrieval


@dataclass
class StepOutput:
    """loss: weighted total (scalar); losses: unweighted named terms; stats: detached scalars."""

    loss: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _ITMResult:
    loss: Tensor
    pos_hidden: Tensor  # (B, L, D) fused states of the positive pass
    masked_hidden: Tensor | None  # (B, L, D) fused states of the masked pairs, if any
    stats: dict[str, Tensor]


@dataclass
class _Inputs:
    student_images: Tensor
    teacher_images: Tensor
    student_ids: Tensor
    clean_ids: Tensor
    attention_mask: Tensor
    masked_ids: Tensor | None
    labels: Tensor | None
    idx: Tensor | None


class Objective(nn.Module):
    """Student, momentum twin and queues, plus the step's seeded generator.

    The generator drives every random choice of the step (hard negatives, MLM corruption,
    word choice, random masks); its state is saved in checkpoints for exact resume.
    """

    def __init__(self, student: ALBEF, teacher: ALBEF, queue: FeatureQueue,
                 special: SpecialIds, cfg: ObjectiveConfig, seed: int) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.queue = queue
        self.special = special
        self.cfg = cfg
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.register_buffer("special_ids", torch.tensor(
            sorted({special.pad, special.cls, special.mask}), dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------------------- helpers
    @property
    def generator(self) -> torch.Generator:
        device = self.queue.image_queue.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def _prepare(self, batch: dict[str, Tensor]) -> _Inputs:
        c = self.cfg
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked_ids = labels = None
        if c.weights["mlm"] > 0:
            masked_ids, labels = mask_tokens(ids, self.special, c.loss.mlm_prob, self.generator)
        images = batch["image"]
        strong = batch.get("image_strong") if c.strong_image else None
        if c.strong_image and strong is None:
            raise ValueError("mmda.strong_image is on but the batch has no 'image_strong' view")
        return _Inputs(
            student_images=strong if strong is not None else images,
            teacher_images=images,
            student_ids=masked_ids if (c.masked_text and masked_ids is not None) else ids,
            clean_ids=ids,
            attention_mask=mask,
            masked_ids=masked_ids,
            labels=labels,
            idx=batch.get("image_idx") if c.retrieval else None,
        )

    # ----------------------------------------------------------------------------- ITC
    def _itc(self, img: ImageOutput, txt: TextOutput, t_img: ImageOutput, t_txt: TextOutput,
             idx: Tensor | None, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """ALBEF §2.1: online features vs momentum keys (batch then queue), distilled targets."""
        temp = self.student.temp
        image_keys = torch.cat([wide(t_img.feat.T), self.queue.image_queue.clone()], dim=1)
        text_keys = torch.cat([wide(t_txt.feat.T), self.queue.text_queue.clone()], dim=1)
        sim_i2t = wide(img.feat) @ text_keys / temp
        sim_t2i = wide(txt.feat) @ image_keys / temp
        with torch.no_grad():
            hard = self._itc_hard_targets(sim_i2t, idx)
            q_i2t = soft_targets(wide(t_img.feat) @ text_keys / temp, hard, alpha)
            q_t2i = soft_targets(wide(t_txt.feat) @ image_keys / temp, hard, alpha)
        loss = itc_loss(sim_i2t, sim_t2i, q_i2t, q_t2i,
                        self.cfg.loss.focal_gamma, self.cfg.loss.focal_detach)
        return loss, sim_i2t, sim_t2i

    def _itc_hard_targets(self, sim: Tensor, idx: Tensor | None) -> Tensor:
        if idx is None:  # pre-training: the paired sample only (duplicates count as negatives)
            hard = torch.zeros_like(sim)
            hard.fill_diagonal_(1.0)
            return hard
        # retrieval: every batch/queue entry of the same image is a positive (docs/ALBEF.md C20)
        idx_all = torch.cat([idx.view(1, -1), self.queue.idx_queue.clone()], dim=1)
        pos = (idx.view(-1, 1) == idx_all).float()
        return pos / pos.sum(dim=1, keepdim=True)

    # ----------------------------------------------------------------------------- ITM
    def _itm(self, img: ImageOutput, txt: TextOutput, inp: _Inputs, sim_i2t: Tensor,
             sim_t2i: Tensor, hardness: float) -> _ITMResult:
        """ALBEF §2.2 plus SoftMask's extra positives."""
        sm, b, mask = self.cfg.softmask, img.tokens.shape[0], inp.attention_mask
        want_attn = sm.mode == "gradcam"
        pos = self.student.fuse(txt.states, mask, img.tokens,
                                attn_layer=sm.layer if want_attn else None)
        pos_logits = self.student.itm_logits(pos.hidden)
        neg_img, neg_txt = sample_hard_negatives(sim_i2t[:, :b], sim_t2i[:, :b],
                                                 self.generator, inp.idx, hardness)
        neg = self.student.fuse(
            torch.cat([txt.states, txt.states[neg_txt]]),
            torch.cat([mask, mask[neg_txt]]),
            torch.cat([img.tokens[neg_img], img.tokens]),
        )
        neg_logits = self.student.itm_logits(neg.hidden)
        stats: dict[str, Tensor] = {}
        masked_hidden = extra = None
        if sm.mode != "off":
            patch_mask = self._patch_mask(pos_logits, pos.cross_attn, inp, img.tokens.shape[1] - 1)
            masked_hidden = self.student.fuse(
                txt.states, mask, apply_patch_mask(img.tokens, patch_mask)).hidden
            extra = self.student.itm_logits(masked_hidden)
            stats["mask_mean"] = patch_mask.mean().detach()
        loss = itm_loss(pos_logits, neg_logits, extra, self.cfg.loss.itm_label_smoothing)
        stats.update(itm_pair_stats(pos_logits, neg_logits, extra))
        return _ITMResult(loss, pos.hidden, masked_hidden, stats)

    def _patch_mask(self, pos_logits: Tensor, cross_attn: Tensor | None, inp: _Inputs,
                    num_patches: int) -> Tensor:
        """(B, N) mask: 1 - minmax(Grad-CAM of one random word) or RandMask's {0, 1}."""
        sm = self.cfg.softmask
        if sm.mode == "random":
            return random_patch_mask(pos_logits.shape[0], num_patches, sm.random_p,
                                     self.generator, pos_logits.device)
        assert cross_attn is not None
        maps = gradcam_maps(pos_logits, cross_attn, inp.attention_mask)
        labels = inp.labels if self.cfg.masked_text else None
        real = real_word_mask(inp.student_ids, inp.attention_mask, self.special_ids, labels)
        if sm.word == "mean":
            return soft_mask_from_maps(maps, None, real)
        return soft_mask_from_maps(maps, choose_words(real, self.generator))

    # ----------------------------------------------------------------------------- MLM
    def _mlm(self, img: ImageOutput, t_img: ImageOutput, inp: _Inputs, shared_hidden: Tensor,
             masked_hidden: Tensor | None, alpha: float) -> Tensor:
        """ALBEF §2.3: student vs momentum-teacher predictions at the masked positions only.

        With MMDA the positive ITM pass already ran on (masked text, image): its states are
        reused (one fusion forward for ITM and MLM). Otherwise ALBEF's separate full pass runs.
        """
        assert inp.masked_ids is not None and inp.labels is not None
        mask, where = inp.attention_mask, inp.labels != IGNORE
        if self.cfg.masked_text:
            hidden = shared_hidden
        else:
            m_txt = self.student.text_encoder(inp.masked_ids, mask)
            hidden = self.student.fuse(m_txt, mask, img.tokens).hidden
        with torch.no_grad():
            t_states = self.teacher.text_encoder(inp.masked_ids, mask)
            t_hidden = self.teacher.fuse(t_states, mask, t_img.tokens).hidden
            t_logits = self.teacher.mlm_logits(t_hidden[where])
        labels = inp.labels[where]
        loss = mlm_loss(self.student.mlm_logits(hidden[where]), labels, t_logits, alpha)
        if masked_hidden is not None and self.cfg.softmask.apply_to == "itm_mlm":
            masked_loss = mlm_loss(self.student.mlm_logits(masked_hidden[where]), labels,
                                   t_logits, alpha)
            loss = (loss + masked_loss) / 2
        return loss

    # ----------------------------------------------------------------------------- step
    def forward(self, batch: dict[str, Tensor], alpha: float, enqueue: bool = True,
                hardness: float = 1.0) -> StepOutput:
        """One training step's losses. batch: image (B,3,H,W), input_ids/attention_mask (B,L),
        optional image_strong (B,3,H,W) and image_idx (B,). ``alpha``: distillation weight;
        ``enqueue``: push this step's momentum features into the queues (ALBEF: always);
        ``hardness``: ITM negative sampling sharpness (1 = ALBEF, 0 = random negatives)."""
        weights = self.cfg.weights
        if not self.cfg.retrieval:  # ALBEF clamps temp in pre-training only (docs/ALBEF.md C13)
            with torch.no_grad():
                self.student.temp.clamp_(0.001, 0.5)
        inp = self._prepare(batch)
        img = self.student.encode_image(inp.student_images)
        txt = self.student.encode_text(inp.student_ids, inp.attention_mask)
        with torch.no_grad():
            ema_update(self.teacher, self.student, self.cfg.momentum)
            t_img = self.teacher.encode_image(inp.teacher_images)
            t_txt = self.teacher.encode_text(inp.clean_ids, inp.attention_mask)
        loss_itc, sim_i2t, sim_t2i = self._itc(img, txt, t_img, t_txt, inp.idx, alpha)
        if enqueue:
            self.queue.enqueue(t_img.feat, t_txt.feat, inp.idx)
        itm = self._itm(img, txt, inp, sim_i2t, sim_t2i, hardness)
        # One line per loss term (docs/ARCHITECTURE.md "Adding a loss term"); each is logged as
        # loss/<name>, and the total is their weighted sum (LossConfig.TERMS).
        losses = {"itc": loss_itc, "itm": itm.loss}
        if weights["mlm"] > 0:
            losses["mlm"] = self._mlm(img, t_img, inp, itm.pos_hidden, itm.masked_hidden, alpha)
        total = sum(weights[k] * v for k, v in losses.items())
        stats = {"temp": self.student.temp.detach(), **itm.stats}
        return StepOutput(loss=total, losses=losses, stats=stats)
