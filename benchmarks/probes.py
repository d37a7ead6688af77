"""Measurements outside the interleaved timing loop: peak memory and the data-loading wait.

Memory is measured in a fresh process per variant (``python -m benchmarks.bench_memory``),
started by ``probe_memory``: during timing every variant is resident, so the timing process
cannot tell one variant's peak from another's. The data wait runs the trainer's loop over a
real ``DataLoader``, which the timing loop deliberately leaves out.

``bench_memory`` is started as a subprocess, never imported here, so the two modules do not
import each other.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import REFERENCE, Case, Variant, experiment_config
from benchmarks.measure import (
    ALPHA,
    REPO_ROOT,
    describe_failure,
    ratio,
    spread,
    synchronize,
)
from model.build import build_objective
from model.config.experiment import load_experiment
from model.config.schema import ExperimentConfig
from model.engine.optim import build_optimizer
from model.engine.step import train_step

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- memory
def probe_memory(case: Case, variant: Variant, device: torch.device, suite_path: Path,
                 steps: int, seed: int, threads: int = 1, timeout_s: float = 1800.0
                 ) -> dict[str, Any]:
    """Peak memory of one variant measured in a fresh process (``benchmarks.bench_memory``).

    A fresh process keeps the other variants' weights, the allocator's cache and Python's heap
    out of the number. One intra-op thread by default: the step's tensors do not depend on the
    thread count, and a single thread keeps every allocation in one malloc arena (with two,
    repeated CPU probes of one variant varied by ~5%). The child prints one JSON line; a crash
    without it becomes a row status.
    """
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--cases", str(suite_path),
           "--preset", case.model.name, "--batch", str(case.batch), "--precision",
           case.precision, "--variant", variant.name, "--device", str(device),
           "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"mem_status": "error", "mem_detail": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    # SIGKILL is what the kernel's OOM killer sends.
    status = "oom" if proc.returncode in (-9, 137) else "error"
    return {"mem_status": status,
            "mem_detail": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}


def add_memory(rows: list[dict[str, Any]], case: Case, device: torch.device, suite_path: Path,
               steps: int, seed: int) -> None:
    """Fill the memory columns of ``rows`` (one fresh process per variant)."""
    by_name = {v.name: v for v in case.variants}
    for row in rows:
        result = probe_memory(case, by_name[row["variant"]], device, suite_path, steps, seed)
        row.update(result)
        log.info("%s %s: memory %s %.1f MiB", case.name, row["variant"],
                 result.get("mem_status"), result.get("peak_mem_mib", math.nan))
    ref = next((r for r in rows if r["variant"] == REFERENCE), {})
    for row in rows:
        row["mem_ratio"] = ratio(row.get("peak_mem_mib", math.nan),
                                 ref.get("peak_mem_mib", math.nan))


# --------------------------------------------------------------------------- data wait
def data_wait_config(case: Case, variant: Variant, cache_dir: Path | None,
                     extra: Sequence[str] = ()) -> ExperimentConfig:
    """The variant with the real synthetic-data pipeline: images at the model's size and the
    tokenizer's vocabulary; the generated set is cached under ``cache_dir`` (config default
    when None). ``extra``: further ``key=value`` items (data format, loader workers)."""
    size = experiment_config(case, variant).model.vision.image_size
    sets = [*case.model.sets, *variant.sets, f"train.batch_size={case.batch}",
            "model.text.vocab_size=null", f"data.synthetic.image_size={size}", *extra]
    if cache_dir is not None:
        sets.append(f"data.cache_dir={cache_dir}")
    return load_experiment(preset=case.model.preset, sets=sets)


def measure_data_wait(case: Case, variant: Variant, device: torch.device, steps: int,
                      seed: int, cache_dir: Path | None = None, extra: Sequence[str] = ()
                      ) -> dict[str, Any]:
    """Seconds per step that training waits for the next batch of a real DataLoader.

    The loop is the trainer's: ``next(loader)`` (timed: the wait), then ``train_step`` on the
    moved batch, so worker prefetching overlaps with compute exactly as in training (on a CPU
    the workers also compete with the step for the same cores). The first batch, which
    includes worker start-up, is not counted. Only presets with synthetic data are measured.
    """
    # Imported here: the data stack (PIL, torchvision transforms) is only needed for this.
    from model.engine.data import build_tokenizer, build_train_data, resolve_sources, special_ids
    from model.engine.distributed import DistInfo
    from model.engine.step import move_batch

    cfg = data_wait_config(case, variant, cache_dir, extra)
    if cfg.data.kind != "synthetic":
        return {"data_status": "skipped", "data_detail": "preset has no synthetic data"}
    sources = resolve_sources(cfg)
    tokenizer = build_tokenizer(sources)
    data = build_train_data(cfg, sources, tokenizer, DistInfo(0, 1, 0, device))
    torch.manual_seed(seed)
    objective = build_objective(cfg, special_ids(tokenizer), seed=seed).to(device)
    optimizer = build_optimizer(objective, cfg.train)
    waits, computes = [], []
    batches = iter(data.loader)
    for i in range(min(steps + 1, data.batches_per_epoch)):
        start = time.perf_counter()
        batch = move_batch(next(batches), device)
        synchronize(device)
        got = time.perf_counter()
        train_step(objective, optimizer, batch, ALPHA, case.precision)
        synchronize(device)
        if i > 0:
            waits.append(got - start)
            computes.append(time.perf_counter() - got)
    wait, wait_p10, wait_p90 = spread(waits)
    return {"data_status": "ok", "data_detail": "", "data_format": cfg.data.format,
            "num_workers": cfg.data.num_workers,
            "data_steps": len(waits), "wait_s_median": wait, "wait_s_p10": wait_p10,
            "wait_s_p90": wait_p90, "step_s_median": spread(computes)[0],
            "wait_fraction": ratio(sum(waits), sum(waits) + sum(computes))}


def data_wait_rows(case: Case, device: torch.device, steps: int, seed: int,
                   formats: Sequence[str] = ("json",), workers: Sequence[int | None] = (None,)
                   ) -> list[dict[str, Any]]:
    """Data wait of ALBEF (one standard view) and Ours (two views): the two loader workloads,
    for each data format (ALBEF JSON + image files, or tar shards) and loader worker count
    (None: the preset's)."""
    rows = []
    for variant in (v for v in case.variants if v.name in ("albef", "ours")):
        for fmt, n in itertools.product(formats, workers):
            extra = [f"data.format={fmt}", *([f"data.num_workers={n}"] if n is not None else [])]
            try:
                result = measure_data_wait(case, variant, device, steps, seed, extra=extra)
            except (RuntimeError, OSError, ValueError) as exc:  # e.g. OOM, unreadable data
                status, detail = describe_failure(exc)
                result = {"data_status": status, "data_detail": detail, "data_format": fmt}
            rows.append({"case": case.name, "variant": variant.name, **result})
            log.info("%s %s %s: data wait %s", case.name, variant.name, fmt, result)
    return rows
