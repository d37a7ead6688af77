"""Official ALBEF key mapping, loud checkpoint loading and slim release export (tiny models)."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from model.build import build_objective
from model.checkpoints import (
    REASON_NO_IDX_QUEUE,
    REASON_NO_MLM_HEAD,
    CheckpointMismatchError,
    CheckpointReadError,
    albef_key_to_ours,
    albef_to_ours,
    detect_format,
    load_albef_checkpoint,
    ours_key_to_albef,
    ours_to_albef,
    read_checkpoint,
)
from model.cli.export import main
from model.config.experiment import load_experiment
from model.objective import Objective
from model.release import export_release, load_release
from model.text_masking import SpecialIds
from model.vit import interpolate_pos_embed

SPECIAL = SpecialIds(pad=0, cls=1, mask=2, vocab_size=100)
RETRIEVAL_SETS = ("train.mode=retrieval",)


def make_objective(seed: int, sets: tuple[str, ...] = ()) -> Objective:
    """A tiny Objective with all weights drawn from ``seed`` (the queue too)."""
    torch.manual_seed(seed)
    return build_objective(load_experiment(preset="tiny", sets=list(sets)), SPECIAL, seed=seed)


def text_layers_of(objective: Objective) -> int:
    return len(objective.student.text_encoder.layer)


def official_state(objective: Objective, fmt: str) -> dict[str, torch.Tensor]:
    """A state dict in the official ALBEF naming built from one of our models."""
    return ours_to_albef(objective.state_dict(), text_layers_of(objective), fmt)


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def pretrain_source() -> Objective:
    return make_objective(1)


@pytest.fixture(scope="module")
def retrieval_source() -> Objective:
    obj = make_objective(2, RETRIEVAL_SETS)
    with torch.no_grad():  # as after some fine-tuning: real ids and a moved pointer
        obj.queue.idx_queue.copy_(torch.arange(obj.queue.size).view(1, -1) % 7)
        obj.queue.queue_ptr.fill_(64)
    return obj


# ------------------------------------------------------------------ key mapping
def test_pretrain_format_has_the_official_structure(pretrain_source: Objective) -> None:
    """Counts per top-level prefix follow docs/ALBEF.md §8 (at tiny size)."""
    state = official_state(pretrain_source, "pretrain")
    vit = pretrain_source.student.visual_encoder
    k, f = 2, 3  # tiny preset: text_layers, fusion_layers
    vit_keys = 4 + 12 * len(vit.blocks) + 2
    text_keys = 5 + 1 + 16 * k + 26 * f + 7  # embeddings, position_ids, layers, cls.*
    counts = Counter(key.split(".")[0] for key in state)
    assert counts["visual_encoder"] == counts["visual_encoder_m"] == vit_keys
    assert counts["text_encoder"] == counts["text_encoder_m"] == text_keys
    for name in ("vision_proj", "vision_proj_m", "text_proj", "text_proj_m", "itm_head"):
        assert counts[name] == 2
    for name in ("temp", "image_queue", "text_queue", "queue_ptr"):
        assert counts[name] == 1
    assert "idx_queue" not in state and "itm_head_m.weight" not in state
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight" in state
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight" not in state
    assert state["text_encoder.bert.embeddings.position_ids"].dtype == torch.long
    words = state["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    assert state["text_encoder_m.cls.predictions.decoder.weight"] is words
    assert state["text_encoder.cls.predictions.decoder.bias"] is state[
        "text_encoder.cls.predictions.bias"]


def test_retrieval_format_has_no_bert_infix_and_no_mlm(retrieval_source: Objective) -> None:
    state = official_state(retrieval_source, "auto")
    assert "text_encoder.embeddings.word_embeddings.weight" in state
    assert "text_encoder_m.encoder.layer.4.crossattention.self.value.weight" in state
    assert "idx_queue" in state
    assert not any("bert." in k or ".cls." in k for k in state)
    assert detect_format(state) == "retrieval"


@pytest.mark.parametrize(("albef", "ours", "fmt"), [
    ("visual_encoder_m.blocks.3.attn.qkv.weight", "teacher.visual_encoder.blocks.3.attn.qkv.weight",
     "pretrain"),
    ("text_encoder.bert.encoder.layer.1.output.dense.weight",
     "student.text_encoder.layer.1.output.dense.weight", "pretrain"),
    ("text_encoder_m.bert.encoder.layer.4.crossattention.output.LayerNorm.bias",
     "teacher.fusion_encoder.layer.2.crossattention.output.LayerNorm.bias", "pretrain"),
    ("text_encoder.cls.predictions.transform.dense.weight",
     "student.mlm_head.transform.dense.weight", "pretrain"),
    ("text_encoder.encoder.layer.2.attention.self.query.bias",
     "student.fusion_encoder.layer.0.attention.self.query.bias", "retrieval"),
    ("temp", "student.temp", "retrieval"),
    ("idx_queue", "queue.idx_queue", "retrieval"),
    ("text_proj_m.bias", "teacher.text_proj.bias", "pretrain"),
])
def test_single_key_mapping_both_ways(albef: str, ours: str, fmt: str) -> None:
    assert albef_key_to_ours(albef, 2, fmt) == ours
    assert ours_key_to_albef(ours, 2, fmt) == albef


def test_foreign_keys_are_not_mapped() -> None:
    assert albef_key_to_ours("itm_head_m.weight", 2, "pretrain") is None
    assert albef_key_to_ours("text_encoder.encoder.layer.0.x", 2, "pretrain") is None  # no bert.
    assert albef_key_to_ours("text_encoder.bert.pooler.dense.weight", 2, "pretrain") is None
    with pytest.raises(ValueError, match="no counterpart"):
        ours_key_to_albef("student.something.weight", 2, "pretrain")


def test_round_trip_retrieval_format_is_exact(retrieval_source: Objective) -> None:
    ours = retrieval_source.state_dict()
    back = albef_to_ours(official_state(retrieval_source, "retrieval"), 2)
    assert_states_equal(ours, back)


def test_round_trip_pretrain_format_is_exact_except_idx_queue(pretrain_source: Objective) -> None:
    """ALBEF's pre-training format has no idx_queue (and official Pretrain.py loads strictly);
    everything else round-trips exactly, and loading restores idx_queue's -100 (next test)."""
    ours = pretrain_source.state_dict()
    back = albef_to_ours(official_state(pretrain_source, "auto"), 2)
    ours.pop("queue.idx_queue")
    assert_states_equal(ours, back)


