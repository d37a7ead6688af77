"""One downstream task stage end to end: load the checkpoint, (TA,) fine-tune, evaluate, record.

``run_task`` is what the grid's downstream stages and ``python -m model.cli.evaluate`` (task protocols) call.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.build import build_albef, resolve_vocab_size
from model.checkpoints import LoadReport, apply_state, read_state
from model.config.loader import to_dict
from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.downstream.backbone import bert_config, load_backbones
from model.downstream.data import build_task_splits, resolve_task_files
from model.downstream.finetune import (
    SPLIT_NAMES,
    TaskResult,
    build_task_objective,
    evaluate_accuracy,
    gather_objects,
    make_objective,
    predict_vqa,
    ta_to_nlvr,
    train_epochs,
    wrap_ddp,
)
from model.downstream.keymap import is_official_task_state, map_official_task_state
from model.downstream.losses import vqa_accuracy
from model.downstream.models import build_task_model
from model.engine.data import build_tokenizer, resolve_sources
from model.engine.distributed import barrier, init_distributed
from model.engine.run_io import METRICS, RESULT, append_jsonl, write_json_atomic
from model.engine.tracking import make_tracker
from model.engine.train import seed_everything

log = logging.getLogger(__name__)

VQA_SUBMISSION = "vqa_result.json"
TASK_CHECKPOINT = "task_checkpoint.pt"


def save_task_checkpoint(path: Path, model: torch.nn.Module, task: TaskConfig,
                         cfg: ExperimentConfig) -> None:
    """The fine-tuned task model (student; our naming), written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "task": task.name, "config": to_dict(cfg)}, tmp)
    os.replace(tmp, path)


def load_task_model(cfg: ExperimentConfig, task: TaskConfig, state: Mapping[str, Tensor],
                    source: str, vocab: int, pad_id: int) -> tuple[torch.nn.Module, LoadReport]:
    """A fine-tuned task model (ours or an official ALBEF file) at the stage's resolution,
    loaded loudly: every key accounted for, pos_embed interpolated."""
    albef = build_albef(cfg.model, vocab, pad_id, with_mlm=task.name == "vqa")
    model = build_task_model(task.name, albef, bert_config(cfg, vocab, pad_id))
    if is_official_task_state(state):
        mapped = map_official_task_state(state, cfg.model.text.text_layers)
        report = LoadReport(source=source, fmt=f"official ALBEF {task.name}",
                            ignored=dict(mapped.ignored), problems=list(mapped.problems),
                            names=dict(mapped.names))
        return model, apply_state(model, mapped.state, report)
    return model, apply_state(model, state, LoadReport(source=source, fmt="ours"))


def checkpoint_image_size(state: Mapping[str, Tensor], patch_size: int) -> int:
    """The resolution a checkpoint's ViT was trained at, from its pos_embed (1, 1+N, D)."""
    for key, value in state.items():
        if key.endswith("visual_encoder.pos_embed") and "teacher" not in key \
                and "_m." not in key:
            side = math.isqrt(value.shape[1] - 1)
            return side * patch_size
    raise ValueError("the checkpoint has no visual_encoder.pos_embed")


def _classify_eval(objective, splits, task: TaskConfig, dist_info) -> dict[str, float]:
    names = SPLIT_NAMES[task.name]
    return {names[0]: evaluate_accuracy(objective, splits["val"].loader, dist_info.device),
            names[1]: evaluate_accuracy(objective, splits["test"].loader, dist_info.device)}


def _classify_epochs(objective, model, splits, cfg, task, dist_info, metrics, tracker
                     ) -> tuple[dict, int]:
    """Train; evaluate val and test after every epoch; keep the epoch ``task.select`` picks."""
    names = SPLIT_NAMES[task.name]
    history: list[dict[str, float]] = []

    def on_epoch(epoch: int) -> None:
        row = _classify_eval(objective, splits, task, dist_info)
        history.append(row)
        if dist_info.is_main:
            append_jsonl(metrics, {"kind": "eval", "epoch": epoch, **row})
        tracker.log(row, epoch, prefix=f"{task.name}/eval_epoch/")
        log.info("%s epoch %d: %s", task.name, epoch, row)

    steps = train_epochs(objective, model, splits["train"].loader, cfg.train, task.alpha,
                         task.alpha_warmup, dist_info, metrics, task.name, on_epoch, tracker)
    best = (max(range(len(history)), key=lambda e: history[e][names[0]])
            if task.select == "best_val" else len(history) - 1)
    return {**history[best], "selected_epoch": best, "epochs_run": len(history)}, steps


