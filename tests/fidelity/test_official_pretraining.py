"""The project against tensors recorded from the unmodified official ALBEF code.

The fixtures (tests/fixtures/official_albef/, how they were made: its README.md) hold the
official models' weights at fixture size, one batch, and what the official code computed on it.
Each test loads the official weights through the project's own loaders and key maps (the path a
user's checkpoint takes), replays the official code's random draws where it makes them, runs the
project's code and compares every recorded tensor:

* forwards and losses: relative error <= 1e-5 (max |ours - official| / max |official|);
* gradients: against the official float64 run, within a small multiple of the official float32
  run's own error (both codes sum in a different order; neither is "the" float32 answer).

Draw order: the official pre-training forward draws each hard negative with its own
``torch.multinomial`` call from the global generator (texts' negative images first, then the
images' negative texts) and corrupts MLM tokens with ``torch.bernoulli`` / ``torch.randint``
after the ITM negatives; the project draws both negative sets in two vectorised calls and the
MLM corruption before anything else, from the objective's own generator. The recorded draws are
therefore injected (``sample_hard_negatives`` and ``mask_tokens`` return them) instead of
matching seeds. Dropout is off in the fixtures (its masks cannot be replayed across codes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model.objective as objective_module
from model.build import build_objective
from model.checkpoints import load_albef_checkpoint
from model.checkpoints.keymap import ours_key_to_albef
from model.config.experiment import load_experiment
from model.data.tokenizer import TextTokenizer
from model.evaluation.features import extract_features, itc_scores
from model.evaluation.rerank import rerank_itm, rerank_itm_dedup
from model.evaluation.retrieval import retrieval_metrics
from model.method.gradcam import gradcam_maps
from model.text_masking import SpecialIds

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official_albef"
FORWARD_RTOL = 1e-5
# Ours may be this many times further from the float64 answer than the official float32 run is
# (different summation orders), plus a floor for gradients that are exactly representable.
GRAD_FACTOR = 8.0


def load(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    return (ours - theirs).abs().max().item() / max(scale, 1e-12) if theirs.numel() else 0.0


def assert_same(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                rtol: float = FORWARD_RTOL) -> None:
    err = rel_err(ours, theirs)
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g} against the official code"


def our_config(sizes: dict[str, Any], vocab_size: int, *extra: str):
    s = sizes
    return load_experiment(sets=[
        f"model.vision.image_size={s['image_size']}", f"model.vision.patch_size={s['patch_size']}",
        f"model.vision.width={s['vision_width']}", f"model.vision.depth={s['vision_depth']}",
        f"model.vision.heads={s['vision_heads']}", "model.vision.init=null",
        f"model.text.vocab_size={vocab_size}", f"model.text.hidden={s['hidden']}",
        f"model.text.text_layers={s['text_layers']}",
        f"model.text.fusion_layers={s['fusion_layers']}", f"model.text.heads={s['heads']}",
        f"model.text.intermediate={s['intermediate']}",
        f"model.text.max_positions={s['max_positions']}", "model.text.hidden_dropout=0.0",
        "model.text.attn_dropout=0.0", "model.text.init=null",
        f"model.text.init_std={s['init_std']}", f"model.embed_dim={s['embed_dim']}",
        f"model.queue_size={s['queue_size']}", f"model.momentum={s['momentum']}",
        f"model.temp={s['temp']}", f"loss.mlm_prob={s['mlm_probability']}",
        f"train.batch_size={s['batch']}", "softmask.layer=2", *extra])


def special(vocab: list[str]) -> SpecialIds:
    return SpecialIds(pad=vocab.index("[PAD]"), cls=vocab.index("[CLS]"),
                      mask=vocab.index("[MASK]"), vocab_size=len(vocab))


def official_objective(fixture: dict[str, Any], dtype: torch.dtype = torch.float32):
    """Our objective with the official weights, loaded as a user's checkpoint is."""
    cfg = our_config(fixture["sizes"], len(fixture["vocab"]))
    objective = build_objective(cfg, special(fixture["vocab"]), seed=0)
    report = load_albef_checkpoint(objective, fixture["state"])
    assert not report.problems, report
    return objective.to(dtype).train()


