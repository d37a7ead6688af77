"""ITC (with momentum distillation and the focal variant), ITM and MLM losses.

Pure functions of tensors: no queues, no config objects, no module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_targets(teacher_logits: Tensor, hard_targets: Tensor, alpha: float) -> Tensor:
    """q = alpha * softmax(teacher) + (1 - alpha) * y  (ALBEF momentum distillation, §2.1)."""
    return alpha * F.softmax(teacher_logits, dim=1) + (1.0 - alpha) * hard_targets


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, gamma: float = 0.0, detach_modulation: bool = False
) -> Tensor:
    """Mean over rows of  -sum_j q_j (1 - p_j)^gamma log p_j,  p = softmax(logits).

    logits, targets: (B, C). gamma = 0 skips the modulating factor entirely, so the value is
    bit-identical to ALBEF's ITC term (method-spec §2: focal ITC with gamma = 0 is ALBEF).
    """
    log_p = F.log_softmax(logits, dim=1)
    weighted = targets * log_p
    if gamma != 0.0:
        modulation = (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma)
        if detach_modulation:
            modulation = modulation.detach()
        weighted = weighted * modulation
    return -weighted.sum(dim=1).mean()


def itc_loss(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    targets_i2t: Tensor,
    targets_t2i: Tensor,
    gamma: float = 0.0,
    detach_modulation: bool = False,
) -> Tensor:
    """Symmetric image-text contrastive loss: (L_i2t + L_t2i) / 2 over (B, B+K) logits."""
    l_i2t = soft_cross_entropy(sim_i2t, targets_i2t, gamma, detach_modulation)
    l_t2i = soft_cross_entropy(sim_t2i, targets_t2i, gamma, detach_modulation)
    return (l_i2t + l_t2i) / 2


def itm_loss(pos_logits: Tensor, neg_logits: Tensor, extra_pos_logits: Tensor | None = None
             ) -> Tensor:
    """Unweighted mean CE over the rows [B positives; 2B negatives; (B extra positives)].

    ALBEF's layout is positives (label 1) then negatives (label 0), pitfall 9; SoftMask appends
    its soft-masked pairs as further positives (method-spec §1).
    """
    parts = [pos_logits, neg_logits] + ([extra_pos_logits] if extra_pos_logits is not None else [])
    # Labels are made on the logits' device: no host-to-device copy inside the step.
    kw = {"dtype": torch.long, "device": pos_logits.device}
    labels = [torch.ones(pos_logits.shape[0], **kw), torch.zeros(neg_logits.shape[0], **kw)]
    if extra_pos_logits is not None:
        labels.append(torch.ones(extra_pos_logits.shape[0], **kw))
    return F.cross_entropy(torch.cat(parts).float(), torch.cat(labels))


def mlm_loss(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float
) -> Tensor:
    """(1 - alpha) * CE + alpha * KD, both token-level means over the masked tokens (§2.3).

    logits, teacher_logits: (M, V) at the M masked positions only (the unmasked ones carry no
    loss, so their vocabulary projection is never computed); labels: (M,).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_p, labels)
    if teacher_logits is None or alpha == 0.0:
        return ce
    kd = -(F.softmax(teacher_logits.float(), dim=-1) * log_p).sum(dim=-1).mean()
    return (1.0 - alpha) * ce + alpha * kd
