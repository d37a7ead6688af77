"""ALBEF's MLM token corruption (docs/ALBEF.md §2.3, docs/ALBEF.md C2 and C26)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the masking rule needs, read from the tokenizer (never hard-coded)."""

    pad: int
    cls: int
    mask: int
    vocab_size: int


def mask_tokens(
    input_ids: Tensor,
    special: SpecialIds,
    prob: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Return (masked_ids, labels), both (B, L).

    Each position is selected with probability ``prob`` except [PAD] and [CLS] (the only
    exclusions: ALBEF has no [SEP]); of the selected, 80% become [MASK], half of the rest a random
    id from the *whole* vocabulary, and the remaining ~10% stay. Labels are -100 elsewhere.
    The four draws are full-shape and made in ALBEF's order.
    """
    shape, device = input_ids.shape, input_ids.device
    selected = torch.rand(shape, generator=generator, device=device) < prob
    selected &= (input_ids != special.pad) & (input_ids != special.cls)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    to_mask = (torch.rand(shape, generator=generator, device=device) < 0.8) & selected
    to_random = (torch.rand(shape, generator=generator, device=device) < 0.5) & selected & ~to_mask
    random_ids = torch.randint(
        special.vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype
    )
    masked = torch.where(to_mask, torch.full_like(input_ids, special.mask), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels
