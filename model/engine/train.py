"""The training loop: ALBEF's schedule, alpha ramp, DDP, logging, atomic checkpoints, resume."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.build import build_objective
from model.config.experiment import recipe_hash
from model.config.loader import dump_yaml, to_dict
from model.config.recipe import Launch, launch_for, run_hash, scaled_train
from model.config.schema import ExperimentConfig, TrainConfig, check_world_size
from model.engine.data import (
    DataSources,
    TrainData,
    build_tokenizer,
    build_train_data,
    resolve_sources,
    special_ids,
)
from model.engine.distributed import DistInfo, broadcast_buffers, init_distributed
from model.engine.guard import DivergenceGuard
from model.engine.optim import (
    StepSchedule,
    build_optimizer,
    consolidate,
    set_lr,
    step_schedule,
)
from model.engine.resume import (
    TrainState,
    checkpoint_path,
    load_checkpoint,
    rank_rng_states,
    save_checkpoint,
)
from model.engine.run_io import (
    CONFIG,
    METRICS,
    append_jsonl,
    first_train_row,
    keep_lines_until,
    write_meta,
)
from model.engine.step import move_batch, train_step
from model.engine.tracking import Tracker, make_tracker
from model.objective import Objective, StepOutput

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    resumed_from: int | None
    last_losses: dict[str, float] = field(default_factory=dict)
    first_losses: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class Trainer:
    """Everything a training run holds; built by :func:`setup`, driven by :func:`train`."""

    cfg: ExperimentConfig
    run_dir: Path
    dist: DistInfo
    sources: DataSources
    data: TrainData
    objective: Objective
    model: torch.nn.Module  # the objective or its DDP wrapper
    optimizer: torch.optim.Optimizer
    state: TrainState
    config_hash: str
    resumed_from: int | None
    launch: Launch  # world size, global batch and the learning-rate rule in force
    schedule: TrainConfig  # cfg.train with the launch's learning rates (recipe.scaled_train)
    guard: DivergenceGuard | None = None  # built at the first step (it needs the loss names)
    tracker: Tracker | None = None  # TensorBoard / W&B (rank 0), fed from the logged rows
    saved_step: int | None = None  # global step of the checkpoint on disk, if any

    @property
    def total_steps(self) -> int:
        full = self.cfg.train.epochs * self.data.batches_per_epoch
        return min(full, self.cfg.train.max_steps or full)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: ExperimentConfig, run_dir: Path, device: str | None = None,
          identity: dict[str, Any] | None = None) -> Trainer:
    """Build data, objective and optimizer; resume from ``run_dir`` if it holds a checkpoint."""
    dist_info = init_distributed(device, cfg.train.dist_timeout_min)
    launch = _check_launch(cfg, dist_info.world_size, identity or {}, run_dir)
    seed_everything(cfg.train.seed + dist_info.rank)  # ALBEF seeds with seed + rank
    run_dir.mkdir(parents=True, exist_ok=True)
    chash = run_hash(cfg, dist_info.world_size)
    if dist_info.is_main:  # write-once: a later (even a refused) resume never changes it
        write_meta(run_dir, {"config_hash": chash, "recipe_hash": recipe_hash(cfg),
                             **(identity or {}), "world_size": dist_info.world_size,
                             "global_batch": launch.global_batch,
                             "lr_effective": launch.lr_effective})
    sources = resolve_sources(cfg, dist_info)
    tokenizer = build_tokenizer(sources)
    data = build_train_data(cfg, sources, tokenizer, dist_info)
    objective = build_objective(cfg, special_ids(tokenizer), seed=cfg.train.seed + dist_info.rank)
    _load_initial_weights(cfg, objective)
    objective.to(dist_info.device)
    optimizer = build_optimizer(objective, cfg.train)
    state = load_checkpoint(run_dir, objective, optimizer, chash, shards=data.shard_list(),
                            world_size=dist_info.world_size)
    # Written only once the checkpoint (if any) is accepted: a resume refused for a different
    # config hash must leave the run directory describing the checkpoint's experiment.
    if dist_info.is_main:
        dump_yaml(cfg, run_dir / CONFIG)
    resumed_from = state.global_step if state else None
    model: torch.nn.Module = objective
    broadcast_buffers(objective)  # rank 0's initial queues everywhere, as ALBEF's DDP has them
    if dist_info.world_size > 1:
        # Queues are all-gathered, so they agree across ranks by construction; broadcasting
        # them every step (DDP's default) would move K x d floats per step for nothing.
        model = DistributedDataParallel(
            objective, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda"
            else None, broadcast_buffers=False)
    return Trainer(cfg, run_dir, dist_info, sources, data, objective, model, optimizer,
                   state or TrainState(), chash, resumed_from, launch,
                   scaled_train(cfg.train, launch), saved_step=resumed_from)


def _check_launch(cfg: ExperimentConfig, world_size: int, identity: dict[str, Any],
                  run_dir: Path) -> Launch:
    """The launch shape of this job, refused when it is not the one the run was planned
    with (e.g. a requeue onto another allocation) or when it changes the recipe's global
    batch without a stated rule (model/config/recipe.py)."""
    planned = identity.get("world_size")
    if planned is not None and int(planned) != world_size:
        raise RuntimeError(
            f"{run_dir.name} was planned for {planned} rank(s) (its directory name includes "
            f"the world size) but this job has {world_size}: the global batch, and with it "
            f"the recipe, would change; run it with {planned} rank(s) or plan a new run")
    check_world_size(cfg, world_size)
    return launch_for(cfg.train, world_size)


def _load_initial_weights(cfg: ExperimentConfig, objective: Objective) -> None:
    """Initial weights: a whole checkpoint (``train.init_from``), else BERT / DeiT weights when
    the config names them. Every load reports missing/unexpected keys loudly and fails on
    anything not on the explicit allow-list (model/checkpoints/loading.py)."""
    if cfg.train.init_from is not None:
        from model.checkpoints import load_albef_checkpoint

        load_albef_checkpoint(objective, cfg.train.init_from)
        return
    if cfg.model.text.init is None and cfg.model.vision.init is None:
        return
    from model.pretrained import load_bert_weights, load_vit_weights

    local = not cfg.model.allow_download
    if cfg.model.text.init is not None:
        load_bert_weights(objective, cfg.model.text.init, local_files_only=local)
    if cfg.model.vision.init is not None:
        load_vit_weights(objective, cfg.model.vision.init, local_files_only=local)


def _scalars(out: StepOutput) -> dict[str, float]:
    """The one host sync of a logged step."""
    values = {f"loss/{k}": float(v) for k, v in out.losses.items()}
    values["loss/total"] = float(out.loss)
    values.update({k: float(v) for k, v in out.stats.items()})
    return values


def _log_step(tr: Trainer, out: StepOutput, lr: float, alpha: float, t0: float,
              data_wait: float, steps_in_window: int) -> dict[str, float]:
    record = {"kind": "train", "step": tr.state.global_step, "epoch": tr.state.epoch,
              "lr": lr, "alpha": alpha, "time_s": time.time() - t0,
              "data_wait_s": data_wait / max(1, steps_in_window), **_scalars(out)}
    if tr.dist.is_main:
        append_jsonl(tr.run_dir / METRICS, record)
    if tr.tracker is not None:
        tr.tracker.log(record, tr.state.global_step, prefix="train/")
    return record


def _check_guard(tr: Trainer) -> None:
    """Raise ``Diverged`` if a step so far was non-finite (one host sync)."""
    if tr.guard is not None:
        tr.guard.check(checkpoint_path(tr.run_dir) if tr.saved_step is not None else None,
                       tr.saved_step)


def _save(tr: Trainer) -> None:
    _check_guard(tr)  # never overwrite the last good checkpoint with a poisoned state
    # Collectives, so every rank calls them: the sharded (ZeRO) optimizer state and every
    # rank's RNG states are gathered on rank 0, which writes the file.
    consolidate(tr.optimizer)
    rng = rank_rng_states(tr.objective)
    if tr.dist.is_main:
        save_checkpoint(tr.run_dir, tr.objective, tr.optimizer, tr.state, to_dict(tr.cfg),
                        tr.config_hash, tr.data.position(tr.state.epoch, tr.state.batch),
                        world_size=tr.dist.world_size, rng=rng)
    tr.saved_step = tr.state.global_step


def _watch(tr: Trainer, out: StepOutput, lr: float) -> None:
    """Fold this step's losses and gradient norm into the divergence guard (no sync)."""
    values = {**out.losses, "total": out.loss, "grad_norm": out.stats["grad_norm"]}
    if tr.guard is None:
        tr.guard = DivergenceGuard(list(values), tr.dist.device)
    tr.guard.update(tr.state.global_step, values, lr)


