"""Momentum (EMA) twin and the feature queues (docs/ALBEF.md §1.4, §1.5), written once."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.albef import ALBEF


def make_momentum_twin(student: ALBEF) -> ALBEF:
    """A frozen copy of the student's encoders, projections and MLM head.

    ALBEF keeps momentum copies of visual_encoder, vision_proj, text_encoder (MLM head included)
    and text_proj; the ITM head and ``temp`` have none (§1.4). Copies start equal to the student.
    """
    twin = copy.deepcopy(student)
    twin.itm_head = None
    twin.temp = None
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_m <- mu * theta_m + (1 - mu) * theta, over parameters only (no buffers), by name.

    Pairing by name (not by iteration order, as ALBEF does) makes a structural mismatch an error
    instead of a silent mis-pairing.
    """
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        t_list.append(t)
        s_list.append(s_params[name])
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


def concat_all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class FeatureQueue(nn.Module):
    """Ring buffers of momentum features (d, K) plus image ids for retrieval fine-tuning.

    Initialised with random unit columns (they act as negatives until overwritten,
    docs/ALBEF.md C10);
    ``idx_queue`` starts at -100 (never equal to a real image id).
    """

    def __init__(self, embed_dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Overwrite the next B*W columns with the all-gathered momentum features (B, d)."""
        image_feat = concat_all_gather(image_feat)
        text_feat = concat_all_gather(text_feat)
        n = image_feat.shape[0]
        if self.size % n != 0:
            raise ValueError(
                f"queue size {self.size} is not divisible by the global batch {n}; "
                "choose model.queue_size as a multiple of train.batch_size x world size"
            )
        # The pointer stays a device tensor: slicing with a Python int would force a host sync
        # on GPU every step; index_copy_ takes a device index instead.
        cols = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)
        self.image_queue.index_copy_(1, cols, image_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text_feat.T.to(self.text_queue.dtype))
        if idx is not None:
            self.idx_queue.index_copy_(1, cols, concat_all_gather(idx).view(1, -1))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.size)
