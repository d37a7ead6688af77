"""Record tensors from the unmodified official ALBEF code, for
tests/fidelity/test_official_pretraining.py.

Run by hand, never by CI, in an environment that can import the official code (its public
repository, github.com/salesforce/ALBEF, and the older libraries it was written for); see
tests/fixtures/official_albef/README.md for the exact commands and versions. The script imports the
official modules from ``--albef`` and changes nothing in them: it only replaces, at run time,
what the official constructors hard-code for paper-sized models (the ViT sizes, BERT weights
from the hub) so that the models are built at fixture size, and it reads what the official
forwards compute (their local variables when they return, and the random draws they make).

What is recorded (``tests/fixtures/official_albef/*.pt``, plain tensors; torch.load with
``weights_only=True``):

* ``pretrain.pt``: the pre-training model's weights (student perturbed so that the momentum
  twin differs), one batch, the draws (hard negatives, MLM corruption), image/text features
  (online and momentum), ITC similarities and distilled targets, ITM logits and labels, MLM
  logits at the masked positions (student and teacher), the three losses, every gradient of
  the step, the momentum weights and queues after it; the same step in float64 (losses and
  gradients) so the tests can set gradient tolerances from the official float32 error.
* ``gradcam.pt``: Grad-CAM at two fusion layers, computed as ALBEF's visualisation notebook
  computes it (ITM positive logit summed, attention maps and their gradients saved by the
  official cross-attention, gradients clamped at 0, times the maps, text padding masked, mean
  over heads), for the whole batch.
* ``retrieval.pt``: the official ``Retrieval.evaluation`` (ITC top-k, ITM re-ranking) and
  ``itm_eval`` on a small split: both score matrices and the recall metrics.

The tasks' recordings (SNLI-VE, NLVR2, VQA) are made by ``record_tasks.py``.
Usage::

    PYTHONPATH=<old libs> python devtools/official_albef/record.py --albef ALBEF_DIR \\
        --out tests/fixtures/official_albef
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Fixture sizes: tiny widths (a few hundred kB of tensors) but ALBEF's 6 + 6 BERT split, which
# the official fine-tuning scripts hard-code (VQA's decoder from layers 6-11, NLVR2's doubled
# layers from 6 on); two heads, four image patches, padded captions.
SIZES = {
    "image_size": 16, "patch_size": 8, "vision_width": 16, "vision_depth": 2, "vision_heads": 2,
    "hidden": 16, "text_layers": 6, "fusion_layers": 6, "heads": 2, "intermediate": 32,
    "max_positions": 32, "embed_dim": 8, "queue_size": 8, "momentum": 0.9,
    # Above ALBEF's clamp range (0.001, 0.5): the step's clamp is part of what is recorded.
    "temp": 0.6,
    "mlm_probability": 0.5, "init_std": 0.1, "batch": 4, "length": 7, "alpha": 0.4,
}
WORDS = ("a", "red", "blue", "green", "yellow", "circle", "square", "triangle", "small",
         "large", "left", "right", "of", "the", "above", "below", "and", "next", "to")
VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS)
# Fusion layers (0-based in the fusion stack): 2 is BERT layer 8, the notebook's and SoftMask's.
GRADCAM_LAYERS = (2, 4)
SEED = 0


# ------------------------------------------------------------------------------ official code


def import_official(albef_dir: Path) -> types.SimpleNamespace:
    """The official modules, with the run-time replacements for fixture-sized models."""
    sys.path.insert(0, str(albef_dir))
    import transformers.file_utils as file_utils
    import transformers.utils as hf_utils

    # A docstring decorator whose signature changed in later transformers releases.
    file_utils.add_code_sample_docstrings = hf_utils.add_code_sample_docstrings = (
        lambda *a, **k: (lambda f: f))
    for name in ("ruamel_yaml", "dataset", "scheduler", "optim"):  # script-level imports only
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["dataset"].create_dataset = sys.modules["dataset"].create_sampler = None
    sys.modules["dataset"].create_loader = None
    sys.modules["scheduler"].create_scheduler = sys.modules["optim"].create_optimizer = None
    from models import model_pretrain, model_retrieval, vit, xbert
    from models.tokenization_bert import BertTokenizer

    def fixture_vit(**kw: Any) -> nn.Module:
        kw.update(patch_size=SIZES["patch_size"], embed_dim=SIZES["vision_width"],
                  depth=SIZES["vision_depth"], num_heads=SIZES["vision_heads"])
        return vit.VisionTransformer(**kw)

    for module in (model_pretrain, model_retrieval):
        module.VisionTransformer = fixture_vit
    for cls in (xbert.BertForMaskedLM, xbert.BertModel):
        cls.from_pretrained = classmethod(lambda c, name, config, **kw: c(config, **kw))
    import Retrieval

    return types.SimpleNamespace(model_pretrain=model_pretrain, model_retrieval=model_retrieval,
                                 vit=vit, xbert=xbert, BertTokenizer=BertTokenizer,
                                 Retrieval=Retrieval)


def bert_config(out_dir: Path) -> Path:
    """The official BERT config at fixture size (dropout off: forwards are deterministic)."""
    cfg = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.0,
           "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": SIZES["hidden"],
           "initializer_range": SIZES["init_std"], "intermediate_size": SIZES["intermediate"],
           "layer_norm_eps": 1e-12, "max_position_embeddings": SIZES["max_positions"],
           "model_type": "bert", "num_attention_heads": SIZES["heads"],
           "num_hidden_layers": SIZES["text_layers"] + SIZES["fusion_layers"],
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB),
           "fusion_layer": SIZES["text_layers"], "encoder_width": SIZES["vision_width"]}
    path = out_dir / "bert_config.json"
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return path


def model_config(bert_path: Path) -> dict[str, Any]:
    return {"mlm_probability": SIZES["mlm_probability"], "embed_dim": SIZES["embed_dim"],
            "image_res": SIZES["image_size"], "vision_width": SIZES["vision_width"],
            "bert_config": str(bert_path), "temp": SIZES["temp"],
            "queue_size": SIZES["queue_size"], "momentum": SIZES["momentum"], "distill": True,
            "alpha": SIZES["alpha"], "k_test": 3}


# ------------------------------------------------------------------------------ capture


def capture_locals(fn: Callable[[], Any], frame_name: str) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` and return its result and the local variables of the last frame named
    ``frame_name`` (e.g. the official ``forward``) at the moment it returned."""
    captured: dict[str, Any] = {}

    def profiler(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code.co_name == frame_name and "self" in frame.f_locals:
            captured.clear()
            captured.update(frame.f_locals)

    sys.setprofile(profiler)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, captured


class MultinomialLog:
    """Records ``torch.multinomial`` draws (the official hard-negative sampler) or replays
    recorded ones (the float64 run must draw the float32 run's negatives)."""

    def __init__(self, replay: list[int] | None = None) -> None:
        self.draws: list[int] = []
        self.replay = list(replay) if replay is not None else None
        self._real = torch.multinomial

    def __enter__(self) -> MultinomialLog:
        def multinomial(weights: torch.Tensor, n: int, *a: Any, **k: Any) -> torch.Tensor:
            out = self._real(weights, n, *a, **k)  # drawn either way: later draws stay in step
            if self.replay is not None:
                out = torch.tensor([self.replay.pop(0)])
            self.draws.append(int(out.item()))
            return out
        torch.multinomial = multinomial
        return self

    def __exit__(self, *exc: object) -> None:
        torch.multinomial = self._real


# ------------------------------------------------------------------------------ pre-training


def build_pretrain(off: types.SimpleNamespace, tokenizer: Any, cfg: dict[str, Any]) -> nn.Module:
    """The official pre-training model at fixture size; the student is perturbed after the
    momentum copy so that EMA and online/momentum mix-ups are visible."""
    torch.manual_seed(SEED)
    model = off.model_pretrain.ALBEF(text_encoder="none", tokenizer=tokenizer, config=cfg,
                                     init_deit=False)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, param in _student_params(model):
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return model.train()


def _student_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def fixture_batch() -> dict[str, torch.Tensor]:
    """Four captions of 7, 5, 4 and 6 tokens ([CLS] first, no [SEP], as ALBEF tokenizes)."""
    g = torch.Generator().manual_seed(SEED + 2)
    b, length = SIZES["batch"], SIZES["length"]
    lengths = torch.tensor([7, 5, 4, 6])
    ids = torch.randint(5, len(VOCAB), (b, length), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ids[:, 0] = VOCAB.index("[CLS]")
    image = torch.randn(b, 3, SIZES["image_size"], SIZES["image_size"], generator=g)
    return {"image": image, "input_ids": ids, "attention_mask": mask}


class _Text:
    """What the official forward reads from a tokenizer output."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = input_ids, attention_mask


def pretrain_step(model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype,
                  replay: list[int] | None = None,
                  replay_mlm: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """One official forward + backward; what it computed, drew and left behind. ``replay`` /
    ``replay_mlm``: the float32 run's hard negatives and MLM corruption, for the float64 run
    (its draws would differ: the probabilities are float64 there)."""
    model = model.to(dtype)
    text = _Text(batch["input_ids"], batch["attention_mask"])
    image = batch["image"].to(dtype)
    torch.manual_seed(SEED + 3)  # the MLM corruption draws from the global generator
    mlm_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_mask = model.mask

    def mask(*a: Any, **k: Any) -> Any:
        out = real_mask(*a, **k) if replay_mlm is None else (replay_mlm[0].clone(),
                                                             replay_mlm[1].clone())
        mlm_calls.append((out[0].clone(), out[1].clone()))
        return out

    model.mask = mask
    with MultinomialLog(replay) as draws:
        (loss_mlm, loss_ita, loss_itm), loc = capture_locals(
            lambda: model(image, text, alpha=SIZES["alpha"]), "forward")
    del model.mask
    (loss_mlm + loss_ita + loss_itm).backward()
    b = SIZES["batch"]
    labels = mlm_calls[0][1]
    where = labels != -100
    return {
        "losses": {"itc": loss_ita.detach(), "itm": loss_itm.detach(), "mlm": loss_mlm.detach()},
        "draws": {"neg_image_for_text": torch.tensor(draws.draws[:b]),
                  "neg_text_for_image": torch.tensor(draws.draws[b:2 * b]),
                  "mlm_input_ids": mlm_calls[0][0], "mlm_labels": labels},
        "tensors": {
            "image_feat": loc["image_feat"], "text_feat": loc["text_feat"],
            "image_feat_m": loc["image_feat_m"], "text_feat_m": loc["text_feat_m"],
            "sim_i2t": loc["sim_i2t"], "sim_t2i": loc["sim_t2i"],
            "sim_i2t_targets": loc["sim_i2t_targets"], "sim_t2i_targets": loc["sim_t2i_targets"],
            "itm_logits": loc["vl_output"], "itm_labels": loc["itm_labels"],
            "mlm_logits": loc["mlm_output"].logits[where],
            "mlm_teacher_logits": loc["logits_m"][where],
        },
        "grads": {n: p.grad.detach().clone() for n, p in _student_params(model)},
        "after": {k: v.detach().clone() for k, v in model.state_dict().items()
                  if k.split(".")[0].endswith("_m") or k in ("image_queue", "text_queue",
                                                             "queue_ptr")},
    }


def record_pos_embed(off: types.SimpleNamespace, state: dict[str, torch.Tensor]
                     ) -> dict[str, Any]:
    """The official ``interpolate_pos_embed`` (as every fine-tuning script applies it to both
    ViTs) of the 16 px weights for a model at twice the resolution."""
    size = 2 * SIZES["image_size"]
    target = off.vit.VisionTransformer(img_size=size, patch_size=SIZES["patch_size"],
                                       embed_dim=SIZES["vision_width"],
                                       depth=SIZES["vision_depth"],
                                       num_heads=SIZES["vision_heads"])
    return {"image_size": size,
            "visual_encoder.pos_embed": off.vit.interpolate_pos_embed(
                state["visual_encoder.pos_embed"], target),
            "visual_encoder_m.pos_embed": off.vit.interpolate_pos_embed(
                state["visual_encoder_m.pos_embed"], target)}


def detach_all(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone().cpu()
    if isinstance(tree, dict):
        return {k: detach_all(v) for k, v in tree.items()}
    return tree


def record_pretrain(off: types.SimpleNamespace, tokenizer: Any, cfg: dict[str, Any]
                    ) -> dict[str, Any]:
    model = build_pretrain(off, tokenizer, cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = fixture_batch()
    fp32 = pretrain_step(model, batch, torch.float32)
    replay = fp32["draws"]["neg_image_for_text"].tolist() + \
        fp32["draws"]["neg_text_for_image"].tolist()
    model64 = build_pretrain(off, tokenizer, cfg)
    # float64 throughout: the official forward allocates some tensors with the default dtype
    # (e.g. the ITC hard targets), which would otherwise stay float32 in the float64 run.
    torch.set_default_dtype(torch.float64)
    try:
        fp64 = pretrain_step(model64, batch, torch.float64, replay,
                             (fp32["draws"]["mlm_input_ids"], fp32["draws"]["mlm_labels"]))
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(fp64["draws"]["mlm_input_ids"], fp32["draws"]["mlm_input_ids"])
    return detach_all({"sizes": SIZES, "vocab": list(VOCAB), "state": state, "batch": batch,
                       "pos_embed": record_pos_embed(off, state),
                       "alpha": SIZES["alpha"], "draws": fp32["draws"],
                       "fp32": {k: fp32[k] for k in ("losses", "tensors", "grads", "after")},
                       # float64 gradients stored as their (small) difference to the float32
                       # ones: float32 holds the difference to ~1e-7 of itself, half the bytes.
                       "fp64": {"losses": fp64["losses"], "grads_minus_fp32": {
                           k: (g - fp32["grads"][k].double()).float()
                           for k, g in fp64["grads"].items()}}})


# ------------------------------------------------------------------------------ Grad-CAM


def record_gradcam(off: types.SimpleNamespace, tokenizer: Any, cfg: dict[str, Any]
                   ) -> dict[str, Any]:
    """Grad-CAM as the visualisation notebook computes it, at two fusion layers, with the
    official attention-saving machinery of xbert's cross-attention."""
    model = build_pretrain(off, tokenizer, cfg).eval()
    batch = fixture_batch()
    bert = model.text_encoder.bert
    maps, logits = {}, None
    for layer in GRADCAM_LAYERS:
        block = bert.encoder.layer[SIZES["text_layers"] + layer].crossattention.self
        block.save_attention = True
        model.zero_grad()
        image_embeds = model.visual_encoder(batch["image"])
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = bert(batch["input_ids"], attention_mask=batch["attention_mask"],
                   encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                   return_dict=True)
        logits = model.itm_head(out.last_hidden_state[:, 0, :])
        logits[:, 1].sum().backward()
        with torch.no_grad():
            mask = batch["attention_mask"].view(SIZES["batch"], 1, -1, 1)
            cams = block.get_attention_map()[:, :, :, 1:] * mask
            grads = block.get_attn_gradients()[:, :, :, 1:].clamp(0) * mask
            maps[layer] = (cams * grads).mean(1)  # (B, L, patches): mean over heads
        block.save_attention = False
    # The model is pretrain.pt's (same seeds, same perturbation): its weights are not repeated.
    return detach_all({"batch": batch, "itm_logits": logits, "maps": maps,
                       "layers": list(GRADCAM_LAYERS)})


# ------------------------------------------------------------------------------ retrieval


class _Split(torch.utils.data.Dataset):
    """What Retrieval.evaluation reads from a dataset: .text, .image, and (image, index)."""

    def __init__(self, images: torch.Tensor, texts: list[str]) -> None:
        self.images, self.text, self.image = images, texts, list(range(len(images)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


def retrieval_split() -> tuple[torch.Tensor, list[str], dict[int, list[int]], dict[int, int]]:
    """Five images, two captions each (caption j belongs to image j // 2)."""
    g = torch.Generator().manual_seed(SEED + 4)
    images = torch.randn(5, 3, SIZES["image_size"], SIZES["image_size"], generator=g)
    words = WORDS[1:]
    texts = []
    for j in range(10):
        idx = torch.randint(0, len(words), (2 + j % 4,), generator=g).tolist()
        texts.append(" ".join(words[i] for i in idx))
    img2txt = {i: [2 * i, 2 * i + 1] for i in range(5)}
    txt2img = {j: j // 2 for j in range(10)}
    return images, texts, img2txt, txt2img


def record_retrieval(off: types.SimpleNamespace, tokenizer: Any, cfg: dict[str, Any]
                     ) -> dict[str, Any]:
    """The official retrieval evaluation on the pre-training model's weights (loaded into the
    retrieval model as Retrieval.py does: the ``bert.`` infix removed)."""
    pretrain = build_pretrain(off, tokenizer, cfg)
    state = {k.replace(".bert", ""): v for k, v in pretrain.state_dict().items()}
    torch.manual_seed(SEED)
    model = off.model_retrieval.ALBEF(config=cfg, text_encoder="none", tokenizer=tokenizer)
    msg = model.load_state_dict(state, strict=False)
    images, texts, img2txt, txt2img = retrieval_split()
    loader = torch.utils.data.DataLoader(_Split(images, texts), batch_size=2, shuffle=False)
    off.Retrieval.args = argparse.Namespace(distributed=False)
    i2t, t2i = off.Retrieval.evaluation(model, loader, tokenizer, torch.device("cpu"), cfg)
    metrics = off.Retrieval.itm_eval(i2t, t2i, txt2img, img2txt)
    # The weights are pretrain.pt's, loaded as Retrieval.py loads a pre-training checkpoint.
    return detach_all({"images": images, "texts": texts,
                       "img2txt": img2txt, "txt2img": txt2img, "k_test": cfg["k_test"],
                       "scores_i2t": torch.from_numpy(i2t), "scores_t2i": torch.from_numpy(t2i),
                       "metrics": {k: float(v) for k, v in metrics.items()},
                       "load_missing": list(msg.missing_keys)})


# ------------------------------------------------------------------------------ main


def versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": str(torch.__version__), "transformers": transformers.__version__,
            "timm": timm.__version__, "python": sys.version.split()[0]}


def official_commit(albef_dir: Path) -> str:
    head = albef_dir / ".git"
    try:
        import subprocess

        return subprocess.run(["git", "-C", str(albef_dir), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or \
            os.environ.get("ALBEF_COMMIT", "unknown")
    except OSError:
        return os.environ.get("ALBEF_COMMIT", "unknown") if not head.exists() else "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--albef", type=Path, required=True, help="checkout of salesforce/ALBEF")
    p.add_argument("--out", type=Path, required=True, help="fixture folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)  # concat_all_gather
    args.out.mkdir(parents=True, exist_ok=True)
    off = import_official(args.albef.resolve())
    (args.out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = off.BertTokenizer(str(args.out / "vocab.txt"), do_lower_case=True)
    cfg = model_config(bert_config(args.out))
    provenance = {"official_commit": official_commit(args.albef), "versions": versions(),
                  "sizes": SIZES, "seed": SEED}
    for name, fn in (("pretrain", record_pretrain), ("gradcam", record_gradcam),
                     ("retrieval", record_retrieval)):
        payload = {**fn(off, tokenizer, cfg), "provenance": provenance}
        torch.save(payload, args.out / f"{name}.pt")
        print(f"wrote {args.out / name}.pt ({(args.out / f'{name}.pt').stat().st_size} bytes)")
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