def run_step(tr: Trainer, batch: dict[str, Any]) -> tuple[StepOutput, StepSchedule]:
    """One training step at the trainer's position (schedule, learning rate, the step) and
    the position advanced; shared by the trainer and the diagnostics benchmarks."""
    st, cfg = tr.state, tr.cfg
    sched = step_schedule(tr.schedule, cfg.loss, cfg.model.queue_warmup_steps, st.epoch,
                          st.batch, st.global_step, tr.data.batches_per_epoch)
    set_lr(tr.optimizer, sched.lr)
    out = train_step(tr.model, tr.optimizer, move_batch(batch, tr.dist.device), sched.alpha,
                     cfg.train.precision, enqueue=sched.enqueue, hardness=sched.hardness,
                     grad_clip=cfg.train.grad_clip)
    st.batch, st.global_step = st.batch + 1, st.global_step + 1
    return out, sched


def _run_epoch(tr: Trainer, summary: TrainSummary, bar: tqdm, t0: float,
               stop_at: int) -> bool:
    """Train until the epoch ends or ``stop_at`` steps are done; True when training must stop."""
    cfg, st = tr.cfg, tr.state
    tr.data.set_epoch(st.epoch, start_batch=st.batch)
    wait, window, tick = 0.0, 0, time.perf_counter()
    for batch in tr.data.loader:
        wait += time.perf_counter() - tick
        out, sched = run_step(tr, batch)
        lr, alpha, window = sched.lr, sched.alpha, window + 1
        _watch(tr, out, lr)
        bar.update(1)
        if st.global_step % cfg.train.log_every == 0 or st.global_step == stop_at or \
                not summary.first_losses:
            _check_guard(tr)  # a diverged step is reported, never logged as numbers
            rec = _log_step(tr, out, lr, alpha, t0, wait, window)
            summary.first_losses = summary.first_losses or rec
            summary.last_losses, wait, window = rec, 0.0, 0
            bar.set_postfix(loss=f"{rec['loss/total']:.3f}")
        if st.global_step % cfg.train.checkpoint_every == 0 and st.global_step < stop_at:
            _save(tr)
        if st.global_step >= stop_at:
            return True
        tick = time.perf_counter()
    st.epoch, st.batch = st.epoch + 1, 0
    return False