def float64_grads(fp32: dict[str, torch.Tensor], diff: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """The official float64 gradients (stored as float32 + their difference to float64)."""
    return {k: fp32[k].double() + diff[k].double() for k in fp32}


@pytest.fixture(scope="module")
def pretrain() -> dict[str, Any]:
    fixture = load("pretrain")
    fixture["fp64"]["grads"] = float64_grads(fixture["fp32"]["grads"],
                                             fixture["fp64"].pop("grads_minus_fp32"))
    return fixture


class Spy:
    """Wraps module-level functions of model.objective to record their arguments / results."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, list[Any]] = {}
        self._mp = monkeypatch

    def wrap(self, name: str, keep: Callable[..., Any]) -> None:
        real = getattr(objective_module, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            out = real(*a, **k)
            self.calls.setdefault(name, []).append(keep(out, *a, **k))
            return out
        self._mp.setattr(objective_module, name, wrapper)


def _step(pretrain: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
          dtype: torch.dtype = torch.float32) -> tuple[Any, Spy, dict[str, Any]]:
    """Our step on the fixture batch with the official draws injected."""
    objective = official_objective(pretrain, dtype)
    draws = pretrain["draws"]
    monkeypatch.setattr(objective_module, "mask_tokens", lambda ids, *a, **k: (
        draws["mlm_input_ids"].clone(), draws["mlm_labels"].clone()))
    monkeypatch.setattr(objective_module, "sample_hard_negatives", lambda *a, **k: (
        draws["neg_image_for_text"].clone(), draws["neg_text_for_image"].clone()))
    spy = Spy(monkeypatch)
    spy.wrap("itc_loss", lambda out, sim_i2t, sim_t2i, q_i2t, q_t2i, *a, **k: (
        sim_i2t, sim_t2i, q_i2t, q_t2i))
    spy.wrap("itm_loss", lambda out, pos, neg, *a, **k: torch.cat([pos, neg]))
    spy.wrap("mlm_loss", lambda out, logits, labels, teacher, alpha: (logits, teacher))
    features: dict[str, Any] = {}
    for twin in ("student", "teacher"):
        model = getattr(objective, twin)
        for method in ("encode_image", "encode_text"):
            real = getattr(model, method)

            def recorder(*a: Any, _real=real, _key=f"{twin}.{method}", **k: Any) -> Any:
                out = _real(*a, **k)
                features.setdefault(_key, out.feat)
                return out
            monkeypatch.setattr(model, method, recorder)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v)
             for k, v in pretrain["batch"].items()}
    out = objective(batch, pretrain["alpha"])
    out.loss.backward()
    return objective, spy, {"out": out, "features": features}


# ------------------------------------------------------------------------------ pre-training


def test_pretraining_forward_matches_the_official_code(pretrain, monkeypatch) -> None:
    _, spy, step = _step(pretrain, monkeypatch)
    rec, feats = pretrain["fp32"]["tensors"], step["features"]
    for ours, name in (("student.encode_image", "image_feat"), ("student.encode_text", "text_feat"),
                       ("teacher.encode_image", "image_feat_m"),
                       ("teacher.encode_text", "text_feat_m")):
        assert_same(name, feats[ours], rec[name])
    sim_i2t, sim_t2i, q_i2t, q_t2i = spy.calls["itc_loss"][0]
    assert_same("sim_i2t", sim_i2t, rec["sim_i2t"])
    assert_same("sim_t2i", sim_t2i, rec["sim_t2i"])
    assert_same("sim_i2t_targets", q_i2t, rec["sim_i2t_targets"])
    assert_same("sim_t2i_targets", q_t2i, rec["sim_t2i_targets"])
    assert_same("itm_logits", spy.calls["itm_loss"][0], rec["itm_logits"])
    logits, teacher = spy.calls["mlm_loss"][0]
    assert_same("mlm_logits", logits, rec["mlm_logits"])
    assert_same("mlm_teacher_logits", teacher, rec["mlm_teacher_logits"])
    for term, value in pretrain["fp32"]["losses"].items():
        assert_same(f"loss_{term}", step["out"].losses[term], value)


def _grads_by_official_name(objective) -> dict[str, torch.Tensor]:
    text_layers = len(objective.student.text_encoder.layer)
    return {ours_key_to_albef(f"student.{n}", text_layers, "pretrain"): p.grad
            for n, p in objective.student.named_parameters() if p.grad is not None}


def test_every_gradient_matches_the_official_code_within_its_float32_error(
        pretrain, monkeypatch) -> None:
    objective, _, _ = _step(pretrain, monkeypatch)
    ours = _grads_by_official_name(objective)
    g32, g64 = pretrain["fp32"]["grads"], pretrain["fp64"]["grads"]
    assert set(ours) == set(g32), (sorted(set(g32) - set(ours)), sorted(set(ours) - set(g32)))
    worst = []
    # Float32 rounding of the model's largest gradient: the floor for gradients that are zero in
    # exact arithmetic (attention key biases) and for exactly representable ones.
    floor = 1e-7 * max(g.abs().max().item() for g in g64.values())
    for name, reference in g64.items():
        official_err = (g32[name].double() - reference).abs().max().item()
        err = (ours[name].double() - reference).abs().max().item()
        assert err <= GRAD_FACTOR * official_err + floor, (
            f"grad of {name}: |ours - float64| = {err:.3g}, the official float32 run's "
            f"{official_err:.3g}")
        worst.append(err / max(official_err, floor))
    assert max(worst) <= GRAD_FACTOR


def test_float64_step_matches_the_official_float64_step(pretrain, monkeypatch) -> None:
    """In float64 both codes agree to ~1e-12: the remaining float32 gaps are rounding only."""
    objective, _, step = _step(pretrain, monkeypatch, torch.float64)
    for term, value in pretrain["fp64"]["losses"].items():
        assert_same(f"float64 loss_{term}", step["out"].losses[term], value, rtol=1e-10)
    ours = _grads_by_official_name(objective)
    # Gradients that are zero in exact arithmetic (attention key biases: a shift of every
    # logit of a query row) are pure rounding: judged against the model's largest gradient.
    scale = max(g.abs().max().item() for g in pretrain["fp64"]["grads"].values())
    for name, reference in pretrain["fp64"]["grads"].items():
        err = (ours[name] - reference).abs().max().item()
        assert err <= 1e-9 * max(reference.abs().max().item(), 1e-3 * scale), (
            f"float64 grad of {name}: |ours - official| = {err:.3g}")


def test_momentum_weights_and_queues_after_the_step_match(pretrain, monkeypatch) -> None:
    objective, _, _ = _step(pretrain, monkeypatch)
    text_layers = len(objective.student.text_encoder.layer)
    after = pretrain["fp32"]["after"]
    ours = {ours_key_to_albef(f"teacher.{k}", text_layers, "pretrain"): v
            for k, v in objective.teacher.state_dict().items()}
    ours.update({k: v for k, v in objective.queue.state_dict().items()
                 if k in ("image_queue", "text_queue", "queue_ptr")})
    compared = 0
    for name, value in after.items():
        if name not in ours:
            continue  # official-only buffers (position_ids, the tied decoder) are not weights
        if value.is_floating_point():
            assert_same(f"after the step: {name}", ours[name], value)
        else:
            assert torch.equal(ours[name].view(-1), value.view(-1)), name
        compared += 1
    assert compared >= len(list(objective.teacher.state_dict())) - 1
    assert int(after["queue_ptr"]) == pretrain["sizes"]["batch"]  # the pointer advanced once


def test_position_embeddings_are_interpolated_as_the_fine_tuning_scripts_do(pretrain) -> None:
    """A 16 px checkpoint loaded into a model at twice the resolution (ALBEF fine-tunes at
    384 px from 256 px pre-training): both ViTs' position embeddings, through our loader."""
    rec = pretrain["pos_embed"]
    cfg = our_config(pretrain["sizes"], len(pretrain["vocab"]),
                     f"model.vision.image_size={rec['image_size']}")
    objective = build_objective(cfg, special(pretrain["vocab"]), seed=0)
    load_albef_checkpoint(objective, pretrain["state"])
    assert_same("student pos_embed", objective.student.visual_encoder.pos_embed,
                rec["visual_encoder.pos_embed"])
    assert_same("teacher pos_embed", objective.teacher.visual_encoder.pos_embed,
                rec["visual_encoder_m.pos_embed"])


# ------------------------------------------------------------------------------ Grad-CAM


def test_gradcam_matches_the_official_notebook_at_two_fusion_layers(pretrain) -> None:
    rec = load("gradcam")
    objective = official_objective(pretrain).eval()
    student = objective.student
    batch = rec["batch"]
    for layer in rec["layers"]:
        img = student.encode_image(batch["image"])
        txt = student.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = student.fuse(txt.states, batch["attention_mask"], img.tokens, attn_layer=layer)
        logits = student.itm_logits(fused.hidden)
        assert_same("gradcam itm_logits", logits, rec["itm_logits"])
        maps = gradcam_maps(logits, fused.cross_attn, batch["attention_mask"])
        assert_same(f"Grad-CAM at fusion layer {layer}", maps, rec["maps"][layer])


# ------------------------------------------------------------------------------ retrieval


def test_retrieval_scores_ranks_and_recalls_match_the_official_evaluation(pretrain) -> None:
    rec = load("retrieval")
    objective = official_objective(pretrain)
    student = objective.student
    tokenizer = TextTokenizer.from_vocab_file(FIXTURES / "vocab.txt")
    loader = [(rec["images"][i:i + 2], None) for i in range(0, len(rec["images"]), 2)]
    feats = extract_features(student, loader, rec["texts"], tokenizer, "cpu")
    sim = itc_scores(feats)
    for rerank in (rerank_itm, rerank_itm_dedup):
        i2t, t2i = rerank(student, feats, sim, rec["k_test"])[:2]
        assert_same(f"{rerank.__name__} scores_i2t", i2t, rec["scores_i2t"])
        assert_same(f"{rerank.__name__} scores_t2i", t2i, rec["scores_t2i"])
        img2txt = {int(k): list(v) for k, v in rec["img2txt"].items()}
        txt2img = {int(k): int(v) for k, v in rec["txt2img"].items()}
        metrics = retrieval_metrics(np.asarray(i2t), np.asarray(t2i), img2txt, txt2img)
        official = rec["metrics"]
        for ours_key, theirs in (("TR@1", "txt_r1"), ("TR@5", "txt_r5"), ("TR@10", "txt_r10"),
                                 ("IR@1", "img_r1"), ("IR@5", "img_r5"), ("IR@10", "img_r10"),
                                 ("r_mean", "r_mean")):
            assert metrics[ours_key] == pytest.approx(official[theirs]), ours_key
