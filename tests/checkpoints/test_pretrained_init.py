"""BERT and DeiT/timm-ViT initial weights, from tiny checkpoints written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertForPreTraining

from model.build import build_objective
from model.checkpoints import CheckpointMismatchError, CheckpointReadError
from model.config.experiment import load_experiment
from model.objective import Objective
from model.pretrained import (
    REASON_CROSSATTN,
    REASON_DIST_TOKEN,
    REASON_NSP,
    REASON_POOLER,
    REASON_VIT_HEAD,
    load_bert_weights,
    load_vit_weights,
)
from model.text_masking import SpecialIds
from model.vit import interpolate_pos_embed

SPECIAL = SpecialIds(pad=0, cls=1, mask=2, vocab_size=100)
TEXT_LAYERS, FUSION_LAYERS = 2, 3  # tiny preset
HF_NON_ALBEF = {"bert.pooler.dense.weight": REASON_POOLER, "bert.pooler.dense.bias": REASON_POOLER,
                "cls.seq_relationship.weight": REASON_NSP, "cls.seq_relationship.bias": REASON_NSP}


def make_objective(seed: int, sets: tuple[str, ...] = ()) -> Objective:
    torch.manual_seed(seed)
    return build_objective(load_experiment(preset="tiny", sets=list(sets)), SPECIAL, seed=seed)


def assert_teacher_equals_student(objective: Objective, prefix: str) -> None:
    student = objective.student.state_dict()
    for key, value in objective.teacher.state_dict().items():
        if key.startswith(prefix):
            assert torch.equal(value, student[key]), key


# ------------------------------------------------------------------ BERT
def write_bert(path: Path, layers: int = TEXT_LAYERS + FUSION_LAYERS) -> dict[str, torch.Tensor]:
    """A tiny BERT in HF format, laid out like bert-base-uncased (MLM + NSP heads, pooler)."""
    torch.manual_seed(123)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=40)
    model = BertForPreTraining(config)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bert_weights_land_in_text_fusion_and_mlm(tmp_path: Path) -> None:
    hf = write_bert(tmp_path)
    objective = make_objective(0)
    vit_before = objective.student.visual_encoder.pos_embed.clone()
    report = load_bert_weights(objective, tmp_path)
    assert report.ok and not report.missing and not report.unexpected
    assert report.allowed_unexpected == HF_NON_ALBEF
    cross = {k for k in objective.student.state_dict()
             if k.startswith("fusion_encoder.") and ".crossattention." in k}
    assert len(cross) == FUSION_LAYERS * 10
    assert report.allowed_missing == dict.fromkeys(cross, REASON_CROSSATTN)
    assert set(report.ignored) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    s = objective.student
    assert torch.equal(s.text_encoder.embeddings.word_embeddings.weight,
                       hf["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s.text_encoder.layer[1].output.dense.weight,
                       hf["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(s.fusion_encoder.layer[0].attention.self.query.weight,
                       hf["bert.encoder.layer.2.attention.self.query.weight"])
    assert torch.equal(s.fusion_encoder.layer[2].output.LayerNorm.bias,
                       hf["bert.encoder.layer.4.output.LayerNorm.bias"])
    assert torch.equal(s.mlm_head.bias, hf["cls.predictions.bias"])
    assert torch.equal(s.mlm_head.transform.dense.weight,
                       hf["cls.predictions.transform.dense.weight"])
    assert torch.equal(s.visual_encoder.pos_embed, vit_before)  # the ViT is not touched
    for prefix in ("text_encoder.", "fusion_encoder.", "mlm_head."):
        assert_teacher_equals_student(objective, prefix)


def test_bert_into_retrieval_model_allows_the_mlm_head(tmp_path: Path) -> None:
    write_bert(tmp_path)
    objective = make_objective(0, ("train.mode=retrieval",))
    report = load_bert_weights(objective.student, tmp_path)
    assert report.ok
    assert {"mlm_head.bias", "mlm_head.transform.dense.weight"} <= set(report.allowed_unexpected)


def test_bert_missing_key_raises_and_names_it(tmp_path: Path) -> None:
    write_bert(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["bert.encoder.layer.3.output.dense.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    objective = make_objective(0)
    with pytest.raises(CheckpointMismatchError) as info:
        load_bert_weights(objective, tmp_path)
    assert ("fusion_encoder.layer.1.output.dense.weight  "
            "[in file: bert.encoder.layer.3.output.dense.weight]") in str(info.value)


def test_bert_with_too_few_layers_raises(tmp_path: Path) -> None:
    write_bert(tmp_path, layers=4)
    with pytest.raises(CheckpointMismatchError, match=r"fusion_encoder\.layer\.2\.attention"):
        load_bert_weights(make_objective(0), tmp_path)


def test_bert_hub_name_is_not_downloaded_by_default() -> None:
    with pytest.raises(FileNotFoundError, match="local_files_only=False"):
        load_bert_weights(make_objective(0), "no-such-org/no-such-bert")


# ------------------------------------------------------------------ ViT
def make_timm_vit(image_size: int, num_classes: int = 10) -> VisionTransformer:
    """A timm ViT of the tiny preset's geometry (width 64, depth 4, 2 heads, patch 8)."""
    torch.manual_seed(321)
    return VisionTransformer(img_size=image_size, patch_size=8, embed_dim=64, depth=4,
                             num_heads=2, qkv_bias=True, num_classes=num_classes)


def test_vit_weights_land_and_pos_embed_is_interpolated(tmp_path: Path) -> None:
    """A 24-px (3x3) checkpoint into the 32-px (4x4) model, like DeiT 224 -> 256 px."""
    source = make_timm_vit(24).state_dict()
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": source}, path)  # DeiT's release layout
    objective = make_objective(0)
    report = load_vit_weights(objective, path)
    assert report.ok and not report.missing and not report.unexpected
    assert report.allowed_unexpected == {"visual_encoder.head.weight": REASON_VIT_HEAD,
                                         "visual_encoder.head.bias": REASON_VIT_HEAD}
    assert report.interpolated == [("visual_encoder.pos_embed", (1, 10, 64), (1, 17, 64))]
    vit = objective.student.visual_encoder
    assert torch.equal(vit.pos_embed, interpolate_pos_embed(source["pos_embed"], 16))
    for key in ("blocks.3.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "norm.bias"):
        assert torch.equal(vit.state_dict()[key], source[key]), key
    assert_teacher_equals_student(objective, "visual_encoder.")


def test_vit_from_safetensors(tmp_path: Path) -> None:
    source = make_timm_vit(32, num_classes=0).state_dict()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, path)
    objective = make_objective(0)
    report = load_vit_weights(objective.student, path)
    assert report.ok and not report.interpolated and not report.allowed_unexpected
    assert torch.equal(objective.student.visual_encoder.blocks[0].mlp.fc1.weight,
                       source["blocks.0.mlp.fc1.weight"])


def test_vit_missing_block_key_raises(tmp_path: Path) -> None:
    source = make_timm_vit(32).state_dict()
    del source["blocks.2.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(source, path)
    objective = make_objective(0)
    before = objective.student.visual_encoder.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_vit_weights(objective, path)
    assert "visual_encoder.blocks.2.mlp.fc1.weight" in str(info.value)
    assert torch.equal(objective.student.visual_encoder.blocks[0].attn.qkv.weight, before)


def test_vit_distilled_deit_drops_the_distillation_token(tmp_path: Path) -> None:
    source = make_timm_vit(32).state_dict()
    pos = source["pos_embed"]  # [cls, patches]; DeiT-distilled is [cls, dist, patches]
    dist_pos = torch.randn(1, 1, 64)
    distilled = {**source, "dist_token": torch.randn(1, 1, 64),
                 "pos_embed": torch.cat([pos[:, :1], dist_pos, pos[:, 1:]], dim=1),
                 "head_dist.weight": torch.randn(10, 64), "head_dist.bias": torch.randn(10)}
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": distilled}, path)
    objective = make_objective(0)
    report = load_vit_weights(objective, path)
    assert report.ok
    assert report.ignored == {"visual_encoder.dist_token": REASON_DIST_TOKEN}
    assert set(report.allowed_unexpected) == {f"visual_encoder.{h}.{p}" for h in
                                              ("head", "head_dist") for p in ("weight", "bias")}
    assert torch.equal(objective.student.visual_encoder.pos_embed, pos)


def _npz_from_timm(vit: VisionTransformer) -> dict[str, np.ndarray]:
    """The Google ViT .npz layout (HWIO conv, per-head q/k/v kernels) of a timm ViT."""
    s = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d, h = vit.embed_dim, vit.blocks[0].attn.num_heads
    out = {"embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": s["patch_embed.proj.bias"], "cls": s["cls_token"],
           "Transformer/posembed_input/pos_embedding": s["pos_embed"],
           "Transformer/encoder_norm/scale": s["norm.weight"],
           "Transformer/encoder_norm/bias": s["norm.bias"]}
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = s[b + "attn.qkv.weight"].reshape(3, d, d), s[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[f"{mha}{name}/kernel"] = qkv_w[j].T.reshape(d, h, d // h)
            out[f"{mha}{name}/bias"] = qkv_b.reshape(3, h, d // h)[j]
        out[mha + "out/kernel"] = s[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[mha + "out/bias"] = s[b + "attn.proj.bias"]
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = s[b + ours + ".weight"], s[
                b + ours + ".bias"]
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = s[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = s[f"{b}mlp.fc{r + 1}.bias"]
    return out


def test_vit_from_jax_npz(tmp_path: Path) -> None:
    vit = make_timm_vit(24, num_classes=0)
    path = tmp_path / "vit.npz"
    np.savez(path, **_npz_from_timm(vit))
    objective = make_objective(0)
    report = load_vit_weights(objective, path)
    assert report.ok and [k for k, _, _ in report.interpolated] == ["visual_encoder.pos_embed"]
    source = vit.state_dict()
    ours = objective.student.visual_encoder.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "blocks.3.attn.proj.weight", "blocks.0.mlp.fc2.bias",
                "patch_embed.proj.weight", "cls_token", "norm.weight"):
        assert torch.allclose(ours[key], source[key]), key
    assert torch.allclose(ours["pos_embed"], interpolate_pos_embed(source["pos_embed"], 16))


def test_vit_npz_with_wrong_depth_is_refused(tmp_path: Path) -> None:
    arrays = _npz_from_timm(make_timm_vit(32, num_classes=0))
    arrays = {k: v for k, v in arrays.items() if "encoderblock_3/" not in k}
    path = tmp_path / "shallow.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointReadError, match="has 3 transformer blocks, the model has 4"):
        load_vit_weights(make_objective(0), path)


def test_vit_hub_name_and_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local_files_only=False"):
        load_vit_weights(make_objective(0), "deit_base_patch16_224")
    path = tmp_path / "weights.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointReadError, match=r"weights\.txt.*unsupported"):
        load_vit_weights(make_objective(0), path)
