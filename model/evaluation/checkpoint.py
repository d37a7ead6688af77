"""Evaluating a trained run or any checkpoint: what a checkpoint file is (ours, full or slim, or
an official ALBEF file), its retrieval evaluation under a protocol and every way the two
disagree; and a trained run's full evaluation (zero-shot retrieval, compositional swaps,
Grad-CAM localisation, test-time occlusion) with the provenance of every number, shared by the
cell pipeline and the retrieval fine-tuning stages."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.albef import ALBEF
from model.build import build_albef, resolve_vocab_size
from model.checkpoints import (
    LoadReport,
    detect_format,
    extract_state,
    load_checkpoint_state,
    read_checkpoint,
)
from model.config.loader import (
    replace_path,
)
from model.config.protocols import (
    ProtocolRegistry,
    eval_image_size,
)
from model.config.schema import ExperimentConfig
from model.data.transforms import build_transform
from model.engine.data import DataSources, build_eval_dataset, build_tokenizer, resolve_sources
from model.engine.resume import checkpoint_path
from model.evaluation.compositional import compositional_accuracy, load_negative_items
from model.evaluation.localisation import load_box_items, localisation_scores
from model.evaluation.occlusion import occlusion_scores
from model.evaluation.retrieval import evaluate_retrieval

log = logging.getLogger(__name__)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def evaluate_trained(cfg: ExperimentConfig, student: ALBEF, device: torch.device,
                     sources: DataSources, run_dir: Path, steps: int
                     ) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot retrieval (ITC-only and ITM re-ranked) of the run's final checkpoint and,
    when the split has them, compositional swaps, localisation and occlusion; with provenance
    for every number. ``steps``: the optimizer steps the run trained."""
    tokenizer = build_tokenizer(sources)
    dataset = build_eval_dataset(cfg, sources)
    ckpt = checkpoint_path(run_dir)
    ckpt_hash = file_sha256(ckpt)
    report = evaluate_retrieval(student, dataset, tokenizer, device, cfg.eval.k_test,
                                cfg.eval.batch_size, split=f"{sources.eval_file.name}",
                                checkpoint_hash=ckpt_hash[:16],
                                cache_dir=run_dir if cfg.eval.cache_features else None,
                                rerank=cfg.eval.rerank)
    metrics = dict(report.metrics)
    test_view = build_transform("test", cfg.eval.image_size or cfg.model.vision.image_size)
    if sources.negatives_file is not None:
        items = load_negative_items(sources.negatives_file)
        metrics.update(compositional_accuracy(student, items, test_view, sources.image_root,
                                              tokenizer, device, cfg.eval.batch_size))
    if sources.boxes_file is not None:
        boxes = load_box_items(sources.boxes_file)
        metrics.update(localisation_scores(
            student, boxes, test_view, sources.image_root, tokenizer, device,
            cfg.softmask.layer, cfg.model.vision.patch_size, cfg.eval.batch_size))
        metrics.update(occlusion_scores(
            student, boxes, test_view, sources.image_root, tokenizer, device,
            cfg.eval.k_test, dataset.texts, dataset.img2txt,
            {path: i for i, path in enumerate(dataset.image_paths)}, cfg.eval.batch_size))
    provenance = {
        **report.provenance,
        "checkpoint": str(ckpt), "checkpoint_sha256": ckpt_hash,
        "stage": "pretrained" if cfg.train.mode == "pretrain" else "fine-tuned",
        "protocol": "zero-shot retrieval" if cfg.train.mode == "pretrain" else "fine-tuned",
        "eval_file": str(sources.eval_file), "dataset_images_listed": len(dataset),
        "train_steps": steps,
    }
    return metrics, provenance


# ---------------------------------------------------------------------------------------------
# Checkpoints: what they are, and evaluating them under a protocol


