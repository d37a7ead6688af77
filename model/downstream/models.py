"""The three downstream networks, assembled from a pre-trained ALBEF's modules (architecture only).

Each keeps only what its task runs (no ITC projections, ITM head or temperature), so data-parallel
training sees no unused parameters. Sub-module names follow ALBEF's roles: ``visual_encoder``,
``text_encoder``, ``fusion_encoder`` (``PairFusionEncoder`` for NLVR2), ``cls_head`` / ``decoder``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.bert import FusionEncoder, TextEncoder
from model.downstream.heads import AnswerDecoder, ClassifierHead, PairFusionEncoder

# ALBEF's text-assignment step samples the second image with softmax(sim / 0.07), a fixed
# temperature (not the learned one).
TA_TEMPERATURE = 0.07


class VEModel(nn.Module):
    """SNLI-VE: the standard ALBEF encoder, a 3-way MLP on the fused [CLS]."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: TextEncoder,
                 fusion_encoder: FusionEncoder, hidden: int, n_classes: int = 3) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.cls_head = ClassifierHead(hidden, n_classes)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """images (B, 3, H, W), input_ids / attention_mask (B, L) -> logits (B, n_classes)."""
        tokens = self.visual_encoder.forward_features(images)
        text = self.text_encoder(input_ids, attention_mask)
        fused = self.fusion_encoder(text, attention_mask, tokens).hidden
        return self.cls_head(fused[:, 0])


class NLVRModel(nn.Module):
    """NLVR2: one ViT pass over both images, the doubled fusion stack, an MLP on the [CLS].

    With ``vision_proj`` (kept from pre-training) it also runs ALBEF's text-assignment step
    (:meth:`image_similarity_weights`), whose head has 3 classes.
    """

    def __init__(self, visual_encoder: nn.Module, text_encoder: TextEncoder,
                 fusion_encoder: PairFusionEncoder, hidden: int, n_classes: int,
                 vision_proj: nn.Linear | None = None) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.cls_head = ClassifierHead(hidden, n_classes) if n_classes == 2 else \
            nn.Linear(hidden, n_classes)  # ALBEF's TA head is a single Linear
        self.vision_proj = vision_proj

    def encode_images(self, images: Tensor) -> Tensor:
        return self.visual_encoder.forward_features(images)

    def classify(self, tokens0: Tensor, tokens1: Tensor, input_ids: Tensor,
                 attention_mask: Tensor) -> Tensor:
        """Image tokens of slot 0 and slot 1 (B, 1+N, Dv) and the statement -> logits."""
        text = self.text_encoder(input_ids, attention_mask)
        fused = self.fusion_encoder(text, attention_mask, tokens0, tokens1)
        return self.cls_head(fused[:, 0])

    def forward(self, images0: Tensor, images1: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> Tensor:
        # One ViT pass over the 2B images, as ALBEF concatenates them.
        tokens = self.encode_images(torch.cat([images0, images1]))
        tokens0, tokens1 = tokens.split(images0.shape[0])
        return self.classify(tokens0, tokens1, input_ids, attention_mask)

    @torch.no_grad()
    def image_similarity_weights(self, tokens: Tensor) -> Tensor:
        """TA sampling weights (B, B): softmax over images of cos(v_i, v_j) / 0.07, diagonal 0."""
        assert self.vision_proj is not None, "the text-assignment step needs vision_proj"
        feat = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)
        weights = (feat @ feat.t() / TA_TEMPERATURE).softmax(dim=1)
        return weights.fill_diagonal_(0.0)


class VQAModel(nn.Module):
    """VQA: the ALBEF encoder produces question states; the answer decoder scores answers."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: TextEncoder,
                 fusion_encoder: FusionEncoder, decoder: AnswerDecoder) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.decoder = decoder

    def question_states(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor
                        ) -> Tensor:
        """(B, Lq, D): the fused question tokens the decoder cross-attends to."""
        tokens = self.visual_encoder.forward_features(images)
        text = self.text_encoder(input_ids, attention_mask)
        return self.fusion_encoder(text, attention_mask, tokens).hidden

    def answer_logits(self, states: Tensor, question_mask: Tensor, answer_ids: Tensor,
                      answer_mask: Tensor) -> Tensor:
        """Teacher-forced decoder logits (N, La, V); ``states`` / ``question_mask`` already
        repeated once per answer (N rows)."""
        return self.decoder(answer_ids, answer_mask, states, question_mask)
