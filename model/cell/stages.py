"""Running the downstream stages of a cell after its pre-training, each in
``<run_dir>/<protocol>/``: retrieval fine-tuning through ``model.engine.train.train`` (which
resumes), zero-shot evaluation, and the SNLI-VE / NLVR2 / VQA task stages of
``model.downstream``. A stage with its own ``DONE`` is skipped; a changed stage config is an
error, not a silent rerun. The protocols and stage configs are ``model.config.protocols``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config.loader import dump_yaml, to_dict
from model.config.protocols import PRETRAIN, ProtocolRegistry, stage_config
from model.config.recipe import run_hash
from model.config.schema import ExperimentConfig
from model.downstream.run import run_task
from model.engine.distributed import barrier, init_distributed
from model.engine.resume import checkpoint_path
from model.engine.run_io import (
    CONFIG,
    DONE,
    METRICS,
    RESULT,
    append_jsonl,
    read_run,
    write_json_atomic,
)
from model.engine.train import train
from model.evaluation.checkpoint import evaluate_checkpoint, evaluate_trained

log = logging.getLogger(__name__)



@dataclass
class StageResult:
    """One stage's numbers; ``checkpoint`` is the model they are for (a training stage's own
    checkpoint, else the checkpoint it evaluated)."""

    protocol: str
    metrics: dict[str, float]
    provenance: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    trained: bool
    config_hash: str
    train_steps: int = 0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "metrics": dict(self.metrics),
                "provenance": dict(self.provenance), "run_dir": str(self.run_dir),
                "checkpoint": str(self.checkpoint), "trained": self.trained,
                "config_hash": self.config_hash, "train_steps": self.train_steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        return cls(data["protocol"], dict(data["metrics"]), dict(data["provenance"]),
                   Path(data["run_dir"]), Path(data["checkpoint"]), bool(data["trained"]),
                   str(data["config_hash"]), int(data.get("train_steps", 0)), skipped=True)


def _stage_provenance(registry: ProtocolRegistry, name: str, stage_cfg: ExperimentConfig,
                      init: Path, init_size: int) -> dict[str, Any]:
    p = registry.get(name)
    out = {
        "protocol": name, "protocol_description": p.description,
        "stage": registry.stage_label(name),
        "evaluation": "fine-tuned" if p.train else "zero-shot",
        "split_name": p.split_name, "init_from": str(init), "init_image_size": init_size,
        "data_kind": stage_cfg.data.kind,
    }
    if p.train:
        out["selection"] = "last epoch (ALBEF keeps the epoch with the best val r_mean)"
    if stage_cfg.data.kind == "synthetic":
        out["stand_in"] = (f"synthetic data replaces {p.split_name or p.dataset} "
                           "(the protocol's files are not read)")
    return out


def _train_stage(registry: ProtocolRegistry, name: str, stage_cfg: ExperimentConfig,
                 stage_dir: Path, init: Path, init_size: int, identity: dict[str, Any],
                 device: str | None, progress: bool) -> StageResult | None:
    summary, tr = train(stage_cfg, stage_dir, device=device, identity=identity,
                        progress=progress)
    barrier()
    with torch.no_grad():  # all ranks: the re-ranking is split across them
        metrics, provenance = evaluate_trained(tr.cfg, tr.objective.student, tr.dist.device,
                                                 tr.sources, tr.run_dir, tr.state.global_step)
    if not tr.dist.is_main:
        return None
    provenance.update(_stage_provenance(registry, name, stage_cfg, init, init_size))
    provenance["pos_embed_shape"] = list(tr.objective.student.visual_encoder.pos_embed.shape)
    append_jsonl(stage_dir / METRICS, {"kind": "eval", "step": summary.steps,
                                       "split": provenance["split"], **metrics})
    return StageResult(name, metrics, provenance, stage_dir, checkpoint_path(stage_dir), True,
                       tr.config_hash, summary.steps)


def _eval_stage(registry: ProtocolRegistry, name: str, stage_cfg: ExperimentConfig,
                stage_dir: Path, init: Path, init_size: int, device: str | None
                ) -> StageResult | None:
    dist_info = init_distributed(device, stage_cfg.train.dist_timeout_min)
    result = evaluate_checkpoint(stage_cfg, init, dist_info.device)  # all ranks (collective)
    if not dist_info.is_main:
        return None
    dump_yaml(stage_cfg, stage_dir / CONFIG)
    provenance = {**result.provenance,
                  **_stage_provenance(registry, name, stage_cfg, init, init_size)}
    append_jsonl(stage_dir / METRICS, {"kind": "eval", "step": 0,
                                       "split": provenance["split"], **result.metrics})
    return StageResult(name, result.metrics, provenance, stage_dir, init, False,
                       run_hash(stage_cfg, dist_info.world_size))


def _method_switches(cfg: ExperimentConfig) -> dict[str, Any]:
    """Which of the cell's method switches were on, and that the task fine-tuning uses none."""
    return {"softmask": cfg.softmask.mode, "focal_gamma": cfg.loss.focal_gamma,
            "mmda": cfg.mmda.enabled,
            "applied_in_fine_tuning": "none: the task objectives have no ITC / ITM / MLM term; "
                                      "the cell differs only by its pre-trained checkpoint"}


