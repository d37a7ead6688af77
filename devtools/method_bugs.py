"""Plausible one-line bugs in SoftMask++'s method and objective, for ``python -m
devtools.mutations --catalog method`` (against the fast test suite) and for the sensitivity
grid (``python -m devtools.sensitivity``: the ones listed in ``TRAINABLE_SOFTMASK`` still train
and change the SoftMask cell).
"""

from __future__ import annotations

from devtools.mutations import Mutation

TARGETS = ["-m", "not slow and not slurm", "tests"]

MUTATIONS = [
    Mutation("inverted-soft-mask", "model/method/softmask.py",
             "    return 1.0 - minmax_normalise(chosen)", "    return minmax_normalise(chosen)",
             "SoftMask dims the least relevant patches (minmax(G) instead of 1 - minmax(G))"),
    Mutation("gradcam-wrong-layer", "model/objective.py",
             "attn_layer=sm.layer if want_attn else None)",
             "attn_layer=sm.layer + 1 if want_attn else None)",
             "Grad-CAM from the next fusion layer, not softmask.layer"),
    Mutation("gradcam-no-relu", "model/method/gradcam.py",
             "cam = cross_attn[..., 1:] * grad[..., 1:].clamp_min(0.0)",
             "cam = cross_attn[..., 1:] * grad[..., 1:]", "Grad-CAM without the ReLU"),
    Mutation("gradcam-no-normalisation", "model/method/softmask.py",
             "    return 1.0 - minmax_normalise(chosen)", "    return 1.0 - chosen",
             "soft mask from the raw Grad-CAM map (no min-max normalisation)"),
    Mutation("mask-on-image-cls", "model/method/softmask.py",
             "return torch.cat([image_tokens[:, :1], image_tokens[:, 1:] * mask.unsqueeze(-1)], "
             "dim=1)",
             "return torch.cat([image_tokens[:, :1] * mask.mean(1, keepdim=True).unsqueeze(-1), "
             "image_tokens[:, 1:] * mask.unsqueeze(-1)], dim=1)",
             "the mask also scales the image [CLS] token"),
    Mutation("mask-carries-gradient", "model/method/softmask.py",
             "    mask = mask.detach().to(image_tokens.dtype)",
             "    mask = mask.to(image_tokens.dtype)",
             "the soft mask is not detached (gradient flows through it into the attention)",
             also=(("model/method/gradcam.py", "    return cam.mean(dim=1).detach()",
                    "    return cam.mean(dim=1)"),)),
    Mutation("masked-pairs-negative", "model/losses.py",
             "        labels.append(torch.ones(extra_pos_logits.shape[0], **kw))",
             "        labels.append(torch.zeros(extra_pos_logits.shape[0], **kw))",
             "soft-masked pairs labelled as ITM negatives"),
    Mutation("word-among-special-tokens", "model/method/softmask.py",
             "    real = attention_mask.bool() & ~torch.isin(input_ids, special_ids)",
             "    real = torch.ones_like(attention_mask, dtype=torch.bool)",
             "the masking word is drawn among special and padding tokens too"),
    Mutation("focal-gamma-sign", "model/losses.py",
             "modulation = (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma)",
             "modulation = (1.0 - log_p.exp()).clamp_min(1e-6).pow(-gamma)",
             "focal factor with the wrong sign of gamma (up-weights easy pairs)"),
    Mutation("focal-wrong-probability", "model/losses.py",
             "modulation = (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma)",
             "modulation = (1.0 - targets).clamp_min(0.0).pow(gamma)",
             "focal factor on the target probability q instead of the model's p"),
    Mutation("mmda-separate-passes", "model/objective.py",
             "        if self.cfg.masked_text:\n            hidden = shared_hidden",
             "        if False:\n            hidden = shared_hidden",
             "MMDA's ITM and MLM in separate fusion passes (the saving is lost)"),
    Mutation("randmask-keeps-p", "model/method/softmask.py",
             "    return (draws >= p).float()", "    return (draws < p).float()",
             "RandMask keeps each patch with probability p instead of 1 - p"),
    Mutation("softmask-mlm-always", "model/objective.py",
             "        if masked_hidden is not None and self.cfg.softmask.apply_to == \"itm_mlm\":",
             "        if masked_hidden is not None:",
             "soft-masked features reach MLM although softmask.apply_to is itm"),
    Mutation("negatives-from-masked-batch", "model/objective.py",
             "            torch.cat([img.tokens[neg_img], img.tokens]),",
             "            torch.cat([apply_patch_mask(img.tokens, self._patch_mask(\n"
             "                pos_logits, pos.cross_attn, inp, img.tokens.shape[1] - 1))[neg_img]\n"
             "                if sm.mode == 'gradcam' else img.tokens[neg_img],\n"
             "                img.tokens]),",
             "hard-negative images taken from the soft-masked batch"),
    Mutation("masked-pairs-not-added", "model/objective.py",
             "loss = itm_loss(pos_logits, neg_logits, extra, self.cfg",
             "loss = itm_loss(pos_logits, neg_logits, None, self.cfg",
             "the soft-masked pairs never reach the ITM loss"),
]

# SoftMask-cell mutants for the sensitivity grid: each still trains and changes the cell.
TRAINABLE_SOFTMASK = ("inverted-soft-mask", "gradcam-wrong-layer", "gradcam-no-relu",
                      "gradcam-no-normalisation", "mask-on-image-cls", "masked-pairs-negative",
                      "word-among-special-tokens", "masked-pairs-not-added")
