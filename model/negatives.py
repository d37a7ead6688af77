"""ALBEF's in-batch hard-negative sampling for ITM (docs/ALBEF.md §2.2 and C8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.losses import wide


@torch.no_grad()
def negative_weights(sim_batch: Tensor, idx: Tensor | None = None,
                     hardness: float = 1.0) -> Tensor:
    """Sampling weights from the student's (B, B) batch logits.

    Softmax over the batch columns, then zero the positives: the diagonal (pre-training) or
    every column with the same image id (retrieval fine-tuning). Not renormalised: multinomial
    sampling accepts unnormalised weights. ``hardness`` scales the logits first: 1 is ALBEF
    (negatives as hard as the ITC similarities make them), 0 draws uniformly random negatives;
    values in between are the tiny preset's curriculum (``loss.itm_neg_ramp``).
    """
    # Scaling by exactly 1.0 leaves every logit bit-identical: ALBEF's weights.
    weights = F.softmax(wide(sim_batch) * hardness, dim=1)
    # A diverged step (non-finite similarities) must not crash the sampler before the
    # divergence guard reports it: such rows fall back to uniform weights. Finite rows are
    # unchanged (the selection is exact), and nothing is read back to the host.
    finite = torch.isfinite(weights).all(dim=1, keepdim=True)
    weights = torch.where(finite, weights, torch.ones_like(weights))
    if idx is None:
        weights.fill_diagonal_(0.0)
    else:
        weights.masked_fill_(idx.view(-1, 1) == idx.view(1, -1), 0.0)
    return weights


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t_batch: Tensor,
    sim_t2i_batch: Tensor,
    generator: torch.Generator | None,
    idx: Tensor | None = None,
    hardness: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One negative per row: (negative image per text, negative text per image), both (B,).

    Drawn t2i first, then i2t (ALBEF's order). Rows are sampled in one vectorised call.
    ``hardness``: see :func:`negative_weights` (1 = ALBEF).
    """
    w_t2i = negative_weights(sim_t2i_batch, idx, hardness)
    w_i2t = negative_weights(sim_i2t_batch, idx, hardness)
    # Only retrieval batches (several captions per image) can leave a row without negatives;
    # the check syncs with the device, so the pre-training path skips it (diagonal-only zeroing
    # with B >= 2 always leaves a candidate).
    if idx is not None and bool((w_t2i.sum(1) == 0).any() | (w_i2t.sum(1) == 0).any()):
        raise ValueError(
            "a batch row has no valid negative (every other sample shares its image id); "
            "use a larger batch or shuffle captions across images"
        )
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text