def _vqa_eval(objective, splits, answers, tokenizer, task, dist_info, metrics, out_dir
              ) -> dict[str, Any]:
    """Rank the answer list for every test question; write the submission file; score the
    questions whose human answers are known (a local split)."""
    preds = gather_objects(predict_vqa(objective, splits["test"].loader, answers, tokenizer,
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
    return out


def _prepare(cfg: ExperimentConfig, task: TaskConfig, dist_info):
    tokenizer = build_tokenizer(resolve_sources(cfg, dist_info))
    if dist_info.is_main:
        resolve_task_files(cfg, task)  # generates the synthetic stand-ins once
    barrier()
    files = resolve_task_files(cfg, task)
    splits, answers = build_task_splits(cfg, task, files, tokenizer, dist_info)
    return tokenizer, files, splits, answers


def is_ta_state(state: Mapping[str, Tensor]) -> bool:
    """ALBEF's released text-assignment file (``pretrain_model_nlvr.pth``): NLVR2 starts from
    it without running the TA step again."""
    return any(k.startswith("ta_head.") for k in state)


def _from_ta_file(cfg, task, state, source, tokenizer, dist_info):
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    bert_cfg = bert_config(cfg, vocab, tokenizer.pad_id)
    template = build_albef(cfg.model, vocab, tokenizer.pad_id, with_mlm=False)
    mapped = map_official_task_state(state, cfg.model.text.text_layers)
    student, report = ta_to_nlvr(mapped.state, template, bert_cfg, source,
                                 "official ALBEF text-assignment")
    teacher = copy.deepcopy(student) if task.distill else None
    objective = make_objective(task, student, teacher, cfg, tokenizer.pad_id, dist_info.rank)
    info = {"load_reports": [report.to_text()], "ta_steps": 0,
            "ta": "skipped: the checkpoint is a text-assignment model",
            "teacher_init": "copy of the loaded student" if teacher is not None else "none"}
    return objective.to(dist_info.device), info


def _fine_tuned_objective(cfg, task, state, source, tokenizer, init_size, dist_info, metrics):
    if task.name == "nlvr" and is_ta_state(state):
        return _from_ta_file(cfg, task, state, source, tokenizer, dist_info)
    with_ta = task.name == "nlvr" and task.ta.enabled
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    bert_cfg = bert_config(cfg, vocab, tokenizer.pad_id)
    backbones = load_backbones(
        cfg, state, source, tokenizer.vocab_size, tokenizer.pad_id,
        init_size if with_ta else cfg.model.vision.image_size,
        with_mlm=task.name == "vqa", want_teacher=task.distill and not with_ta)
    template = None
    if with_ta:  # the NLVR2 model is rebuilt at the fine-tuning resolution after the TA step
        template = build_albef(cfg.model, vocab, tokenizer.pad_id, with_mlm=False)
        backbones.student.to(dist_info.device)
    objective, info = build_task_objective(cfg, task, backbones, template, bert_cfg, tokenizer,
                                           dist_info, metrics)
    info["load_reports"] = [r.to_text() for r in backbones.reports]
    return objective, info


def run_task(cfg: ExperimentConfig, task: TaskConfig, checkpoint: str | Path, out_dir: str | Path,
             *, device: str | None = None, init_image_size: int | None = None,
             trust_pickle: bool = False, identity: dict[str, Any] | None = None,
             evaluate_only: bool = False) -> TaskResult:
    """Fine-tune ``task`` from ``checkpoint`` under ``cfg`` (the stage config) and evaluate it;
    with ``evaluate_only``, evaluate a fine-tuned task checkpoint (ours or ALBEF's) as it is.

    ``init_image_size``: the checkpoint's resolution (read from its pos_embed when None); NLVR2's
    TA step runs there, as ALBEF's does at the pre-training 256 px.
    """
    t0, out_dir = time.time(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_info = init_distributed(device, cfg.train.dist_timeout_min)
    seed_everything(cfg.train.seed + dist_info.rank)
    metrics = out_dir / METRICS
    tokenizer, files, splits, answers = _prepare(cfg, task, dist_info)
    state, source = read_state(checkpoint, trust_pickle=trust_pickle)
    init_size = init_image_size or checkpoint_image_size(state, cfg.model.vision.patch_size)
    steps = 0
    if evaluate_only:
        vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
        model, report = load_task_model(cfg, task, state, source, vocab, tokenizer.pad_id)
        objective = make_objective(task, model, None, cfg, tokenizer.pad_id, dist_info.rank)
        objective.to(dist_info.device)
        info: dict[str, Any] = {"load_reports": [report.to_text()], "evaluated_as_is": True}
        numbers = (_vqa_eval(objective, splits, answers, tokenizer, task, dist_info, metrics,
                             out_dir) if task.name == "vqa"
                   else _classify_eval(objective, splits, task, dist_info))
    else:
        objective, info = _fine_tuned_objective(cfg, task, state, source, tokenizer, init_size,
                                                dist_info, metrics)
        model = wrap_ddp(objective, dist_info)
        tracker = make_tracker(out_dir, cfg.train.log_to, dist_info.is_main, identity)
        try:
            if task.name == "vqa":
                steps = train_epochs(objective, model, splits["train"].loader, cfg.train,
                                     task.alpha, task.alpha_warmup, dist_info, metrics, "vqa",
                                     tracker=tracker)
                numbers = _vqa_eval(objective, splits, answers, tokenizer, task, dist_info,
                                    metrics, out_dir)
                tracker.log(numbers, steps, prefix="vqa/eval/")
            else:
                numbers, steps = _classify_epochs(objective, model, splits, cfg, task,
                                                  dist_info, metrics, tracker)
        finally:
            tracker.close()
        if dist_info.is_main:
            save_task_checkpoint(out_dir / TASK_CHECKPOINT, objective.student, task, cfg)
    provenance = {
        "task": task.name, "checkpoint": str(checkpoint), "init_image_size": init_size,
        "image_size": cfg.model.vision.image_size, "data_kind": cfg.data.kind,
        "train_examples": len(splits["train"].dataset), "train_steps": steps, **info,
        "selection": task.select, "world_size": dist_info.world_size,
        "wall_s": time.time() - t0, **(identity or {}),
    }
    if files.synthetic:
        provenance["stand_in"] = f"synthetic {task.name} stand-in ({files.image_root.name})"
    metric_values = {k: float(v) for k, v in numbers.items() if k in SPLIT_NAMES[task.name]}
    extra = {k: v for k, v in numbers.items() if k not in metric_values}
    result = TaskResult(task.name, metric_values, {**provenance, **extra})
    if dist_info.is_main:
        write_json_atomic(out_dir / RESULT, {"task": task.name, "metrics": result.metrics,
                                             "provenance": result.provenance})
    return result
