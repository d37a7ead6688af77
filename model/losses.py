"""ITC (with momentum distillation and the focal variant), ITM and MLM losses.

Pure functions of tensors: no queues, no config objects, no module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a narrower type (bf16 autocast), else unchanged: losses
    and similarities are reduced in float32 under mixed precision, and float64 stays float64
    (the float64 checks against the official code run the same code path)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def soft_targets(teacher_logits: Tensor, hard_targets: Tensor, alpha: float) -> Tensor:
    """q = alpha * softmax(teacher) + (1 - alpha) * y  (ALBEF momentum distillation, §2.1)."""
    return alpha * F.softmax(teacher_logits, dim=1) + (1.0 - alpha) * hard_targets


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, gamma: float = 0.0, detach_modulation: bool = False
) -> Tensor:
    """Mean over rows of  -sum_j q_j (1 - p_j)^gamma log p_j,  p = softmax(logits).

    logits, targets: (B, C). gamma = 0 skips the modulating factor entirely, so the value is
    bit-identical to ALBEF's ITC term (docs/METHOD.md §2: focal ITC with gamma = 0 is ALBEF).
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


def itm_loss(pos_logits: Tensor, neg_logits: Tensor, extra_pos_logits: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
    """Unweighted mean CE over the rows [B positives; 2B negatives; (B extra positives)].

    ALBEF's layout is positives (label 1) then negatives (label 0), docs/ALBEF.md C9; SoftMask
    appends its soft-masked pairs as further positives (docs/METHOD.md §1).
    ``label_smoothing`` (``loss.itm_label_smoothing``; 0 = ALBEF) smooths the two-class targets
    as ``F.cross_entropy`` does.
    """
    parts = [pos_logits, neg_logits] + ([extra_pos_logits] if extra_pos_logits is not None else [])
    # Labels are made on the logits' device: no host-to-device copy inside the step.
    kw = {"dtype": torch.long, "device": pos_logits.device}
    labels = [torch.ones(pos_logits.shape[0], **kw), torch.zeros(neg_logits.shape[0], **kw)]
    if extra_pos_logits is not None:
        labels.append(torch.ones(extra_pos_logits.shape[0], **kw))
    return F.cross_entropy(wide(torch.cat(parts)), torch.cat(labels),
                           label_smoothing=label_smoothing)


@torch.no_grad()
def itm_pair_stats(pos_logits: Tensor, neg_logits: Tensor,
                   extra_pos_logits: Tensor | None = None) -> dict[str, Tensor]:
    """ITM cross-entropy and accuracy per pair type, detached (diagnostics, not a loss).

    Groups follow ``itm_loss``'s layout: ``pos`` = the B clean positives; ``neg_img`` = the first
    B negative rows (each text with a hard-negative image); ``neg_txt`` = the next B (each image
    with a hard-negative text); ``masked`` = the soft/random-masked positives, when given. A
    head that only outputs the class prior gets the prior's loss in every group, so a group
    that learns shows as a loss below it. ``shortcut`` = acc(masked) - acc(pos): how much more
    often masked pairs are called "match" than clean ones (a head that recognises masking
    rather than matching has a large positive value).
    """
    b = pos_logits.shape[0]
    groups = {"pos": (pos_logits, 1), "neg_img": (neg_logits[:b], 0),
              "neg_txt": (neg_logits[b:], 0)}
    if extra_pos_logits is not None:
        groups["masked"] = (extra_pos_logits, 1)
    stats: dict[str, Tensor] = {}
    for name, (logits, label) in groups.items():
        logits = wide(logits)
        target = torch.full((logits.shape[0],), label, dtype=torch.long, device=logits.device)
        stats[f"itm/{name}_loss"] = F.cross_entropy(logits, target)
        stats[f"itm/{name}_acc"] = (logits.argmax(dim=1) == label).float().mean()
    # ALBEF's ITM loss over the clean pairs only (equal-sized groups: the mean of the three).
    stats["itm/clean_loss"] = (stats["itm/pos_loss"] + stats["itm/neg_img_loss"]
                               + stats["itm/neg_txt_loss"]) / 3
    stats["itm/clean_acc"] = (stats["itm/pos_acc"] + stats["itm/neg_img_acc"]
                              + stats["itm/neg_txt_acc"]) / 3
    if extra_pos_logits is not None:
        stats["itm/shortcut"] = stats["itm/masked_acc"] - stats["itm/pos_acc"]
    return stats


def mlm_loss(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float
) -> Tensor:
    """(1 - alpha) * CE + alpha * KD, both token-level means over the masked tokens (§2.3).

    logits, teacher_logits: (M, V) at the M masked positions only (the unmasked ones carry no
    loss, so their vocabulary projection is never computed); labels: (M,).
    """
    log_p = F.log_softmax(wide(logits), dim=-1)
    ce = F.nll_loss(log_p, labels)
    if teacher_logits is None or alpha == 0.0:
        return ce
    kd = -(F.softmax(wide(teacher_logits), dim=-1) * log_p).sum(dim=-1).mean()
    return (1.0 - alpha) * ce + alpha * kd