@dataclass
class CheckpointInfo:
    """What a checkpoint file is, as far as the file itself tells.

    ``format`` is ``detect_format`` of its state (ours / pretrain / retrieval); ``stage`` is
    ``pretrained`` or ``fine-tuned`` and ``finetuned_on`` the data set when the file records it
    (our configs: ``train.mode`` and ``data.train_files``; ALBEF's: ``train_file``).
    """

    path: Path
    sha256: str
    container: str
    format: str
    stage: str
    finetuned_on: str | None = None
    image_size: int | None = None
    train_files: list[str] = field(default_factory=list)
    evidence: str = ""
    config: dict[str, Any] | None = None  # our config, when the file holds one

    @property
    def stage_label(self) -> str:
        if self.stage != "fine-tuned":
            return self.stage
        return f"fine-tuned on {self.finetuned_on or 'unknown data'}"

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "checkpoint_sha256": self.sha256,
                "checkpoint_container": self.container, "checkpoint_format": self.format,
                "checkpoint_stage": self.stage_label, "checkpoint_stage_evidence": self.evidence,
                "checkpoint_image_size": self.image_size,
                "checkpoint_train_files": list(self.train_files)}


def dataset_of(files: Sequence[str], kind: str | None = None) -> str | None:
    """``coco`` / ``flickr`` from annotation file names (None when they say neither)."""
    names = [Path(f).name.lower() for f in files]
    for dataset in ("coco", "flickr"):
        if names and all(dataset in n for n in names):
            return dataset
    if not names and kind == "synthetic":
        return "synthetic"
    return "+".join(Path(f).stem for f in files) or None


def _is_our_config(config: Any) -> bool:
    return isinstance(config, Mapping) and all(
        isinstance(config.get(k), Mapping) for k in ("model", "train", "data"))


def describe_checkpoint(path: Path, obj: Any, state: Mapping[str, Any], sha256: str
                        ) -> CheckpointInfo:
    """Classify a loaded checkpoint file (see :class:`CheckpointInfo`)."""
    fmt = detect_format(state)
    wrapper = obj if isinstance(obj, Mapping) else {}
    if "objective" in wrapper:
        container = "training checkpoint (ours)"
    elif wrapper.get("format") in ("ours", "albef"):
        container = f"slim release ({wrapper['format']} naming)"
    elif fmt in ("pretrain", "retrieval"):
        container = f"ALBEF {fmt}-format file"
    else:
        container = "state dict (ours)"
    config = wrapper.get("config")
    info = CheckpointInfo(path, sha256, container, fmt, stage="pretrained")
    if _is_our_config(config):
        info.config = dict(config)
        mode = config["train"].get("mode", "pretrain")
        info.train_files = [str(f) for f in config["data"].get("train_files") or []]
        info.image_size = (config["model"].get("vision") or {}).get("image_size")
        info.evidence = f"its recorded config has train.mode={mode}"
        if mode == "retrieval":
            info.stage = "fine-tuned"
            info.finetuned_on = dataset_of(info.train_files, config["data"].get("kind"))
            info.evidence += f", data.train_files={info.train_files}"
        return info
    if isinstance(config, Mapping) and ("train_file" in config or "image_res" in config):
        files = config.get("train_file") or []
        info.train_files = [str(f) for f in (files if isinstance(files, list) else [files])]
        info.image_size = config.get("image_res")
    if fmt == "retrieval":
        info.stage = "fine-tuned"
        info.evidence = "ALBEF retrieval format (text_encoder.* without bert., idx_queue)"
        if info.train_files:
            info.finetuned_on = dataset_of(info.train_files)
            info.evidence += f"; its config's train_file={info.train_files}"
    elif fmt == "pretrain":
        info.evidence = "ALBEF pre-training format (text_encoder.bert.*, MLM head)"
    elif any(".mlm_head." in k for k in state):
        info.evidence = "our naming with an MLM head and no recorded config"
    else:
        info.stage = "fine-tuned"
        info.evidence = "our naming without an MLM head and no recorded config"
    return info


def read_checkpoint_file(path: str | Path, *, trust_pickle: bool = False
                         ) -> tuple[dict[str, Any], CheckpointInfo]:
    """(state dict, description) of any checkpoint file; read once (memory-mapped)."""
    path = Path(path).resolve()
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    state = extract_state(obj, str(path))
    return state, describe_checkpoint(path, obj, state, file_sha256(path))