def _task_stage(registry: ProtocolRegistry, name: str, stage_cfg: ExperimentConfig,
                stage_dir: Path, init: Path, init_size: int, identity: dict[str, Any],
                device: str | None) -> StageResult | None:
    """A downstream task (SNLI-VE, NLVR2, VQA): fine-tune from ``init`` and evaluate."""
    task = registry.get(name).task_config(stage_cfg.data.kind == "synthetic")
    dump_yaml(stage_cfg, stage_dir / CONFIG)
    result = run_task(stage_cfg, task, init, stage_dir, device=device, init_image_size=init_size,
                      identity=identity)
    dist_info = init_distributed(device, stage_cfg.train.dist_timeout_min)
    if dist_info.is_main:
        provenance = {**_stage_provenance(registry, name, stage_cfg, init, init_size),
                      **result.provenance, "task_config": to_dict(task),
                      "method_switches": _method_switches(stage_cfg)}
        return StageResult(name, result.metrics, provenance, stage_dir,
                           stage_dir / "task_checkpoint.pt", True,
                           run_hash(stage_cfg, dist_info.world_size),
                           int(result.provenance.get("train_steps", 0)))
    return None


def run_downstream(cfg: ExperimentConfig, run_dir: str | Path, pretrain_checkpoint: str | Path,
                   protocols: Sequence[str], identity: dict[str, Any] | None = None, *,
                   registry: ProtocolRegistry, device: str | None = None,
                   progress: bool = False, sets: Sequence[str] = ()
                   ) -> dict[str, StageResult]:
    """Run the downstream stages of one cell after its pre-training; resumable and idempotent.

    Each protocol (and any protocol it starts ``from`` that was not listed, run first) runs in
    ``<run_dir>/<protocol>/`` with the derived :func:`stage_config`: training stages train (or
    resume) with ``model.engine.train.train`` and evaluate their final checkpoint; evaluation
    stages evaluate the checkpoint of their ``from`` stage. A stage directory holding ``DONE``
    is not run again; its ``result.json`` is returned.

    All ranks must call this under torch.distributed (training is data-parallel and the ITM
    re-ranking is split across ranks); only rank 0 writes results and gets the stage results
    (other ranks get ``{}``).

    Args:
        cfg: The cell's (pre-training) config.
        run_dir: The cell's run directory.
        pretrain_checkpoint: The pre-training checkpoint (``<run_dir>/checkpoint.pt``).
        protocols: Protocol names of ``registry``, e.g. ``("coco_finetune",)``.
        registry: The protocols (:func:`load_protocols` of the grid's protocols file).
        identity: The cell's identity (grid, cell, seed, ...), recorded with each stage.
        sets: ``key=value`` items applied to every stage's config after the protocol layers.
    """
    run_dir = Path(run_dir)
    order = registry.resolve_order(protocols)
    checkpoints = {PRETRAIN: Path(pretrain_checkpoint).resolve()}
    configs = {PRETRAIN: cfg}
    results: dict[str, StageResult] = {}
    for name in order:
        p = registry.get(name)
        stage_dir = run_dir / name
        init = checkpoints[p.source]
        stage_cfg = stage_config(cfg, name, init, registry, sets)
        configs[name] = stage_cfg
        checkpoints[name] = checkpoint_path(stage_dir).resolve() if p.train else init
        verdict = read_run(stage_dir)
        if verdict.finished and verdict.result is not None:
            done = StageResult.from_dict(verdict.result)
            now = run_hash(stage_cfg, int((identity or {}).get("world_size", 1)))
            if done.config_hash != now:
                log.warning("stage %s in %s finished under config %s but its config is now %s; "
                            "keeping the finished result (delete the directory to redo it)",
                            name, stage_dir, done.config_hash, now)
            log.info("stage %s already done in %s", name, stage_dir)
            results[name] = done
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        init_size = configs[p.source].model.vision.image_size
        t0 = time.time()
        stage_identity = {**(identity or {}), "stage": name}
        log.info("stage %s (%s) from %s in %s", name, registry.stage_label(name), init,
                 stage_dir)
        if p.task is not None:
            result = _task_stage(registry, name, stage_cfg, stage_dir, init, init_size,
                                 stage_identity, device)
        elif p.train:
            result = _train_stage(registry, name, stage_cfg, stage_dir, init, init_size,
                                  stage_identity, device, progress)
        else:
            result = _eval_stage(registry, name, stage_cfg, stage_dir, init, init_size, device)
        if result is not None:
            write_json_atomic(stage_dir / RESULT, {
                **stage_identity, "status": "done", **result.to_dict(),
                "wall_s": time.time() - t0})
            (stage_dir / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
            results[name] = result
        barrier()
    return results
