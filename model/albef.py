"""The ALBEF network: encoders, projections, ITM/MLM heads and the learnable temperature.

This module holds architecture only. Loss math lives in ``model/losses.py``, the momentum twin and
queues in ``model/momentum.py``, and the training-step composition in ``model/objective.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.bert import FusionEncoder, FusionOutput, MLMHead, TextEncoder


@dataclass
class ImageOutput:
    """tokens: (B, 1+N, Dv) ViT output after the final LayerNorm; feat: (B, d) unit-norm."""

    tokens: Tensor
    feat: Tensor


@dataclass
class TextOutput:
    """states: (B, L, Dt) text-encoder output; feat: (B, d) unit-norm projection of its CLS."""

    states: Tensor
    feat: Tensor


class ALBEF(nn.Module):
    """ViT + split BERT + heads (docs/ALBEF.md §1). Modules are injected by ``model.build``.

    The three heads keep PyTorch's default Linear init, as in ALBEF (docs/ALBEF.md C24). ``temp``
    is the raw temperature (logits = similarity / temp), initialised to 0.07 (§1.3).
    """

    def __init__(
        self,
        visual_encoder: nn.Module,
        text_encoder: TextEncoder,
        fusion_encoder: FusionEncoder,
        mlm_head: MLMHead | None,
        vision_width: int,
        text_width: int,
        embed_dim: int,
        temp: float,
        with_itm_head: bool = True,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.fusion_encoder = fusion_encoder
        self.mlm_head = mlm_head
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2) if with_itm_head else None
        self.temp = nn.Parameter(torch.tensor(float(temp))) if with_itm_head else None

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the ViT blocks' and BERT layers' activations in the backward pass instead
        of keeping them (``train.activation_checkpointing``): less memory, one more forward per
        layer, the same numbers (tests/engine/test_memory_levers.py). The ViT uses timm's own
        switch."""
        self.visual_encoder.set_grad_checkpointing(enabled)
        self.text_encoder.checkpointing = enabled
        self.fusion_encoder.checkpointing = enabled

    def encode_image(self, images: Tensor) -> ImageOutput:
        """images: (B, 3, H, W) -> ViT tokens and the projected CLS feature."""
        tokens = self.visual_encoder.forward_features(images)
        return ImageOutput(tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """input_ids, attention_mask: (B, L) -> text-layer states and the projected CLS feature.

        The ITC text feature is the CLS of the *text-mode* output, not the fused one
        (docs/ALBEF.md C7).
        """
        states = self.text_encoder(input_ids, attention_mask)
        return TextOutput(states, F.normalize(self.text_proj(states[:, 0]), dim=-1))

    def fuse(
        self,
        text_states: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor | Sequence[tuple[Tensor, Tensor]],
        attn_layer: int | None = None,
        cls_only: bool = False,
    ) -> FusionOutput:
        """Fusion layers over cached text states (ALBEF ``mode='fusion'``); the image side may
        be given as its per-layer keys/values (``FusionEncoder.image_keys_values``);
        ``cls_only``: only the [CLS] row of the last layer (what ``itm_logits`` reads)."""
        return self.fusion_encoder(text_states, attention_mask, image_tokens, attn_layer,
                                   cls_only)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """fused: (B, L, D) -> ITM logits (B, 2) from the fused CLS; class 1 = match."""
        assert self.itm_head is not None, "the momentum twin has no ITM head"
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, fused: Tensor) -> Tensor:
        """fused: (..., D) -> vocabulary logits (..., V) with the tied decoder."""
        assert self.mlm_head is not None, "this model was built without an MLM head"
        return self.mlm_head(fused, self.text_encoder.embeddings.word_embeddings.weight)