@dataclass
class CheckpointEvaluation:
    metrics: dict[str, float]
    provenance: dict[str, Any]
    info: CheckpointInfo
    load_report: LoadReport


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path,
                        device: str | torch.device | None = None, *,
                        trust_pickle: bool = False, cache_dir: str | Path | None = None,
                        loaded: tuple[dict[str, Any], CheckpointInfo] | None = None
                        ) -> CheckpointEvaluation:
    """Retrieval evaluation of a checkpoint file on ``cfg``'s split (``data.eval_file``).

    The model is built from ``cfg.model`` at the evaluation resolution (``eval.image_size`` or
    ``model.vision.image_size``; the checkpoint's pos_embed is interpolated to it) without an MLM
    head, and loaded with the loud loader (every key accounted for). Every image of the split
    must exist: a partial split would change the metric, so missing images raise.
    """
    state, info = loaded or read_checkpoint_file(checkpoint, trust_pickle=trust_pickle)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    sources = resolve_sources(cfg)
    tokenizer = build_tokenizer(sources)
    size = eval_image_size(cfg)
    model_cfg = replace_path(cfg.model, "vision.image_size", size)
    student = build_albef(model_cfg, resolve_vocab_size(cfg.model, tokenizer.vocab_size),
                          tokenizer.pad_id, with_mlm=False)
    report = load_checkpoint_state(student, state, source=str(info.path))
    student.to(device)
    dataset = build_eval_dataset(cfg, sources)
    found = sum((dataset.image_root / p).is_file() for p in dataset.image_paths)
    if found < len(dataset):
        absent = [p for p in dataset.image_paths if not (dataset.image_root / p).is_file()]
        raise FileNotFoundError(
            f"{sources.eval_file}: {found} of {len(dataset)} listed images exist under "
            f"{dataset.image_root} (missing e.g. {absent[:3]}); a partial split changes the "
            "metric, so nothing was evaluated. Check data.image_root (or --data-root)")
    with torch.no_grad():
        result = evaluate_retrieval(
            student, dataset, tokenizer, device, cfg.eval.k_test, cfg.eval.batch_size,
            split=sources.eval_file.name, checkpoint_hash=info.sha256[:16], cache_dir=cache_dir,
            num_workers=cfg.data.num_workers, rerank=cfg.eval.rerank)
    provenance = {
        **result.provenance, **info.to_dict(),
        "eval_file": str(sources.eval_file), "image_root": str(dataset.image_root),
        "data_kind": cfg.data.kind, "images_listed": len(dataset), "images_found": found,
        "dataset_images_listed": len(dataset),
        "pos_embed_interpolated": [[k, list(a), list(b)] for k, a, b in report.interpolated],
    }
    return CheckpointEvaluation(dict(result.metrics), provenance, info, report)


def protocol_warnings(registry: ProtocolRegistry, name: str, info: CheckpointInfo,
                      protocol_cfg: ExperimentConfig, eval_cfg: ExperimentConfig,
                      n_images: int | None = None) -> list[str]:
    """Every way the checkpoint or the evaluation settings disagree with the protocol."""
    out: list[str] = []
    stage, data = registry.expected_model(name)
    have = f"{info.path.name} is {info.stage_label} ({info.evidence})"
    if stage == "pretrained" and info.stage != "pretrained":
        out.append(f"protocol '{name}' is zero-shot from the PRE-TRAINED model, but {have}: "
                   "these are not zero-shot numbers")
    elif stage == "fine-tuned" and info.stage == "pretrained":
        out.append(f"protocol '{name}' reports a model FINE-TUNED ON {data.upper()}, but {have}")
    elif stage == "fine-tuned" and info.finetuned_on is None:
        out.append(f"protocol '{name}' reports a model fine-tuned on {data.upper()}; {have} and "
                   "its fine-tuning data could not be verified")
    elif stage == "fine-tuned" and info.finetuned_on != data:
        out.append(f"protocol '{name}' reports a model FINE-TUNED ON {data.upper()}, but {have}")
    want, got = eval_image_size(protocol_cfg), eval_image_size(eval_cfg)
    if want != got:
        out.append(f"evaluated at {got} px but protocol '{name}' evaluates at {want} px")
    if protocol_cfg.eval.k_test != eval_cfg.eval.k_test:
        out.append(f"k_test={eval_cfg.eval.k_test} but protocol '{name}' uses "
                   f"k_test={protocol_cfg.eval.k_test}")
    p = registry.get(name)
    if (n_images is not None and p.split_images and eval_cfg.data.kind != "synthetic"
            and n_images != p.split_images):
        out.append(f"the split has {n_images} images but the paper's {p.split_name} has "
                   f"{p.split_images}")
    return out
