"""Plausible one-line bugs in the ALBEF reimplementation, for ``python -m devtools.mutations
--catalog fidelity``: does the check against the official code's recorded tensors catch them?
"""

from __future__ import annotations

from devtools.mutations import Mutation

TARGETS = ["tests/fidelity/test_official_pretraining.py"]

MUTATIONS = [
    Mutation("bert-layernorm-eps", "model/bert.py", "layer_norm_eps=1e-12,",
             "layer_norm_eps=1e-6,", "BERT LayerNorm eps 1e-6 (the ViT's) instead of 1e-12"),
    Mutation("vit-layernorm-eps", "model/vit.py", "norm_layer=partial(nn.LayerNorm, eps=1e-6),",
             "norm_layer=partial(nn.LayerNorm, eps=1e-5),",
             "ViT LayerNorm eps 1e-5 (torch's default) instead of 1e-6"),
    Mutation("tanh-gelu", "model/bert.py", 'hidden_act="gelu",', 'hidden_act="gelu_new",',
             "tanh-approximated GELU in BERT"),
    Mutation("mask-fill", "model/bert.py", "MASK_FILL = -10000.0", "MASK_FILL = 0.0",
             "attention mask fill 0: padded tokens are attended"),
    Mutation("temp-clamp", "model/objective.py", "self.student.temp.clamp_(0.001, 0.5)",
             "self.student.temp.clamp_(0.001, 1.0)", "temperature clamped to 1.0, not 0.5"),
    Mutation("queue-pointer", "model/momentum.py",
             "self.queue_ptr.copy_((self.queue_ptr + n) % self.size)",
             "self.queue_ptr.copy_((self.queue_ptr + 1) % self.size)",
             "queue pointer advanced by 1, not by the batch"),
    Mutation("distillation-alpha", "model/losses.py",
             "return alpha * F.softmax(teacher_logits, dim=1) + (1.0 - alpha) * hard_targets",
             "return (1.0 - alpha) * F.softmax(teacher_logits, dim=1) + alpha * hard_targets",
             "distillation weights swapped (alpha on the hard targets)"),
    Mutation("itm-label-order", "model/losses.py",
             "labels = [torch.ones(pos_logits.shape[0], **kw), "
             "torch.zeros(neg_logits.shape[0], **kw)]",
             "labels = [torch.zeros(pos_logits.shape[0], **kw), "
             "torch.ones(neg_logits.shape[0], **kw)]",
             "ITM labels 0 for positives, 1 for negatives"),
    Mutation("gradcam-relu", "model/method/gradcam.py",
             "cam = cross_attn[..., 1:] * grad[..., 1:].clamp_min(0.0)",
             "cam = cross_attn[..., 1:] * grad[..., 1:]", "Grad-CAM without the ReLU"),
    Mutation("gradcam-head-sum", "model/method/gradcam.py",
             "return cam.mean(dim=1).detach()", "return cam.sum(dim=1).detach()",
             "Grad-CAM summed over heads instead of averaged"),
    Mutation("ema-swapped", "model/momentum.py",
             "torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)",
             "torch._foreach_add_(t_list, s_list, alpha=momentum)",
             "EMA adds momentum x student instead of (1 - momentum) x student"),
    Mutation("text-feature-unnormalised", "model/albef.py",
             "return TextOutput(states, F.normalize(self.text_proj(states[:, 0]), dim=-1))",
             "return TextOutput(states, self.text_proj(states[:, 0]))",
             "ITC text feature not L2-normalised"),
    Mutation("pos-embed-bilinear", "model/vit.py",
             'grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", '
             'align_corners=False)',
             'grid = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", '
             'align_corners=False)',
             "position embeddings interpolated bilinearly (ALBEF: bicubic)"),
    Mutation("mlm-teacher-not-distilled", "model/losses.py",
             "    return (1.0 - alpha) * ce + alpha * kd",
             "    return ce", "MLM without momentum distillation"),
    Mutation("itc-diagonal-target", "model/objective.py", "hard.fill_diagonal_(1.0)",
             "hard.fill_diagonal_(1.0); hard[:, 0] = 1.0",
             "ITC hard targets mark the first key positive for every row"),
]

TARGETS = [*TARGETS, "tests/fidelity/test_official_tasks.py"]

MUTATIONS += [
    Mutation("vqa-first-token-once", "model/downstream/objective.py",
             "    score = topk_prob.log() - nll", "    score = -nll",
             "VQA ranking without ALBEF's (double-counted) first-token log-probability"),
    Mutation("vqa-decoder-head-not-loaded", "model/downstream/heads.py",
             "        decoder.head.load_state_dict(mlm_head.state_dict())\n", "",
             "VQA decoder's LM head left at its random init (ALBEF copies the MLM head)"),
    Mutation("nlvr-image-order", "model/downstream/heads.py",
             "hidden, _ = layer(hidden, mask, images[j % 2])",
             "hidden, _ = layer(hidden, mask, images[(j + 1) % 2])",
             "NLVR2 pair layers read image 1 first"),
    Mutation("nlvr-untied-key-value", "model/downstream/heads.py", "        self.tie_pairs()\n",
             "\n", "NLVR2 pairs without shared cross-attention key/value"),
    Mutation("task-distillation-sign", "model/downstream/losses.py",
             "    return (1.0 - alpha) * hard + alpha * soft",
             "    return (1.0 - alpha) * hard - alpha * soft",
             "task distillation term added with the wrong sign"),
]
