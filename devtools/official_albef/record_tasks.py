"""Record the official ALBEF SNLI-VE, NLVR2 and VQA models, for
tests/fidelity/test_official_tasks.py.

Same environment and rules as ``record.py`` (run by hand; the official modules imported from
``--albef`` unchanged; only the paper-sized constructors are shrunk at run time). Each task
model is initialised from ``pretrain.pt``'s weights by the official fine-tuning script's own
checkpoint-loading block (the ``if args.checkpoint:`` statement of ``VE.py``, ``NLVR.py`` /
``Pretrain_nlvr.py`` and ``VQA.py``, executed as written), at twice the pre-training
resolution so that the position-embedding interpolation is part of it. Recorded per task:

* the loaded model, compactly: for every tensor the pre-training (or text-assignment) key it was
  copied from, and the tensors that are new (randomly initialised heads, interpolated position
  embeddings);
* an evaluation forward (SNLI-VE / NLVR2 logits; VQA's answer ranking with ``k_test``);
* a training forward with momentum distillation (loss, student and teacher predictions) and
  every gradient, in float32 and float64 (stored as the float32 gradients plus the float64 -
  float32 difference).

Usage::

    PYTHONPATH=<old libs> python devtools/official_albef/record_tasks.py --albef ALBEF_DIR \\
        --out tests/fixtures/official_albef
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record as R  # noqa: E402 - the pre-training recorder's helpers (same folder)

TASK_IMAGE = 2 * R.SIZES["image_size"]
ALPHA = 0.4


def script_block(script: Path) -> types.CodeType:
    """The ``if args.checkpoint:`` statement of a fine-tuning script's ``main``, compiled."""
    tree = ast.parse(script.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    block = next(n for n in ast.walk(main) if isinstance(n, ast.If)
                 and ast.unparse(n.test) == "args.checkpoint")
    return compile(ast.Module(body=[block], type_ignores=[]), str(script), "exec")


def load_by_script(off: types.SimpleNamespace, script: Path, model: nn.Module,
                   state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Run the script's checkpoint loading on ``model`` with ``state`` as the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pth"
        torch.save({"model": dict(state)}, path)
        namespace = {"torch": torch, "model": model, "config": config,
                     "interpolate_pos_embed": off.vit.interpolate_pos_embed,
                     "args": argparse.Namespace(checkpoint=str(path), evaluate=False)}
        with contextlib.redirect_stdout(io.StringIO()):  # its load report (printed) is noise
            exec(script_block(script), namespace)  # noqa: S102 - the official script


def compact(loaded: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]
            ) -> dict[str, Any]:
    """``loaded`` as {key: source key it equals} plus the tensors equal to no source."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for key, value in sources.items():
        by_shape.setdefault(tuple(value.shape), []).append(key)
    copied, new = {}, {}
    for key, value in loaded.items():
        match = next((s for s in by_shape.get(tuple(value.shape), [])
                      if sources[s].dtype == value.dtype and torch.equal(sources[s], value)),
                     None)
        if match is None:
            new[key] = value.detach().clone()
        else:
            copied[key] = match
    return {"copied_from": copied, "new": new}


def task_config(bert_path: Path) -> dict[str, Any]:
    return {**R.model_config(bert_path), "image_res": TASK_IMAGE, "distill": True}


def _patch_constructors(off: types.SimpleNamespace, modules: list[Any]) -> None:
    def fixture_vit(**kw: Any) -> nn.Module:
        kw.update(patch_size=R.SIZES["patch_size"], embed_dim=R.SIZES["vision_width"],
                  depth=R.SIZES["vision_depth"], num_heads=R.SIZES["vision_heads"])
        return off.vit.VisionTransformer(**kw)

    for module in modules:
        module.VisionTransformer = fixture_vit
    off.xbert.BertLMHeadModel.from_pretrained = classmethod(
        lambda c, name, config, **kw: c(config, **kw))


def task_batch(n_images: int, n_classes: int) -> dict[str, torch.Tensor]:
    """Images at the task resolution, the fixture captions, and labels."""
    base = R.fixture_batch()
    g = torch.Generator().manual_seed(R.SEED + 7)
    images = torch.randn(n_images, 3, TASK_IMAGE, TASK_IMAGE, generator=g)
    labels = torch.randint(0, n_classes, (R.SIZES["batch"],), generator=g)
    return {"images": images, "input_ids": base["input_ids"],
            "attention_mask": base["attention_mask"], "labels": labels}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def train_step(model: nn.Module, run: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``run(model, dtype)`` -> loss (locals of the official forward captured); backward."""
    model.to(dtype).train()
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    try:
        loss, loc = R.capture_locals(lambda: run(model, dtype), "forward")
        loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    return {"loss": loss.detach(), "locals": loc, "grads": _grads(model)}


def grads_pair(g32: dict[str, torch.Tensor], g64: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"fp32": g32, "fp64_minus_fp32": {k: (g64[k] - g32[k].double()).float() for k in g32}}


# ------------------------------------------------------------------------------ SNLI-VE


def record_classifier(off_model: Any, script: Path, seed: int, cfg: dict[str, Any], tok: Any,
                      off: types.SimpleNamespace, init: dict[str, torch.Tensor],
                      batch: dict[str, Any]) -> dict[str, Any]:
    """A classification task (VE, NLVR2) as its script builds and loads it: the loaded
    weights, evaluation logits, and a distilled training step in float32 and float64."""

    def build() -> nn.Module:
        torch.manual_seed(seed)
        model = off_model.ALBEF(config=cfg, text_encoder="none", tokenizer=tok)
        load_by_script(off, script, model, init, cfg)
        return model

    def run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        text = R._Text(batch["input_ids"], batch["attention_mask"])
        return model(batch["images"].to(dtype), text, batch["labels"], alpha=ALPHA, train=True)

    model = build()
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model.eval()(batch["images"], R._Text(batch["input_ids"],
                                                       batch["attention_mask"]),
                              batch["labels"], train=False)
    fp32 = train_step(model, run, torch.float32)
    fp64 = train_step(build(), run, torch.float64)
    return {"batch": batch, "loaded": compact(loaded, init), "eval_logits": logits,
            "loss": {"fp32": fp32["loss"], "fp64": fp64["loss"]},
            "prediction": fp32["locals"]["prediction"],
            "prediction_m": fp32["locals"]["prediction_m"],
            "grads": grads_pair(fp32["grads"], fp64["grads"])}


def record_ve(off: types.SimpleNamespace, tok: Any, albef_dir: Path, bert_path: Path,
              pretrain: dict[str, torch.Tensor]) -> dict[str, Any]:
    return record_classifier(off.model_ve, albef_dir / "VE.py", R.SEED + 11,
                             task_config(bert_path), tok, off, pretrain,
                             task_batch(R.SIZES["batch"], 3))


# ------------------------------------------------------------------------------ NLVR2


def ta_state(off: types.SimpleNamespace, tok: Any, albef_dir: Path, bert_path: Path,
             pretrain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-assignment model as Pretrain_nlvr.py initialises it from pre-training (before
    its TA epoch): fusion layers doubled, cross-attention key/value shared in each pair."""
    cfg = {**R.model_config(bert_path), "image_res": R.SIZES["image_size"]}
    torch.manual_seed(R.SEED + 12)
    model = off.model_pretrain_nlvr.ALBEF(config=cfg, text_encoder="none", tokenizer=tok)
    load_by_script(off, albef_dir / "Pretrain_nlvr.py", model, pretrain, cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def record_nlvr(off: types.SimpleNamespace, tok: Any, albef_dir: Path, bert_path: Path,
                pretrain: dict[str, torch.Tensor]) -> dict[str, Any]:
    ta = ta_state(off, tok, albef_dir, bert_path, pretrain)
    record = record_classifier(off.model_nlvr, albef_dir / "NLVR.py", R.SEED + 13,
                               task_config(bert_path), tok, off, ta,
                               task_batch(2 * R.SIZES["batch"], 2))
    return {**record, "ta": compact(ta, pretrain)}


# ------------------------------------------------------------------------------ VQA


def vqa_batch() -> dict[str, Any]:
    """Questions (the fixture captions), 2/1/3/1 answers per question with weights, and an
    answer list of six (each ``[CLS] words [SEP]``, as VQA.py tokenizes ``answer + '[SEP]'``)."""
    base = task_batch(R.SIZES["batch"], 2)
    cls_id, sep_id, pad_id = (R.VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    words = [R.VOCAB.index(w) for w in ("red", "blue", "circle", "left", "two", "yes")
             if w in R.VOCAB]
    answer_list = [[cls_id, words[i % len(words)], sep_id] if i < 3 else
                   [cls_id, words[i % len(words)], words[(i + 1) % len(words)], sep_id]
                   for i in range(6)]
    width = max(len(a) for a in answer_list)
    ids = torch.tensor([a + [pad_id] * (width - len(a)) for a in answer_list])
    mask = (ids != pad_id).long()
    counts = torch.tensor([2, 1, 3, 1])
    pick = torch.tensor([0, 3, 1, 2, 4, 5, 1])
    weights = torch.tensor([0.6, 0.4, 1.0, 0.5, 0.3, 0.2, 1.0])
    return {**base, "answer_list_ids": ids, "answer_list_mask": mask, "answer_counts": counts,
            "answer_ids": ids[pick], "answer_mask": mask[pick], "answer_weights": weights,
            "k_test": 4}


def record_vqa(off: types.SimpleNamespace, tok: Any, albef_dir: Path, bert_path: Path,
               pretrain: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg = task_config(bert_path)
    batch = vqa_batch()

    def build() -> nn.Module:
        torch.manual_seed(R.SEED + 14)
        model = off.model_vqa.ALBEF(config=cfg, text_encoder="none", text_decoder="none",
                                    tokenizer=tok)
        load_by_script(off, albef_dir / "VQA.py", model, pretrain, cfg)
        return model

    def run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        q = R._Text(batch["input_ids"], batch["attention_mask"])
        a = R._Text(batch["answer_ids"], batch["answer_mask"])
        return model(batch["images"].to(dtype), q, a, train=True, alpha=ALPHA,
                     k=batch["answer_counts"].tolist(), weights=batch["answer_weights"].to(dtype))

    model = build()
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        q = R._Text(batch["input_ids"], batch["attention_mask"])
        a = R._Text(batch["answer_list_ids"], batch["answer_list_mask"])
        topk_ids, topk_probs = model.eval()(batch["images"], q, a, train=False,
                                            k=batch["k_test"])
    fp32 = train_step(model, run, torch.float32)
    fp64 = train_step(build(), run, torch.float64)
    return {"batch": batch, "loaded": compact(loaded, pretrain), "topk_ids": topk_ids,
            "topk_probs": topk_probs, "loss": {"fp32": fp32["loss"], "fp64": fp64["loss"]},
            "answer_nll": fp32["locals"]["answer_output"].loss,
            "grads": grads_pair(fp32["grads"], fp64["grads"])}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--albef", type=Path, required=True, help="checkout of salesforce/ALBEF")
    p.add_argument("--out", type=Path, required=True, help="fixture folder (holds pretrain.pt)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    albef = args.albef.resolve()
    off = R.import_official(albef)
    from models import model_nlvr, model_pretrain_nlvr, model_ve, model_vqa

    off.model_ve, off.model_nlvr, off.model_vqa = model_ve, model_nlvr, model_vqa
    off.model_pretrain_nlvr = model_pretrain_nlvr
    _patch_constructors(off, [model_ve, model_nlvr, model_vqa, model_pretrain_nlvr])
    tok = off.BertTokenizer(str(args.out / "vocab.txt"), do_lower_case=True)
    bert_path = R.bert_config(args.out)
    pretrain = torch.load(args.out / "pretrain.pt", weights_only=True)
    provenance = {"official_commit": R.official_commit(albef), "versions": R.versions(),
                  "sizes": R.SIZES, "task_image_size": TASK_IMAGE, "alpha": ALPHA}
    for name, fn in (("ve", record_ve), ("nlvr", record_nlvr), ("vqa", record_vqa)):
        payload = R.detach_all({**fn(off, tok, albef, bert_path, pretrain["state"]),
                                "provenance": provenance})
        torch.save(payload, args.out / f"task_{name}.pt")
        print(f"wrote {args.out}/task_{name}.pt "
              f"({(args.out / f'task_{name}.pt').stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