def train(cfg: ExperimentConfig, run_dir: str | Path, device: str | None = None,
          identity: dict[str, Any] | None = None,
          progress: bool = True) -> tuple[TrainSummary, Trainer]:
    """Train (or resume) ``cfg`` in ``run_dir``; returns the summary and the trainer state."""
    tr = setup(cfg, Path(run_dir), device, identity)
    resumed = tr.resumed_from
    if resumed is not None and tr.dist.is_main:
        # What an interrupted attempt logged after its checkpoint is logged again now; the line
        # at the checkpoint's step stays only if an uninterrupted run logs that step too.
        logged = resumed % cfg.train.log_every == 0 or resumed in (1, tr.total_steps)
        keep_lines_until(tr.run_dir / METRICS, resumed, keep_step_line=logged)
    tr.tracker = make_tracker(tr.run_dir, cfg.train.log_to, tr.dist.is_main, identity,
                              to_dict(cfg), purge_step=None if resumed is None else resumed + 1)
    tr.model.train()
    total = tr.total_steps
    summary = TrainSummary(tr.run_dir, tr.state.global_step, tr.resumed_from)
    if resumed is not None:  # the run's first logged row, as an uninterrupted run has it
        summary.first_losses = first_train_row(tr.run_dir / METRICS)
    t0 = time.time()
    bar = tqdm(total=total, initial=tr.state.global_step, disable=not (progress and
               tr.dist.is_main), desc=f"train {tr.run_dir.name}", dynamic_ncols=True)
    try:
        while tr.state.global_step < total and tr.state.epoch < cfg.train.epochs:
            if _run_epoch(tr, summary, bar, t0, total):
                break
        bar.close()
        _save(tr)
    finally:
        tr.tracker.close()
    summary.steps, summary.wall_s = tr.state.global_step, time.time() - t0
    return summary, tr
