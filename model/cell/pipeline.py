"""One grid cell end to end: train (or resume) -> evaluate -> result.json + DONE.

The same function runs in-process, under submitit's local executor and in a SLURM array task;
only rank 0 evaluates and writes results. Any exception leaves a FAILED marker with the error and
traceback tail (kept for the status view) and is re-raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model.cell.stages import run_downstream
from model.config.protocols import ProtocolRegistry, load_protocols, validate_downstream
from model.config.schema import ExperimentConfig
from model.engine.distributed import barrier, cleanup_distributed
from model.engine.guard import blowup_text, detect_blowup
from model.engine.resume import checkpoint_path
from model.engine.run_io import (
    DONE,
    FAILED,
    METRICS,
    RESULT,
    WRITTEN,
    append_jsonl,
    late_training_means,
    read_run,
    train_rows,
    write_json_atomic,
)
from model.engine.run_lock import RunLock
from model.engine.tracking import make_tracker
from model.engine.train import train
from model.evaluation.checkpoint import evaluate_trained
from model.safe_paths import UnsafePathError, symlinks_in, write_text_no_follow

log = logging.getLogger(__name__)


def run_cell(cfg: ExperimentConfig, run_dir: str | Path, identity: dict[str, Any] | None = None,
             device: str | None = None, progress: bool = False,
             protocols: str | Path | None = None) -> dict[str, Any]:
    """Train + evaluate one run directory; idempotent (a finished run returns its result).

    ``protocols``: the protocols file that names ``cfg.downstream``'s stages (the grid's
    ablations/protocols.yaml); required when the config lists downstream protocols.
    """
    run_dir = Path(run_dir)
    verdict = read_run(run_dir)
    if verdict.finished and verdict.result is not None:
        return verdict.result
    run_dir.mkdir(parents=True, exist_ok=True)
    planted = symlinks_in(run_dir, WRITTEN)
    if planted:  # before anything is written: the harness never writes through a link
        raise UnsafePathError(f"{run_dir}: {', '.join(planted)} is a symlink; the harness "
                              f"writes these files itself and never through links: remove them")
    # One trainer per run: a second job on this directory stops here (RunLocked names the
    # holder) before it touches anything. Rank 0 holds the lock for the whole job.
    lock = RunLock(run_dir) if _launch_rank() == 0 else contextlib.nullcontext()
    with lock:
        (run_dir / FAILED).unlink(missing_ok=True)  # a resubmission gets a fresh chance
        try:
            return _run(cfg, run_dir, identity or {}, device, progress, protocols)
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised unchanged
            if not isinstance(exc, KeyboardInterrupt | SystemExit):
                tail = "".join(traceback.format_exception(exc))[-4000:]
                write_text_no_follow(run_dir / FAILED, f"{type(exc).__name__}: {exc}\n\n{tail}")
            raise
        finally:
            cleanup_distributed()


def headline_stage(order: Sequence[str], stages: Mapping[str, Any]) -> Any | None:
    """The stage whose numbers head a cell's result (what the ablation tables read): the last
    retrieval stage listed (e.g. COCO 5K fine-tuned), never a SNLI-VE / NLVR2 / VQA stage, whose
    accuracies are other metrics; None keeps the pre-training evaluation. Every stage is kept
    under ``stages`` either way."""
    for name in reversed(order):
        if name in stages and "TR@1" in stages[name].metrics:
            return stages[name]
    return None


def _launch_rank() -> int:
    """This process's global rank from the launcher's environment (before torch.distributed
    is initialised): torchrun's RANK, SLURM's SLURM_PROCID, else 0."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _registry(cfg: ExperimentConfig, protocols: str | Path | None) -> ProtocolRegistry | None:
    """The protocols of ``cfg.downstream`` (None when there are none)."""
    if not cfg.downstream:
        return None
    if protocols is None:
        raise ValueError(f"downstream lists {list(cfg.downstream)} but no protocols file was "
                         "given (run_cell(..., protocols=ablations/protocols.yaml))")
    registry = load_protocols(protocols)
    validate_downstream(cfg, registry)  # fail now on a bad stage config, not after pre-training
    return registry


def _run(cfg: ExperimentConfig, run_dir: Path, identity: dict[str, Any], device: str | None,
         progress: bool, protocols: str | Path | None) -> dict[str, Any]:
    t0 = time.time()
    registry = _registry(cfg, protocols)
    summary, tr = train(cfg, run_dir, device=device, identity=identity, progress=progress)
    barrier()
    # Every rank evaluates: under torch.distributed the ITM re-ranking splits the query rows
    # across ranks and all-reduces them (a rank-0-only call would wait forever).
    with torch.no_grad():
        metrics, provenance = evaluate_trained(tr.cfg, tr.objective.student, tr.dist.device,
                                                 tr.sources, tr.run_dir, tr.state.global_step)
    # ITM by pair type over the last quarter of training (the table's clean-pair accuracy);
    # accuracies in percent like every other metric, losses as they are.
    late = late_training_means(run_dir / METRICS, "itm/", summary.steps)
    metrics.update({k: 100.0 * v if k.endswith(("_acc", "shortcut")) else v
                    for k, v in late.items()})
    blowup = detect_blowup(train_rows(run_dir / METRICS), cfg.train.blowup_factor)
    if blowup is not None:
        log.warning("%s: %s", run_dir.name, blowup_text(blowup))
    if tr.dist.is_main:
        append_jsonl(run_dir / METRICS, {"kind": "eval", "step": summary.steps,
                                         "split": provenance["split"], **metrics})
        tracker = make_tracker(run_dir, cfg.train.log_to, True, identity)
        tracker.log(metrics, summary.steps, prefix="eval/")
        tracker.close()
    is_main, rank, config_hash = tr.dist.is_main, tr.dist.rank, tr.config_hash
    stages: dict[str, Any] = {}
    if cfg.downstream:
        del tr  # free the pre-training model and optimizer before the stages build theirs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        stages = run_downstream(cfg, run_dir, checkpoint_path(run_dir), cfg.downstream,
                                identity, registry=registry, device=device, progress=progress)
    if not is_main:
        return {"status": "done", "rank": rank}
    result = {
        **identity, "config_hash": config_hash,
        # A finite blow-up finishes (DONE: rerunning the same config would blow up again) but
        # is marked, so that no table reports its numbers.
        "status": "diverged" if blowup is not None else "done", "metrics": metrics,
        "provenance": provenance, "train_steps": summary.steps,
        "resumed_from": summary.resumed_from, "first_losses": summary.first_losses,
        "last_losses": summary.last_losses, "wall_s": time.time() - t0,
    }
    if stages:
        result["stages"] = {"pretrain": {"metrics": metrics, "provenance": provenance},
                            **{name: {"metrics": s.metrics, "provenance": s.provenance}
                               for name, s in stages.items()}}
        headline = headline_stage(cfg.downstream, stages)
        if headline is not None:
            result["metrics"], result["provenance"] = headline.metrics, headline.provenance
    if blowup is not None:
        result["diverged"] = {**blowup, "reason": blowup_text(blowup)}
    write_json_atomic(run_dir / RESULT, result)
    write_text_no_follow(run_dir / DONE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return result
