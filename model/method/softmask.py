"""Soft feature masks from Grad-CAM (SoftMask) and random hard masks (RandMask), docs/METHOD.md §1.

Masks multiply the image *patch* tokens; the image [CLS] token is never masked. Masks carry no
gradient: they are a data-dependent augmentation, not a path for the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.method.gradcam import minmax_normalise


def real_word_mask(input_ids: Tensor, attention_mask: Tensor, special_ids: Tensor,
                   labels: Tensor | None = None) -> Tensor:
    """(B, L) bool: tokens that are real words (not special/pad; not replaced by text masking)."""
    real = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    if labels is not None:
        real &= labels == -100
    return real


def choose_words(candidates: Tensor, generator: torch.Generator | None) -> Tensor:
    """One position per row, uniform over the row's True entries; (B,) long.

    A row without any candidate falls back to position 0 ([CLS]), whose map is still a valid
    Grad-CAM of the whole caption.
    """
    weights = candidates.float()
    empty = weights.sum(dim=1) == 0
    weights[:, 0] = torch.where(empty, torch.ones_like(weights[:, 0]), weights[:, 0])
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def soft_mask_from_maps(maps: Tensor, words: Tensor | None, real: Tensor | None = None
                        ) -> Tensor:
    """M_b = 1 - minmax(G_b[t_b])  -> (B, N) in [0, 1]; ``words=None`` averages over real words.

    maps: (B, L, N) Grad-CAM maps (padded rows already zero).
    real: (B, L) bool candidates (``real_word_mask``) for ``words=None``; a row without any
    falls back to the [CLS] map, as ``choose_words`` does. ``None``: every position is averaged.
    """
    if words is None:
        if real is None:
            chosen = maps.mean(dim=1)
        else:
            weights = real.to(maps.dtype)
            empty = weights.sum(dim=1) == 0
            weights[:, 0] = torch.where(empty, torch.ones_like(weights[:, 0]), weights[:, 0])
            chosen = (maps * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    else:
        chosen = maps[torch.arange(maps.shape[0], device=maps.device), words]
    return 1.0 - minmax_normalise(chosen)


def random_patch_mask(batch: int, num_patches: int, p: float, generator: torch.Generator | None,
                      device: torch.device) -> Tensor:
    """RandMask: each patch kept with probability 1 - p -> (B, N) of {0, 1}."""
    draws = torch.rand((batch, num_patches), generator=generator, device=device)
    return (draws >= p).float()


def apply_patch_mask(image_tokens: Tensor, mask: Tensor) -> Tensor:
    """V' = [v_cls, M * v_1..N]: image_tokens (B, 1+N, D), mask (B, N) -> (B, 1+N, D)."""
    mask = mask.detach().to(image_tokens.dtype)
    return torch.cat([image_tokens[:, :1], image_tokens[:, 1:] * mask.unsqueeze(-1)], dim=1)
