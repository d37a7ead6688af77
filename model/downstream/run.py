"""One downstream task stage end to end: load the checkpoint, (TA,) fine-tune, evaluate, record.

``run_task`` is what the grid's downstream stages and ``python -m model.cli.evaluate`` (task
protocols) call; what differs per task, it asks the task's spec (model/downstream/tasks/).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.atomic import signals_deferred
from model.build import build_albef, resolve_vocab_size
from model.checkpoints import LoadReport, apply_state, read_state
from model.config.loader import to_dict
from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.downstream.backbone import bert_config
from model.downstream.data import TaskFilesResolved, build_task_splits, resolve_task_files
from model.downstream.finetune import TaskResult, wrap_ddp
from model.downstream.keymap import is_official_task_state, map_official_task_state
from model.downstream.tasks import TaskRun, TaskSpec, task_spec
from model.engine.data import build_tokenizer, resolve_sources
from model.engine.distributed import barrier, init_distributed
from model.engine.run_io import METRICS, RESULT, write_json_atomic
from model.engine.tracking import make_tracker
from model.engine.train import seed_everything

log = logging.getLogger(__name__)

TASK_CHECKPOINT = "task_checkpoint.pt"


def save_task_checkpoint(path: Path, model: torch.nn.Module, task: TaskConfig,
                         cfg: ExperimentConfig) -> None:
    """The fine-tuned task model (student; our naming), written atomically."""
    tmp = path.with_suffix(".tmp")
    with signals_deferred():  # a pre-emption exit inside the zip writer would fail the job
        torch.save({"model": model.state_dict(), "task": task.name, "config": to_dict(cfg)}, tmp)
        os.replace(tmp, path)


def load_task_model(cfg: ExperimentConfig, task: TaskConfig, state: Mapping[str, Tensor],
                    source: str, vocab: int, pad_id: int) -> tuple[torch.nn.Module, LoadReport]:
    """A fine-tuned task model (ours or an official ALBEF file) at the stage's resolution,
    loaded loudly: every key accounted for, pos_embed interpolated."""
    spec = task_spec(task.name)
    albef = build_albef(cfg.model, vocab, pad_id, with_mlm=spec.with_mlm)
    model = spec.model(albef, bert_config(cfg, vocab, pad_id))
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


def _prepare(cfg: ExperimentConfig, task: TaskConfig, spec: TaskSpec, dist_info, out_dir: Path
             ) -> tuple[TaskRun, TaskFilesResolved]:
    """The stage's tokenizer and splits (synthetic stand-ins generated once, by rank 0)."""
    tokenizer = build_tokenizer(resolve_sources(cfg, dist_info))
    if dist_info.is_main:
        resolve_task_files(cfg, task, spec)  # generates the synthetic stand-ins once
    barrier()
    files = resolve_task_files(cfg, task, spec)
    splits, answers = build_task_splits(cfg, task, spec, files, tokenizer, dist_info)
    run = TaskRun(cfg, task, dist_info, tokenizer, splits, answers, out_dir / METRICS, out_dir)
    return run, files


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
    spec = task_spec(task.name)
    dist_info = init_distributed(device, cfg.train.dist_timeout_min)
    seed_everything(cfg.train.seed + dist_info.rank)
    run, files = _prepare(cfg, task, spec, dist_info, out_dir)
    state, source = read_state(checkpoint, trust_pickle=trust_pickle)
    init_size = init_image_size or checkpoint_image_size(state, cfg.model.vision.patch_size)
    steps = 0
    if evaluate_only:
        vocab = resolve_vocab_size(cfg.model, run.tokenizer.vocab_size)
        model, report = load_task_model(cfg, task, state, source, vocab, run.tokenizer.pad_id)
        objective = spec.objective(task, model, None, cfg, run.tokenizer.pad_id, dist_info.rank)
        objective.to(dist_info.device)
        info: dict[str, Any] = {"load_reports": [report.to_text()], "evaluated_as_is": True}
        numbers = spec.evaluate(run, objective)
    else:
        objective, info = spec.fine_tuned_objective(run, state, source, init_size)
        model = wrap_ddp(objective, dist_info)
        tracker = make_tracker(out_dir, cfg.train.log_to, dist_info.is_main, identity)
        try:
            numbers, steps = spec.fit(run, objective, model, tracker)
        finally:
            tracker.close()
        if dist_info.is_main:
            save_task_checkpoint(out_dir / TASK_CHECKPOINT, objective.student, task, cfg)
    provenance = {
        "task": task.name, "checkpoint": str(checkpoint), "init_image_size": init_size,
        "image_size": cfg.model.vision.image_size, "data_kind": cfg.data.kind,
        "train_examples": len(run.splits["train"].dataset), "train_steps": steps, **info,
        "selection": task.select, "world_size": dist_info.world_size,
        "wall_s": time.time() - t0, **(identity or {}),
    }
    if files.synthetic:
        provenance["stand_in"] = f"synthetic {task.name} stand-in ({files.image_root.name})"
    metric_values = {k: float(v) for k, v in numbers.items() if k in spec.splits}
    extra = {k: v for k, v in numbers.items() if k not in metric_values}
    result = TaskResult(task.name, metric_values, {**provenance, **extra})
    if dist_info.is_main:
        write_json_atomic(out_dir / RESULT, {"task": task.name, "metrics": result.metrics,
                                             "provenance": result.provenance})
    return result
