"""One downstream task stage end to end: load the checkpoint, (TA,) fine-tune, evaluate, record.

``run_task`` is what the grid's downstream stages and ``python -m model.downstream`` call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from model.build import build_albef, resolve_vocab_size
from model.checkpoints import read_state
from model.config.loader import replace_path
from model.config.schema import ExperimentConfig
from model.downstream.backbone import bert_config, load_backbones
from model.downstream.config import TaskConfig
from model.downstream.data import build_task_splits, resolve_task_files
from model.downstream.finetune import (
    SPLIT_NAMES,
    TaskResult,
    _gather,
    _train_epochs,
    _wrap,
    build_task_objective,
    evaluate_accuracy,
    predict_vqa,
)
from model.downstream.losses import vqa_accuracy
from model.engine.data import build_tokenizer, resolve_sources
from model.engine.distributed import barrier, init_distributed
from model.engine.run_io import append_jsonl, write_json_atomic
from model.engine.train import seed_everything

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
RESULT = "result.json"
VQA_SUBMISSION = "vqa_result.json"


def checkpoint_image_size(state: Mapping[str, Tensor], patch_size: int) -> int:
    """The resolution a checkpoint's ViT was trained at, from its pos_embed (1, 1+N, D)."""
    for key, value in state.items():
        if key.endswith("visual_encoder.pos_embed") and "teacher" not in key \
                and "_m." not in key:
            side = math.isqrt(value.shape[1] - 1)
            return side * patch_size
    raise ValueError("the checkpoint has no visual_encoder.pos_embed")


def _classify_epochs(objective, model, splits, cfg, task, dist_info, metrics) -> tuple[dict, int]:
    """Train; evaluate val and test after every epoch; keep the epoch ``task.select`` picks."""
    names = SPLIT_NAMES[task.name]
    history: list[dict[str, float]] = []

    def on_epoch(epoch: int) -> None:
        row = {names[0]: evaluate_accuracy(objective, splits["val"].loader, dist_info.device),
               names[1]: evaluate_accuracy(objective, splits["test"].loader, dist_info.device)}
        history.append(row)
        if dist_info.is_main:
            append_jsonl(metrics, {"kind": "eval", "epoch": epoch, **row})
        log.info("%s epoch %d: %s", task.name, epoch, row)

    steps = _train_epochs(objective, model, splits["train"].loader, cfg.train, task.alpha,
                          task.alpha_warmup, dist_info, metrics, task.name, on_epoch)
    best = (max(range(len(history)), key=lambda e: history[e][names[0]])
            if task.select == "best_val" else len(history) - 1)
    return {**history[best], "selected_epoch": best, "epochs_run": len(history)}, steps


def _vqa(objective, model, splits, answers, tokenizer, cfg, task, dist_info, metrics, out_dir
         ) -> tuple[dict, int]:
    steps = _train_epochs(objective, model, splits["train"].loader, cfg.train, task.alpha,
                          task.alpha_warmup, dist_info, metrics, "vqa")
    preds = _gather(predict_vqa(objective, splits["test"].loader, answers, tokenizer,
                                task.k_test, dist_info.device))
    out: dict[str, Any] = {"questions": len(preds)}
    if dist_info.is_main:
        preds.sort(key=lambda p: p["question_id"])
        write_json_atomic(out_dir / VQA_SUBMISSION, preds)
        by_id = {r.question_id: r for r in splits["test"].records}
        scored = [vqa_accuracy(p["answer"], by_id[p["question_id"]].answers) for p in preds
                  if by_id[p["question_id"]].answers]
        if scored:
            out["test"] = 100.0 * sum(scored) / len(scored)
            out["scored_questions"] = len(scored)
        append_jsonl(metrics, {"kind": "eval", **out})
    return out, steps


def run_task(cfg: ExperimentConfig, task: TaskConfig, checkpoint: str | Path, out_dir: str | Path,
             *, device: str | None = None, init_image_size: int | None = None,
             trust_pickle: bool = False, identity: dict[str, Any] | None = None) -> TaskResult:
    """Fine-tune ``task`` from ``checkpoint`` under ``cfg`` (the stage config) and evaluate it.

    ``init_image_size``: the checkpoint's resolution (read from its pos_embed when None); NLVR2's
    TA step runs there, as ALBEF's does at the pre-training 256 px.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info = init_distributed(device, cfg.train.dist_timeout_min)
    seed_everything(cfg.train.seed + dist_info.rank)
    metrics = out_dir / METRICS
    tokenizer = build_tokenizer(resolve_sources(cfg, dist_info))
    if dist_info.is_main:
        files = resolve_task_files(cfg, task)  # generates the synthetic stand-ins once
    barrier()
    files = resolve_task_files(cfg, task)
    splits, answers = build_task_splits(cfg, task, files, tokenizer, dist_info)
    state, source = read_state(checkpoint, trust_pickle=trust_pickle)
    init_size = init_image_size or checkpoint_image_size(state, cfg.model.vision.patch_size)
    with_ta = task.name == "nlvr" and task.ta.enabled
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    bert_cfg = bert_config(cfg, vocab, tokenizer.pad_id)
    backbones = load_backbones(
        cfg, state, source, tokenizer.vocab_size, tokenizer.pad_id,
        init_size if with_ta else cfg.model.vision.image_size,
        with_mlm=task.name == "vqa", want_teacher=task.distill and not with_ta)
    template = build_albef(replace_path(cfg.model, "vision.image_size",
                                        cfg.model.vision.image_size), vocab, tokenizer.pad_id,
                           with_mlm=False) if with_ta else None
    if with_ta:
        backbones.student.to(dist_info.device)
    objective, info = build_task_objective(cfg, task, backbones, template, bert_cfg, tokenizer,
                                           dist_info, metrics)
    model = _wrap(objective, dist_info)
    if task.name == "vqa":
        numbers, steps = _vqa(objective, model, splits, answers, tokenizer, cfg, task,
                              dist_info, metrics, out_dir)
    else:
        numbers, steps = _classify_epochs(objective, model, splits, cfg, task, dist_info,
                                          metrics)
    provenance = {
        "task": task.name, "checkpoint": str(checkpoint), "init_image_size": init_size,
        "image_size": cfg.model.vision.image_size, "data_kind": cfg.data.kind,
        "train_examples": len(splits["train"].dataset), "train_steps": steps,
        "load_reports": [r.to_text() for r in backbones.reports], **info,
        "selection": task.select, "world_size": dist_info.world_size,
        "wall_s": time.time() - t0, **(identity or {}),
    }
    if files.synthetic:
        provenance["stand_in"] = f"synthetic {task.name} stand-in generated at {files.image_root}"
    metric_values = {k: float(v) for k, v in numbers.items()
                     if k in SPLIT_NAMES[task.name]}
    result = TaskResult(task.name, metric_values,
                        {**provenance, **{k: v for k, v in numbers.items()
                                          if k not in metric_values}})
    if dist_info.is_main:
        write_json_atomic(out_dir / RESULT, {"task": task.name, "metrics": result.metrics,
                                             "provenance": result.provenance})
    return result

