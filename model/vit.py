"""ViT image encoder (timm) and ALBEF's position-embedding interpolation
(docs/ALBEF.md §1.1, §1.7)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def build_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int,
              mlp_ratio: float = 4.0) -> VisionTransformer:
    """A DeiT/ViT-B-style encoder returning all 1+N tokens after the final LayerNorm.

    ALBEF's ViT: qkv bias, LayerNorm eps 1e-6, exact GELU, all dropouts and drop-path 0,
    a class token, learned absolute position embedding (CLS included). Nothing is downloaded.
    """
    vit = VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )
    # ALBEF draws the CLS token from N(0, 0.02) like pos_embed (timm uses std 1e-6).
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    return vit


def interpolate_pos_embed(pos_embed: Tensor, num_patches: int) -> Tensor:
    """Resize a (1, 1+n_old, D) position embedding to (1, 1+num_patches, D).

    The CLS entry is kept; the patch grid is resized bicubically with align_corners=False,
    as ALBEF does for DeiT (14^2 -> 16^2) and for pre-training -> retrieval (16^2 -> 24^2).
    """
    extra = pos_embed.shape[1] - int(round((pos_embed.shape[1] - 1) ** 0.5)) ** 2
    old_side = int(round((pos_embed.shape[1] - extra) ** 0.5))
    new_side = int(round(num_patches**0.5))
    if old_side * old_side + extra != pos_embed.shape[1] or new_side**2 != num_patches:
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed.shape)} is not a square grid "
            f"(+{extra} extra tokens) or {num_patches} is not a square number of patches"
        )
    if old_side == new_side:
        return pos_embed
    cls_part, grid = pos_embed[:, :extra], pos_embed[:, extra:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(pos_embed.dtype)
    return torch.cat([cls_part, grid], dim=1)