def test_pretrain_export_refuses_to_drop_real_image_ids(pretrain_source: Objective) -> None:
    state = dict(pretrain_source.state_dict())
    state["queue.idx_queue"] = torch.zeros_like(state["queue.idx_queue"])
    with pytest.raises(ValueError, match="idx_queue holds image ids"):
        ours_to_albef(state, 2, "pretrain")


def test_detect_format_rejects_mixed_and_foreign_states(pretrain_source: Objective) -> None:
    official = official_state(pretrain_source, "pretrain")
    with pytest.raises(ValueError, match="mixes"):
        detect_format({**official, "student.temp": torch.tensor(0.07)})
    with pytest.raises(ValueError, match="mixes"):
        detect_format({**official, "text_encoder.embeddings.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="not an ALBEF state dict"):
        detect_format({"blocks.0.attn.qkv.weight": torch.zeros(1)})


# ------------------------------------------------------------------ loading official files
def test_official_pretrain_file_loads_with_zero_missing_or_unexpected(
        pretrain_source: Objective, tmp_path: Path) -> None:
    path = tmp_path / "albef_pretrain.pth"
    torch.save({"model": official_state(pretrain_source, "pretrain"), "epoch": 29,
                "config": {"fusion_layer": 2}, "optimizer": {"state": {}, "param_groups": []}},
               path)
    target = make_objective(7)
    report = load_albef_checkpoint(target, path)
    assert report.ok and not report.missing and not report.unexpected
    assert not report.shape_mismatched and not report.interpolated
    assert report.allowed_missing == {"queue.idx_queue": REASON_NO_IDX_QUEUE}
    assert report.allowed_unexpected == {}
    assert sorted(report.ignored) == sorted(
        f"text_encoder{t}.{n}" for t in ("", "_m") for n in (
            "bert.embeddings.position_ids", "cls.predictions.decoder.weight",
            "cls.predictions.decoder.bias"))
    assert_states_equal(target.state_dict(), pretrain_source.state_dict())


def test_official_retrieval_file_loads_exactly(retrieval_source: Objective) -> None:
    target = make_objective(8, RETRIEVAL_SETS)
    report = load_albef_checkpoint(target, official_state(retrieval_source, "retrieval"))
    assert report.ok and not report.allowed_missing and not report.allowed_unexpected
    assert_states_equal(target.state_dict(), retrieval_source.state_dict())


def test_pretrain_file_into_retrieval_model(pretrain_source: Objective) -> None:
    """ALBEF's fine-tuning start: MLM head dropped, pos_embed 16 -> 36 patches for both ViTs,
    queues inherited, idx_queue stays -100 (docs/ALBEF.md C20, C21)."""
    target = make_objective(9, (*RETRIEVAL_SETS, "model.vision.image_size=48"))
    report = load_albef_checkpoint(target, {"model": official_state(pretrain_source, "pretrain")})
    assert report.ok
    mlm = {k for k in pretrain_source.state_dict() if ".mlm_head." in k}
    assert report.allowed_unexpected == dict.fromkeys(mlm, REASON_NO_MLM_HEAD)
    assert [k for k, _, _ in report.interpolated] == [
        "student.visual_encoder.pos_embed", "teacher.visual_encoder.pos_embed"]
    src = pretrain_source.state_dict()
    for root in ("student", "teacher"):
        expected = interpolate_pos_embed(src[f"{root}.visual_encoder.pos_embed"], 36)
        assert torch.equal(getattr(target, root).visual_encoder.pos_embed, expected)
    for name in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(getattr(target.queue, name), src[f"queue.{name}"])
    assert bool((target.queue.idx_queue == -100).all())
    assert torch.equal(target.student.fusion_encoder.layer[2].crossattention.self.key.weight,
                       pretrain_source.student.fusion_encoder.layer[2]
                       .crossattention.self.key.weight)


def test_official_file_into_bare_albef_for_evaluation(pretrain_source: Objective) -> None:
    student = make_objective(10).student
    report = load_albef_checkpoint(student, official_state(pretrain_source, "pretrain"))
    assert report.ok
    assert all(k.startswith(("teacher.", "queue.")) for k in report.allowed_unexpected)
    assert_states_equal(student.state_dict(), pretrain_source.student.state_dict())


def test_planted_missing_vit_key_fails_and_names_it(pretrain_source: Objective) -> None:
    state = official_state(pretrain_source, "pretrain")
    del state["visual_encoder.blocks.1.attn.qkv.weight"]
    target = make_objective(11)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_albef_checkpoint(target, state)
    message = str(info.value)
    assert "MISSING from the checkpoint (1)" in message
    assert "student.visual_encoder.blocks.1.attn.qkv.weight" in message
    assert "[in file: visual_encoder.blocks.1.attn.qkv.weight]" in message
    assert info.value.report is not None
    assert info.value.report.missing == ["student.visual_encoder.blocks.1.attn.qkv.weight"]
    assert_states_equal(target.state_dict(), before)  # nothing was loaded


def test_planted_shape_mismatch_fails_and_names_both_shapes(pretrain_source: Objective) -> None:
    state = official_state(pretrain_source, "pretrain")
    state["vision_proj.weight"] = torch.zeros(33, 64)
    with pytest.raises(CheckpointMismatchError) as info:
        load_albef_checkpoint(make_objective(12), state)
    assert "student.vision_proj.weight  [in file: vision_proj.weight]: checkpoint (33, 64) " \
           "vs model (32, 64)" in str(info.value)


def test_unknown_key_is_unexpected(pretrain_source: Objective) -> None:
    state = {**official_state(pretrain_source, "pretrain"), "text_decoder.bert.x": torch.ones(1)}
    with pytest.raises(CheckpointMismatchError, match=r"UNEXPECTED.*\n    text_decoder.bert.x"):
        load_albef_checkpoint(make_objective(13), state)


def test_broken_tie_fails(pretrain_source: Objective) -> None:
    state = dict(official_state(pretrain_source, "pretrain"))
    state["text_encoder_m.cls.predictions.decoder.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointMismatchError, match="differs from its tied partner"):
        load_albef_checkpoint(make_objective(14), state)


def test_allow_patterns_and_non_strict_loading(pretrain_source: Objective,
                                               caplog: pytest.LogCaptureFixture) -> None:
    state = official_state(pretrain_source, "pretrain")
    del state["visual_encoder.norm.bias"]
    target = make_objective(15)
    report = load_albef_checkpoint(target, state, allow_missing=["student.visual_encoder.norm.*"])
    assert report.ok and "student.visual_encoder.norm.bias" in report.allowed_missing
    target = make_objective(16)
    with caplog.at_level(logging.INFO, logger="model.checkpoints"):
        report = load_albef_checkpoint(target, state, strict=False)
    assert not report.ok and report.missing == ["student.visual_encoder.norm.bias"]
    assert any(r.levelno == logging.WARNING and "visual_encoder.norm.bias" in r.getMessage()
               for r in caplog.records)
    assert any(r.levelno == logging.INFO and "load report" in r.getMessage()
               for r in caplog.records)
    assert torch.equal(target.student.visual_encoder.norm.weight,
                       pretrain_source.student.visual_encoder.norm.weight)


def test_retrieval_file_into_pretraining_model_reports_the_mlm_head(
        retrieval_source: Objective) -> None:
    with pytest.raises(CheckpointMismatchError, match="student.mlm_head.bias"):
        load_albef_checkpoint(make_objective(17), official_state(retrieval_source, "retrieval"))


def test_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "weird.pth"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(CheckpointReadError, match=r"weird\.pth.*not tensors"):
        load_albef_checkpoint(make_objective(18), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_albef_checkpoint(make_objective(18), tmp_path / "missing.pth")


# ------------------------------------------------------------------ slim releases
def _train_a_little(objective: Objective) -> torch.optim.Optimizer:
    """One optimizer step with synthetic gradients, so the optimizer has its moment buffers."""
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    for p in objective.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Objective]:
    """A file shaped like the engine's training checkpoint (numpy/python RNG states included)."""
    objective = make_objective(3)
    opt = _train_a_little(objective)
    cfg = load_experiment(preset="tiny")
    path = tmp_path_factory.mktemp("ckpt") / "full.pt"
    torch.save({"objective": objective.state_dict(), "optimizer": opt.state_dict(),
                "config": dataclasses.asdict(cfg), "step": 10, "epoch": 0,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}}, path)
    return path, objective


def _outputs(student: torch.nn.Module) -> list[torch.Tensor]:
    student.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        img = student.encode_image(images)
        txt = student.encode_text(ids, mask)
        fused = student.fuse(txt.states, mask, img.tokens).hidden
        return [img.feat, txt.feat, student.itm_logits(fused), student.mlm_logits(fused)]


@pytest.mark.parametrize("fmt", ["ours", "albef"])
def test_export_release_shrinks_and_reloads_identically(
        full_checkpoint: tuple[Path, Objective], tmp_path: Path, fmt: str) -> None:
    path, source = full_checkpoint
    out = tmp_path / f"release_{fmt}.pt"
    sizes = export_release(path, out, fmt)
    assert sizes["after_bytes"] < sizes["before_bytes"] / 3  # no teacher, queues, optimizer
    assert sizes["before_bytes"] == path.stat().st_size and sizes["after_mb"] > 0
    payload = read_checkpoint(out)
    assert payload["format"] == fmt and payload["step"] == 10
    keys = set(payload["model"])
    if fmt == "ours":
        assert all(k.startswith("student.") for k in keys)
    else:
        assert "visual_encoder.pos_embed" in keys and "text_encoder.cls.predictions.bias" in keys
        assert not any("_m." in k or "queue" in k for k in keys)
    target = make_objective(4)
    report = load_release(target, out)
    assert report.ok and not report.unexpected
    assert set(report.allowed_missing) == {k for k in target.state_dict()
                                           if k.startswith(("teacher.", "queue."))}
    for a, b in zip(_outputs(target.student), _outputs(source.student), strict=True):
        assert torch.equal(a, b)
    assert_states_equal(target.teacher.state_dict(),
                        {k: v for k, v in target.student.state_dict().items()
                         if k in target.teacher.state_dict()})
    bare = make_objective(5).student
    assert load_release(bare, out).ok
    for a, b in zip(_outputs(bare), _outputs(source.student), strict=True):
        assert torch.equal(a, b)


def test_export_cli_prints_sizes(full_checkpoint: tuple[Path, Objective], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = full_checkpoint
    out = tmp_path / "sub" / "release.pt"
    assert main([str(path), str(out), "--format", "albef"]) == 0
    printed = capsys.readouterr().out
    assert "bytes" in printed and "MB" in printed and str(out) in printed
    assert main([str(out), str(tmp_path / "again.pt")]) == 2  # a release is not a full file
    assert "'objective'" in capsys.readouterr().err
