"""Word-conditional Grad-CAM on the fusion cross-attention (docs/METHOD.md §1, docs/ALBEF.md §7).

A pure function over tensors of the positive ITM forward: no hooks, no module state, no
``.backward()``. The gradient is taken with ``torch.autograd.grad`` w.r.t. the returned attention
probabilities, which never writes a parameter's ``.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradcam_maps(
    itm_logits: Tensor, cross_attn: Tensor, attention_mask: Tensor, create_graph: bool = False
) -> Tensor:
    """Per-word Grad-CAM over image patches.

    G_b = mean_heads( A[b, :, :, 1:] * relu(dA[b, :, :, 1:]) ),  dA = d(sum_b s_b)/dA,
    where s_b is the positive-class (index 1) ITM logit, pre-softmax.

    Args:
        itm_logits: (B, 2) ITM logits of the positive pairs (graph to ``cross_attn`` intact).
        cross_attn: (B, H, L, 1+N) post-softmax, pre-dropout cross-attention probabilities.
        attention_mask: (B, L) text padding mask; padded rows are zeroed (docs/ALBEF.md C25).
    Returns:
        (B, L, N) non-negative maps; the image CLS column is dropped. Detached.
    """
    score = itm_logits[:, 1].sum()
    (grad,) = torch.autograd.grad(score, cross_attn, retain_graph=True, create_graph=create_graph)
    cam = cross_attn[..., 1:] * grad[..., 1:].clamp_min(0.0)
    cam = cam * attention_mask[:, None, :, None].to(cam.dtype)
    return cam.mean(dim=1).detach()


def minmax_normalise(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max over the last axis (patches) into [0, 1]; an all-constant map becomes all zeros.

    A zero map then yields a mask of ones (no masking) rather than a division by zero.
    """
    lo = maps.amin(dim=-1, keepdim=True)
    hi = maps.amax(dim=-1, keepdim=True)
    span = hi - lo
    return torch.where(span > eps, (maps - lo) / span.clamp_min(eps), torch.zeros_like(maps))
