"""Full training checkpoints: atomic, resumable bit-exactly on CPU.

A checkpoint holds everything the next step depends on: student and momentum weights, queues and
their pointer (all in the objective's state dict), the optimizer, the step generator, the global
RNG states (dropout), and the data position (epoch, batch within epoch). This module is the one
place that names checkpoint files; nothing else calls ``torch.save`` on training state.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.atomic import signals_deferred
from model.checkpoints import read_checkpoint
from model.objective import Objective

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainState:
    """Where training is: ``epoch`` and ``batch`` (within the epoch) of the *next* step."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def _rng_state(objective: Objective) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "step_generator": objective.generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_states(objective: Objective) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective under torch.distributed: every
    rank calls it). Each rank draws its own hard negatives, MLM corruption and dropout from
    generators seeded with seed + rank, so an exact multi-rank resume needs all of them."""
    state = _rng_state(objective)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def _own_rng_state(saved: Any) -> dict[str, Any]:
    """This rank's entry of a checkpoint's RNG states (older single-rank files hold one dict)."""
    if isinstance(saved, dict):
        return saved
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return saved[rank]


def _set_rng_state(objective: Objective, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    objective.generator.set_state(state["step_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, objective: Objective, optimizer: torch.optim.Optimizer,
                    state: TrainState, config: dict[str, Any], config_hash: str,
                    data_position: dict[str, Any] | None = None,
                    world_size: int = 1,
                    rng: list[dict[str, Any]] | None = None) -> Path:
    """Write the full checkpoint atomically (tmp file, fsync, rename): a crash or a preemption
    mid-write leaves the previous checkpoint intact. ``data_position``: where the data stream
    continues (for shards: the shard list and each stream's shard and offset)."""
    path = checkpoint_path(run_dir)
    payload = {
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        # One entry per rank (rank_rng_states); only this process's when not given.
        "rng": rng if rng is not None else [_rng_state(objective)],
        "config": config,
        "config_hash": config_hash,
        "format": "softmask-harness/full/v1",
        "data": data_position,
        "world_size": world_size,
    }
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a file (or a planted symlink) left there is never written through
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with signals_deferred():
        with os.fdopen(os.open(tmp, flags, 0o644), "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path, objective: Objective,
                    optimizer: torch.optim.Optimizer | None, config_hash: str,
                    shards: list[list[Any]] | None = None,
                    world_size: int | None = None) -> TrainState | None:
    """Resume from ``run_dir``'s checkpoint if there is one; ``None`` otherwise.

    A checkpoint written under another config hash is refused (a silently different experiment
    would continue), and so is one written while streaming another shard list than ``shards``
    (same config, but the index file's shards or counts changed: the stream would differ).
    """
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    payload = read_checkpoint(path)  # tensors and plain data only (weights_only)
    saved_world = payload.get("world_size", 1)
    if world_size is not None and saved_world != world_size:
        raise RuntimeError(
            f"{path} was written by a job with {saved_world} rank(s) but this job has "
            f"{world_size}: resuming would continue with another global batch (the per-rank "
            f"batch and the ranks' in-batch negatives are part of the recipe); resume with "
            f"{saved_world} rank(s) or start a new run directory")
    if payload.get("config_hash") != config_hash:
        raise RuntimeError(
            f"{path} was written by config {payload.get('config_hash')} but this run's config "
            f"is {config_hash}; use a new run directory (the grid names one per config)"
        )
    _check_shards(path, payload.get("data"), shards)
    objective.load_state_dict(payload["objective"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(objective, _own_rng_state(payload["rng"]))
    state = TrainState(**payload["state"])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.global_step,
             state.epoch, state.batch)
    return state


def _check_shards(path: Path, saved: dict[str, Any] | None,
                  shards: list[list[Any]] | None) -> None:
    before = (saved or {}).get("shards")
    if shards is None or before is None:
        return
    if [list(s) for s in before] != shards:
        raise RuntimeError(
            f"{path} was written while streaming {len(before)} shards "
            f"({sum(n for _, n in before)} samples) but the shard index now lists {len(shards)} "
            f"({sum(n for _, n in shards)} samples); resuming would not continue the same "
            f"stream: restore the index or start a new run directory")
    for s in (saved or {}).get("streams", []):
        log.info("data stream %d continues in %s at sample %d", s["stream"], s["shard"],
                 s["offset"])


def load_objective_weights(objective: nn.Module, path: str | Path, *,
                           trust_pickle: bool = False) -> dict[str, Any]:
    """Load only the weights of a full checkpoint (e.g. to evaluate it); returns its payload
    minus the tensors (config, state, hash) for provenance. Safe (weights_only) loading unless
    ``trust_pickle``: a file someone hands you must not run code on load."""
    payload = read_checkpoint(path, trust_pickle=trust_pickle)
    if "objective" not in payload:
        raise ValueError(f"{path}: not a full training checkpoint (no 'objective' entry); "
                         "for official ALBEF files use model.checkpoints.load_albef_checkpoint")
    objective.load_state_dict(payload["objective"])
    return {k: v for k, v in payload.items() if k not in ("objective", "optimizer", "rng")}
