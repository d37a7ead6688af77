"""Evaluation of a trained run: zero-shot retrieval, compositional swaps and Grad-CAM
localisation, with the provenance of every number (shared by the cell pipeline and the
retrieval fine-tuning stages)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from model.data.transforms import build_transform
from model.engine.compositional import compositional_accuracy, load_negative_items
from model.engine.data import build_eval_dataset, build_tokenizer
from model.engine.localisation import load_box_items, localisation_scores
from model.engine.occlusion import occlusion_scores
from model.engine.resume import checkpoint_path
from model.engine.retrieval import evaluate_retrieval
from model.engine.train import Trainer


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def evaluate_trained(tr: Trainer) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot retrieval (ITC-only and ITM re-ranked) and, when the split has them,
    compositional hard-negative accuracy; with provenance for every number."""
    cfg, student, device = tr.cfg, tr.objective.student, tr.dist.device
    tokenizer = build_tokenizer(tr.sources)
    dataset = build_eval_dataset(cfg, tr.sources)
    ckpt = checkpoint_path(tr.run_dir)
    ckpt_hash = file_sha256(ckpt)
    report = evaluate_retrieval(student, dataset, tokenizer, device, cfg.eval.k_test,
                                cfg.eval.batch_size, split=f"{tr.sources.eval_file.name}",
                                checkpoint_hash=ckpt_hash[:16],
                                cache_dir=tr.run_dir if cfg.eval.cache_features else None,
                                rerank=cfg.eval.rerank)
    metrics = dict(report.metrics)
    test_view = build_transform("test", cfg.eval.image_size or cfg.model.vision.image_size)
    if tr.sources.negatives_file is not None:
        items = load_negative_items(tr.sources.negatives_file)
        metrics.update(compositional_accuracy(student, items, test_view, tr.sources.image_root,
                                              tokenizer, device, cfg.eval.batch_size))
    if tr.sources.boxes_file is not None:
        boxes = load_box_items(tr.sources.boxes_file)
        metrics.update(localisation_scores(
            student, boxes, test_view, tr.sources.image_root, tokenizer, device,
            cfg.softmask.layer, cfg.model.vision.patch_size, cfg.eval.batch_size))
        metrics.update(occlusion_scores(
            student, boxes, test_view, tr.sources.image_root, tokenizer, device,
            cfg.eval.k_test, dataset.texts, dataset.img2txt,
            {path: i for i, path in enumerate(dataset.image_paths)}, cfg.eval.batch_size))
    provenance = {
        **report.provenance,
        "checkpoint": str(ckpt), "checkpoint_sha256": ckpt_hash,
        "stage": "pretrained" if cfg.train.mode == "pretrain" else "fine-tuned",
        "protocol": "zero-shot retrieval" if cfg.train.mode == "pretrain" else "fine-tuned",
        "eval_file": str(tr.sources.eval_file), "dataset_images_listed": len(dataset),
        "train_steps": tr.state.global_step,
    }
    return metrics, provenance
