"""Per-iteration cost of ALBEF vs SoftMask++ and its components (the paper's cost table).

What is timed is the training step the trainer runs, ``model.engine.step.train_step`` over the
one ``Objective``; every variant is a list of config overrides (``benchmarks/cases.yaml``), so
nothing here re-implements the model. Method (design-notes §8):

* synthetic batches built once per case, identical for every variant (data loading excluded);
* objective + optimizer built once per variant from the same seed;
* warm-up rounds, then timed rounds, **interleaved**: round i runs one step of every variant
  (start position rotated each round) before round i+1, so machine noise hits all variants
  alike; the device is synchronised before every clock read;
* median, p10/p90 and samples/s per variant; the ratio to ALBEF both as the median of per-round
  ratios (paired) and as the ratio of medians;
* FLOPs of one step (forward + backward) from ``FlopCounterMode`` and the model FLOPs
  utilisation against a matrix-multiply peak measured in the same run;
* peak memory in a fresh process per variant (``benchmarks.bench_memory``).

CLI: ``python -m benchmarks.bench_step --device cpu --preset tiny --out results/benchmarks/``.
Jobs call ``run_benchmark(cases, device, out_dir, iters, warmup)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import Tensor, nn
from torch.utils import flop_counter

from model.build import build_objective
from model.config.experiment import load_experiment
from model.config.schema import ExperimentConfig
from model.engine.optim import build_optimizer
from model.engine.step import train_step
from model.text_masking import SpecialIds

log = logging.getLogger(__name__)

DEFAULT_CASES = Path(__file__).with_name("cases.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "albef"
ALPHA = 0.4  # ALBEF's distillation weight after its ramp; it does not change the cost
MAIN_ROWS = ("albef", "ours_wo_softmask", "ours")


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Variant:
    """One row of the cost table: a name, its display label and its config overrides."""

    name: str
    label: str
    sets: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model size: preset + overrides, and the token ids that stand in for a tokenizer."""

    name: str
    preset: str
    sets: tuple[str, ...]
    special: SpecialIds


@dataclass(frozen=True)
class TextSpec:
    """Synthetic caption lengths: [CLS] + ~N(mean, std) tokens in [min_len, max_len]."""

    max_len: int = 25
    mean_len: float = 13.0
    std_len: float = 4.0
    min_len: int = 5


@dataclass(frozen=True)
class Case:
    """One (model, batch, precision) cell and the variants compared in it."""

    model: ModelSpec
    batch: int
    precision: str
    variants: tuple[Variant, ...]
    text: TextSpec = field(default_factory=TextSpec)

    @property
    def name(self) -> str:
        """e.g. ``tiny-b32-fp32``."""
        return f"{self.model.name}-b{self.batch}-{self.precision}"


@dataclass(frozen=True)
class Suite:
    """Everything ``cases.yaml`` holds, parsed."""

    variants: dict[str, Variant]
    models: dict[str, ModelSpec]
    grid: dict[str, list[dict[str, Any]]]
    text: TextSpec
    peak: dict[str, dict[str, int]]
    paper: dict[str, Any]
    planning: dict[str, float]
    path: Path = DEFAULT_CASES


def load_suite(path: str | Path = DEFAULT_CASES) -> Suite:
    """Parse ``cases.yaml`` (variants, models, case grid, paper numbers, planning)."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    variants = {k: Variant(k, v["label"], tuple(v["set"])) for k, v in raw["variants"].items()}
    if REFERENCE not in variants:
        raise ValueError(f"{path}: the variants must include the reference '{REFERENCE}'")
    models = {
        k: ModelSpec(k, v["preset"], tuple(v["set"]),
                     SpecialIds(vocab_size=int(v["vocab_size"]), **v["special"]))
        for k, v in raw["models"].items()
    }
    # YAML 1.1 reads "4.0e6" as a string: coerce the planning numbers explicitly.
    planning = {k: float(v) for k, v in raw["planning"].items()}
    return Suite(variants, models, raw["cases"], TextSpec(**raw["text"]), raw["peak"],
                 raw["paper"], planning, Path(path))


def _pick(available: Sequence[Any], wanted: Sequence[Any] | None, what: str) -> list[Any]:
    """``wanted`` in ``available`` order (all when None); unknown names raise."""
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {list(available)}")
    return [a for a in available if a in wanted]


def select_cases(suite: Suite, device_kind: str, presets: Sequence[str] | None = None,
                 batches: Sequence[int] | None = None, precisions: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None) -> list[Case]:
    """Expand the grid of ``device_kind`` ('cpu' or 'cuda'), filtered by the given values.

    A batch or preset given explicitly but absent from the grid is still run (with the
    grid's precisions), so one-off sizes need no YAML edit.
    """
    if device_kind not in suite.grid:
        raise ValueError(f"no cases for device kind {device_kind!r}; have {list(suite.grid)}")
    if device_kind != "cuda" and precisions is not None and "bf16" in precisions:
        raise ValueError("bf16 autocast is CUDA-only (model/engine/step.py); use fp32 on CPU")
    names = _pick(list(suite.variants), variants, "variants")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # every ratio needs the reference in the same rounds
    chosen = tuple(suite.variants[n] for n in names)
    cells: list[Case] = []
    for entry in suite.grid[device_kind]:
        if presets is not None and entry["model"] not in presets:
            continue
        for batch in (batches or entry["batch"]):
            for precision in _pick(entry["precision"], precisions, "precisions"):
                cells.append(Case(suite.models[entry["model"]], int(batch), precision,
                                  chosen, suite.text))
    if presets is not None and not cells:
        unknown = [p for p in presets if p not in suite.models]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; available: {list(suite.models)}")
        cells = [Case(suite.models[p], int(b), pr, chosen, suite.text)
                 for p in presets for b in (batches or [16]) for pr in (precisions or ["fp32"])]
    return cells


def experiment_config(case: Case, variant: Variant) -> ExperimentConfig:
    """The resolved config of one variant in one case (batch and precision included)."""
    sets = [*case.model.sets, *variant.sets, f"train.batch_size={case.batch}",
            f"train.precision={case.precision}"]
    return load_experiment(preset=case.model.preset, sets=sets)


def build_variant(case: Case, variant: Variant, device: torch.device, seed: int
                  ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Objective + optimizer exactly as training builds them; same seed for every variant."""
    cfg = experiment_config(case, variant)
    torch.manual_seed(seed)  # identical initial weights across variants
    objective = build_objective(cfg, case.model.special, seed=seed).to(device)
    objective.train()
    return objective, build_optimizer(objective, cfg.train)


def make_batch(case: Case, device: torch.device, seed: int) -> dict[str, Tensor]:
    """A synthetic pre-training batch: two image views and padded [CLS]-first captions.

    Lengths follow ``case.text`` and the batch is padded to its longest caption, as ALBEF's
    tokenizer call (padding='longest', max_length=25) does; there is no [SEP].
    """
    cfg = experiment_config(case, case.variants[0])
    size, b, t, sp = cfg.model.vision.image_size, case.batch, case.text, case.model.special
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(b, generator=gen) * t.std_len + t.mean_len).round()
    lengths = lengths.clamp(t.min_len, t.max_len).long()
    width = int(lengths.max())
    first_word = max(sp.pad, sp.cls, sp.mask) + 1  # word ids never collide with specials
    ids = torch.randint(first_word, sp.vocab_size, (b, width), generator=gen)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.where(attention.bool(), ids, torch.full_like(ids, sp.pad))
    ids[:, 0] = sp.cls
    batch = {
        "image": torch.randn(b, 3, size, size, generator=gen),
        "image_strong": torch.randn(b, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": attention,
    }
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def failure_status(exc: BaseException) -> str:
    """'oom' for allocator failures (CUDA or CPU), 'error' for anything else."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(exc).lower()
    return "oom" if ("out of memory" in text or "can't allocate memory" in text) else "error"


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(status, detail) as plain strings: holding on to ``exc`` would keep its traceback's
    frames, and with them the failed step's tensors, alive."""
    return failure_status(exc), f"{type(exc).__name__}: {exc}"[:300]


@dataclass
class Runner:
    """One variant's objective/optimizer and what was measured for it."""

    variant: Variant
    objective: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    flops: float = math.nan
    status: str = "ok"
    detail: str = ""

    def fail(self, failure: tuple[str, str], device: torch.device) -> None:
        """Record the failure and release the variant's memory; the others keep running.

        Called after the ``except`` block has ended, so that the failed step's tensors,
        referenced by the exception's traceback, can actually be freed.
        """
        self.status, self.detail = failure
        self.objective = self.optimizer = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("%s: %s", self.variant.name, self.detail)


class PhaseClock(nn.Module):
    """Wraps an objective so that ``train_step``'s phases can be timed without copying it.

    The forward end is read after the wrapped forward; the backward end and the optimizer end
    are read by optimizer step hooks. Each read synchronises the device, which removes
    CPU/GPU overlap: that is why the breakdown is a separate pass from the headline timing.
    """

    def __init__(self, objective: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.objective = objective
        self.device = device
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Clock read after the device has finished the work queued so far."""
        synchronize(self.device)
        self.marks[name] = time.perf_counter()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped objective's forward, then a clock read."""
        # Pass whatever train_step hands the objective (batch, alpha, enqueue, ...) through.
        out = self.objective(*args, **kwargs)
        self.mark("forward")
        return out


def timed_step(runner: Runner, batch: dict[str, Tensor], precision: str,
               device: torch.device, breakdown: bool = False) -> None:
    """One ``train_step`` between two synchronised clock reads; failures mark the runner."""
    assert runner.objective is not None and runner.optimizer is not None
    module, hooks = runner.objective, []
    if breakdown:
        module = PhaseClock(runner.objective, device)
        hooks = [runner.optimizer.register_step_pre_hook(lambda *_: module.mark("backward")),
                 runner.optimizer.register_step_post_hook(lambda *_: module.mark("optimizer"))]
    failure = None
    try:
        synchronize(device)
        start = time.perf_counter()
        train_step(module, runner.optimizer, batch, ALPHA, precision)
        synchronize(device)
        elapsed = time.perf_counter() - start
    except RuntimeError as exc:  # includes torch.cuda.OutOfMemoryError
        failure = describe_failure(exc)
    finally:
        for handle in hooks:
            handle.remove()
    if failure is not None:
        runner.fail(failure, device)
        return
    # Free the gradients now (outside the clock; train_step's own zero_grad then has nothing
    # to do): otherwise every resident variant would hold a full set between its steps.
    runner.optimizer.zero_grad(set_to_none=True)
    if breakdown:
        m = module.marks
        runner.phases.append({"forward_s": m["forward"] - start,
                              "backward_s": m["backward"] - m["forward"],
                              "optimizer_s": m["optimizer"] - m["backward"]})
    else:
        runner.times.append(elapsed)


def run_rounds(runners: Sequence[Runner], batch: dict[str, Tensor], precision: str,
               device: torch.device, rounds: int, record: bool = True,
               breakdown: bool = False) -> None:
    """Round-robin: step i of every live variant before step i+1 of any.

    The start position rotates each round so that no variant always follows the same one
    (cache and allocator state left by the previous step would otherwise bias it).
    """
    for i in range(rounds):
        shift = i % len(runners)
        for runner in [*runners[shift:], *runners[:shift]]:
            if runner.status != "ok":
                continue
            n_times, n_phases = len(runner.times), len(runner.phases)
            timed_step(runner, batch, precision, device, breakdown)
            if not record:  # warm-up: keep nothing
                del runner.times[n_times:], runner.phases[n_phases:]


# --------------------------------------------------------------------------- work and limit
def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flops(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                             **kw: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(g, q, k, v)


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas torch's counter lacks: the CPU fused attention kernels (counted as 0 otherwise).

    CUDA's flash/efficient/cuDNN attention kernels are already registered by torch.
    """
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_sdpa_backward_flops)
    return mapping


def count_step_flops(runner: Runner, batch: dict[str, Tensor], precision: str,
                     device: torch.device) -> None:
    """FLOPs of one training step (forward incl. Grad-CAM pass, backward; matmul-class ops).

    The optimizer's element-wise update is not counted (no formula), which is the usual
    convention for model FLOPs. The step really runs, so it doubles as a warm-up step.
    """
    assert runner.objective is not None and runner.optimizer is not None
    failure = None
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as fc:
            train_step(runner.objective, runner.optimizer, batch, ALPHA, precision)
        runner.flops = float(fc.get_total_flops())
    except RuntimeError as exc:
        failure = describe_failure(exc)
    if failure is not None:
        runner.fail(failure, device)
    else:
        runner.optimizer.zero_grad(set_to_none=True)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int
                        ) -> dict[str, float]:
    """Achieved FLOP/s of a square ``size``^3 matmul on this device now (the MFU denominator).

    Median over ``repeats`` synchronised runs after two warm-ups; fp32 follows the process's
    ``torch.get_float32_matmul_precision()`` (TF32 on CUDA only if the user enabled it).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {"peak_flops_per_s": flops / float(np.median(times)),
            "peak_best_flops_per_s": flops / min(times), "peak_size": float(size)}


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


# --------------------------------------------------------------------------- data wait
def data_wait_config(case: Case, variant: Variant, cache_dir: Path | None) -> ExperimentConfig:
    """The variant with the real synthetic-data pipeline: images at the model's size and the
    tokenizer's vocabulary; the generated set is cached under ``cache_dir`` (config default
    when None)."""
    size = experiment_config(case, variant).model.vision.image_size
    sets = [*case.model.sets, *variant.sets, f"train.batch_size={case.batch}",
            "model.text.vocab_size=null", f"data.synthetic.image_size={size}"]
    if cache_dir is not None:
        sets.append(f"data.cache_dir={cache_dir}")
    return load_experiment(preset=case.model.preset, sets=sets)


def measure_data_wait(case: Case, variant: Variant, device: torch.device, steps: int,
                      seed: int, cache_dir: Path | None = None) -> dict[str, Any]:
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

    cfg = data_wait_config(case, variant, cache_dir)
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
    for i in range(min(steps + 1, data.sampler.batches_per_epoch)):
        start = time.perf_counter()
        batch = move_batch(next(batches), device)
        synchronize(device)
        got = time.perf_counter()
        train_step(objective, optimizer, batch, ALPHA, case.precision)
        synchronize(device)
        if i > 0:
            waits.append(got - start)
            computes.append(time.perf_counter() - got)
    wait, wait_p10, wait_p90 = _spread(waits)
    return {"data_status": "ok", "data_detail": "", "num_workers": cfg.data.num_workers,
            "data_steps": len(waits), "wait_s_median": wait, "wait_s_p10": wait_p10,
            "wait_s_p90": wait_p90, "step_s_median": _spread(computes)[0],
            "wait_fraction": ratio(sum(waits), sum(waits) + sum(computes))}


def data_wait_rows(case: Case, device: torch.device, steps: int, seed: int
                   ) -> list[dict[str, Any]]:
    """Data wait of ALBEF (one standard view) and Ours (two views): the two loader workloads."""
    rows = []
    for variant in (v for v in case.variants if v.name in ("albef", "ours")):
        try:
            result = measure_data_wait(case, variant, device, steps, seed)
        except (RuntimeError, OSError, ValueError) as exc:  # e.g. OOM, unreadable data
            status, detail = describe_failure(exc)
            result = {"data_status": status, "data_detail": detail}
        rows.append({"case": case.name, "variant": variant.name, **result})
        log.info("%s %s: data wait %s", case.name, variant.name, result)
    return rows


# --------------------------------------------------------------------------- one case
def run_case(case: Case, device: torch.device, iters: int, warmup: int, seed: int = 0,
             breakdown: bool = False, flops: bool = True) -> list[Runner]:
    """Build every variant once, then count FLOPs, warm up and time them interleaved."""
    runners = [Runner(v) for v in case.variants]
    for runner in runners:
        failure = None
        try:
            runner.objective, runner.optimizer = build_variant(case, runner.variant, device, seed)
        except RuntimeError as exc:
            failure = describe_failure(exc)
        if failure is not None:
            runner.fail(failure, device)
    batch = make_batch(case, device, seed)
    if flops:
        for runner in runners:
            if runner.status == "ok":
                count_step_flops(runner, batch, case.precision, device)
    log.info("%s: %d warm-up + %d timed rounds over %d variants", case.name, warmup, iters,
             len(runners))
    run_rounds(runners, batch, case.precision, device, warmup, record=False)
    run_rounds(runners, batch, case.precision, device, iters)
    if breakdown:  # half as many rounds: phase medians need less precision than the total
        run_rounds(runners, batch, case.precision, device, max(3, iters // 2), breakdown=True)
    for runner in runners:  # free before the next case and before the memory probes
        runner.objective = runner.optimizer = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runners


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, p10, p90); NaNs when empty."""
    if not values:
        return math.nan, math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90))


def ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is missing or zero (a failed variant)."""
    return num / den if den and not math.isnan(den) else math.nan


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-round ratios t_variant[i] / t_reference[i] over the rounds both completed."""
    n = min(len(times), len(reference))
    return [times[i] / reference[i] for i in range(n)]


def summarise(case: Case, runners: Sequence[Runner], peak: dict[str, float]
              ) -> list[dict[str, Any]]:
    """One raw row per variant: spread of sec/it, paired ratios, FLOPs, MFU, breakdown."""
    ref = next(r for r in runners if r.variant.name == REFERENCE)
    ref_median = _spread(ref.times)[0]
    rows = []
    for r in runners:
        med, p10, p90 = _spread(r.times)
        ratio_med, ratio_p10, ratio_p90 = _spread(paired_ratios(r.times, ref.times))
        achieved = ratio(r.flops, med)
        phases = {k: _spread([p[k] for p in r.phases])[0]
                  for k in ("forward_s", "backward_s", "optimizer_s")}
        rows.append({
            "case": case.name, "variant": r.variant.name, "label": r.variant.label,
            "preset": case.model.name, "batch": case.batch, "precision": case.precision,
            "iters": len(r.times), "sec_it_median": med, "sec_it_p10": p10, "sec_it_p90": p90,
            "sec_it_mean": float(np.mean(r.times)) if r.times else math.nan,
            "samples_per_s": ratio(case.batch, med),
            "ratio_paired_median": ratio_med, "ratio_paired_p10": ratio_p10,
            "ratio_paired_p90": ratio_p90, "ratio_of_medians": ratio(med, ref_median),
            "flops": r.flops, "achieved_flops_per_s": achieved,
            "mfu": ratio(achieved, peak["peak_flops_per_s"]), **peak, **phases,
            "status": r.status, "detail": r.detail,
        })
    return rows


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


# --------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform fallback elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform  # only needed off Linux

    return platform.processor() or platform.machine()


def git_sha() -> str:
    """Short commit of the working tree ('-dirty' with local changes); 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and settings that a timing depends on (stored with every row)."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_sha": git_sha(),
    }


# --------------------------------------------------------------------------- tables
# Raw column -> (table header, number format). Order = column order of the cost table.
COST_COLUMNS: dict[str, tuple[str, str]] = {
    "sec_it_median": ("time (s/it)", ".4f"),
    "sec_it_p10": ("p10 (s/it)", ".4f"),
    "sec_it_p90": ("p90 (s/it)", ".4f"),
    "ratio_paired_median": ("time x ALBEF", ".3f"),
    "paper_time_ratio": ("time x ALBEF (paper)", ".3f"),
    "peak_mem_mib": ("memory (MiB)", ".1f"),
    "mem_ratio": ("memory x ALBEF", ".3f"),
    "paper_mem_ratio": ("memory x ALBEF (paper)", ".3f"),
    "gflops": ("GFLOP/step", ".2f"),
    "flops_ratio": ("GFLOP x ALBEF", ".3f"),
    "mfu_pct": ("MFU (%)", ".1f"),
    "status": ("status", ""),
}
MEMORY_KINDS = {
    "cpu_rss_growth": "peak RSS growth over the built model, fresh process",
    "cuda_max_allocated": "torch.cuda.max_memory_allocated, fresh process",
}


def paper_ratios(paper: dict[str, Any]) -> pd.DataFrame:
    """The paper's time and memory ratios to ALBEF, indexed by variant."""
    time_s, mem_gb = pd.Series(paper["time_s"]), pd.Series(paper["memory_gb"])
    return pd.DataFrame({"paper_time_ratio": time_s / time_s[REFERENCE],
                         "paper_mem_ratio": mem_gb / mem_gb[REFERENCE]})


def row_order(variants: Sequence[str]) -> list[str]:
    """The paper's three rows first, then the single components in cases.yaml order."""
    return [v for v in MAIN_ROWS if v in variants] + [v for v in variants if v not in MAIN_ROWS]


def cost_table(rows: pd.DataFrame, paper: dict[str, Any]) -> pd.DataFrame:
    """The paper-style table of one case: numeric columns, 'Method' labels, paper ratios."""
    frame = rows.set_index("variant").join(paper_ratios(paper), how="left")
    frame = frame.loc[row_order(list(frame.index))]
    frame["gflops"] = frame["flops"] / 1e9
    # Noise-free companion of the time ratio: on these models time tracks FLOPs closely.
    frame["flops_ratio"] = frame["flops"] / frame.at[REFERENCE, "flops"]
    frame["mfu_pct"] = frame["mfu"] * 100
    for col in ("peak_mem_mib", "mem_ratio"):
        if col not in frame:
            frame[col] = math.nan
    table = frame[list(COST_COLUMNS)].rename(columns={k: h for k, (h, _) in COST_COLUMNS.items()})
    table.insert(0, "Method", frame["label"].to_numpy())
    return table.reset_index(drop=True)


# LaTeX specials and their text-mode form (Styler escapes cells, not captions).
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _latex_text(text: str) -> str:
    """Escape LaTeX specials in a caption, one character at a time (no double escaping)."""
    return "".join(_LATEX_ESCAPES.get(char, char) for char in text)


def render_markdown(table: pd.DataFrame, formats: dict[str, str], caption: str) -> str:
    """Markdown via DataFrame.to_markdown; missing values show as an em dash."""
    floatfmt = [formats.get(c) or "g" for c in table.columns]
    body = table.astype(object).where(table.notna(), None).to_markdown(
        index=False, floatfmt=floatfmt, missingval="—")
    return f"{caption}\n\n{body}\n"


def render_latex(table: pd.DataFrame, formats: dict[str, str], caption: str, label: str) -> str:
    """LaTeX via Styler.to_latex (booktabs rules); cells and headers escaped."""
    styler = table.style.hide(axis="index")
    styler = styler.format({c: "{:" + f + "}" for c, f in formats.items() if c in table and f},
                           na_rep="---")
    text_cols = [c for c in table.columns if table[c].dtype == object]
    styler = styler.format(escape="latex", subset=text_cols, na_rep="---")
    styler = styler.format_index(escape="latex", axis="columns")
    return styler.to_latex(caption=_latex_text(caption), label=label, hrules=True,
                           position="htbp", position_float="centering") + "\n"


def caption_line(rows: pd.DataFrame, env: dict[str, Any]) -> str:
    """Device, software, method and memory definition of one case, in one line."""
    first = rows.iloc[0]
    mem_kind = MEMORY_KINDS.get(str(rows.get("mem_kind", pd.Series([""])).iloc[0]), "not measured")
    cuda = f", CUDA {env['cuda_version']}" if env["device"] == "cuda" else ""
    n_peaks = first.get("peak_measurements", math.nan)
    peak_source = (f"the fastest of {int(n_peaks)} timings in this run of a"
                   if not pd.isna(n_peaks) else "a measured")
    return (f"{first['case']} on {env['device_name']} ({env['threads']} threads): "
            f"median of {int(rows['iters'].max())} interleaved steps; time x ALBEF = median "
            f"of per-round ratios; memory = {mem_kind}; MFU vs {peak_source} "
            f"{int(first['peak_size'])}^3 matmul at {first['peak_flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s; torch {env['torch_version']}{cuda}, fp32 matmul precision "
            f"{env['float32_matmul_precision']}, git {env['git_sha']}.")


def planning_table(df: pd.DataFrame, planning: dict[str, float], device: str) -> pd.DataFrame:
    """Samples/s and projected single-device hours for the paper's schedule (per variant)."""
    samples = float(planning["samples_per_epoch"]) * float(planning["epochs"])
    sec_per_sample = df["sec_it_median"] / df["batch"]
    return pd.DataFrame({
        "case": df["case"], "Method": df["label"], "samples/s": df["samples_per_s"],
        "ms/sample": sec_per_sample * 1e3,
        f"{device}-hours for {samples:.2g} samples": sec_per_sample * samples / 3600,
        f"{device}-days": sec_per_sample * samples / 86400,
    })


def breakdown_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Forward / backward / optimizer medians of one case and SoftMask's extra cost."""
    frame = rows.set_index("variant").loc[row_order(list(rows["variant"]))]
    table = pd.DataFrame({"Method": frame["label"], "forward (s)": frame["forward_s"],
                          "backward (s)": frame["backward_s"],
                          "optimizer (s)": frame["optimizer_s"]})
    note = ""
    if {"ours", "ours_wo_softmask"} <= set(frame.index):
        d_fwd = frame.at["ours", "forward_s"] - frame.at["ours_wo_softmask", "forward_s"]
        d_bwd = frame.at["ours", "backward_s"] - frame.at["ours_wo_softmask", "backward_s"]
        note = (f" SoftMask (Grad-CAM pass + masked-pair fusion), Ours minus Ours w/o SoftMask: "
                f"forward {d_fwd * 1e3:+.1f} ms, backward {d_bwd * 1e3:+.1f} ms.")
    return table.reset_index(drop=True), note


# --------------------------------------------------------------------------- outputs
def _formats(columns: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {header: fmt for header, fmt in columns.values()}


def write_cost_tables(df: pd.DataFrame, suite: Suite, env: dict[str, Any], out: Path) -> None:
    """cost_table.{md,tex,csv} and, with phases, breakdown.{md,csv}: one section per case."""
    md, tex, tables, breakdowns, notes = [], [], [], [], []
    for case_name, rows in df.groupby("case", sort=False):
        table = cost_table(rows, suite.paper)
        caption = caption_line(rows, env)
        md.append(f"### {case_name}\n\n" + render_markdown(table, _formats(COST_COLUMNS),
                                                            caption))
        tex.append(render_latex(table, _formats(COST_COLUMNS), caption, f"tab:cost-{case_name}"))
        tables.append(table.assign(case=case_name))
        if rows["forward_s"].notna().any():
            bd, note = breakdown_table(rows)
            breakdowns.append(bd.assign(case=case_name))
            notes.append(f"### {case_name}\n\n" + render_markdown(
                bd, dict.fromkeys(bd.columns[1:], ".4f"), caption + note))
    (out / "cost_table.md").write_text("\n".join(md), encoding="utf-8")
    (out / "cost_table.tex").write_text("\n".join(tex), encoding="utf-8")
    pd.concat(tables).to_csv(out / "cost_table.csv", index=False)
    if breakdowns:
        (out / "breakdown.md").write_text("\n".join(notes), encoding="utf-8")
        pd.concat(breakdowns).to_csv(out / "breakdown.csv", index=False)


def write_planning(df: pd.DataFrame, suite: Suite, env: dict[str, Any], out: Path) -> None:
    """planning.{md,csv}; a CPU projection is labelled as a formula demonstration."""
    plan = planning_table(df, suite.planning, "GPU" if env["device"] == "cuda" else "CPU")
    plan.to_csv(out / "planning.csv", index=False)
    warning = ("" if env["device"] == "cuda" else
               " Measured on CPU: this projection only demonstrates the formula "
               "(seconds per sample x samples); it says nothing about GPU cost.")
    caption = (f"Projected time for {suite.planning['samples_per_epoch']:.2g} samples x "
               f"{int(suite.planning['epochs'])} epochs on one {env['device_name']}.{warning}")
    (out / "planning.md").write_text(render_markdown(
        plan, dict.fromkeys(plan.columns[2:], ".4g"), caption), encoding="utf-8")


# Raw data-wait column -> number format, in table order.
DATA_WAIT_COLUMNS = {"case": "", "variant": "", "num_workers": "d", "data_steps": "d",
                     "wait_s_median": ".4f", "wait_s_p90": ".4f", "step_s_median": ".3f",
                     "wait_fraction": ".4f", "data_status": ""}


def write_data_wait(waits: pd.DataFrame, env: dict[str, Any], out: Path) -> None:
    """data_wait.{csv,md}: seconds blocked in next(loader) per step, and that share of time."""
    waits.to_csv(out / "data_wait.csv", index=False)
    shown = waits[[c for c in DATA_WAIT_COLUMNS if c in waits]]
    caption = (f"Data-loading wait per step on {env['device_name']}: real DataLoader over the "
               "generated synthetic set, measured while training (wait_fraction = wait / "
               "(wait + step)).")
    (out / "data_wait.md").write_text(render_markdown(shown, DATA_WAIT_COLUMNS, caption),
                                      encoding="utf-8")


def rebuild_reports(out_dir: str | Path, suite: Suite | None = None) -> None:
    """Re-render every table of ``out_dir`` from its raw files (steps.csv, environment.json,
    data_wait.csv), e.g. after a change of table layout or paper numbers."""
    out, suite = Path(out_dir), suite or load_suite()
    env = json.loads((out / "environment.json").read_text(encoding="utf-8"))
    df = pd.read_csv(out / "steps.csv")
    write_cost_tables(df, suite, env, out)
    write_planning(df, suite, env, out)
    if (out / "data_wait.csv").exists():
        write_data_wait(pd.read_csv(out / "data_wait.csv"), env, out)


def update_peak(peaks: dict[str, dict[str, float]], precision: str, device: torch.device,
                peak_cfg: dict[str, int]) -> None:
    """Measure the matmul peak of ``precision`` again and keep the best median of the run.

    Other work on a shared machine can only make a measurement slower, so the best one is the
    closest to what the device can do; the peak is re-measured before every case and at the
    end, and every row's MFU uses the final best.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    new = measure_matmul_peak(device, dtype, int(peak_cfg["size"]), int(peak_cfg["repeats"]))
    old = peaks.get(precision)
    count = 1 + (int(old["peak_measurements"]) if old is not None else 0)
    if old is None or new["peak_flops_per_s"] > old["peak_flops_per_s"]:
        peaks[precision] = new
    peaks[precision]["peak_measurements"] = float(count)


def write_outputs(rows: list[dict[str, Any]], iterations: list[dict[str, Any]],
                  peaks: dict[str, dict[str, float]], env: dict[str, Any], suite: Suite,
                  out: Path) -> None:
    """Raw files and tables of everything measured so far (MFU against the best peak)."""
    for row in rows:
        row.update(peaks[row["precision"]])
        row["mfu"] = ratio(row["achieved_flops_per_s"], row["peak_flops_per_s"])
    df = pd.DataFrame(rows)
    df.to_csv(out / "steps.csv", index=False)
    pd.DataFrame(iterations).to_csv(out / "iterations.csv", index=False)
    (out / "environment.json").write_text(json.dumps({**env, "peaks": peaks}, indent=2) + "\n",
                                          encoding="utf-8")
    write_cost_tables(df, suite, env, out)
    write_planning(df, suite, env, out)


def run_benchmark(cases: Sequence[Case], device: str | torch.device, out_dir: str | Path,
                  iters: int = 50, warmup: int = 10, *, suite: Suite | None = None,
                  breakdown: bool = False, memory: bool = True, memory_steps: int = 3,
                  flops: bool = True, seed: int = 0, threads: int | None = None,
                  data_wait_steps: int = 0) -> pd.DataFrame:
    """Time, count and measure every case; write raw rows and tables; return the raw rows.

    Writes ``steps.csv`` (one row per case x variant), ``iterations.csv`` (every timed step),
    ``environment.json`` and the cost, breakdown and planning tables into ``out_dir``, rewritten
    after every case so that an interrupted run keeps what it measured; with
    ``data_wait_steps > 0`` also ``data_wait.{csv,md}`` (real DataLoader, synthetic data),
    measured after all timings.
    """
    suite = suite or load_suite()
    missing = [c.name for c in cases if REFERENCE not in {v.name for v in c.variants}]
    if missing:
        raise ValueError(f"cases {missing} lack the reference variant '{REFERENCE}'")
    dev, out = torch.device(device), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    env = environment(dev)
    peak_cfg = suite.peak["cuda" if dev.type == "cuda" else "cpu"]
    peaks: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    iterations: list[dict[str, Any]] = []
    for case in cases:
        update_peak(peaks, case.precision, dev, peak_cfg)
        runners = run_case(case, dev, iters, warmup, seed, breakdown, flops)
        case_rows = summarise(case, runners, peaks[case.precision])
        if memory:
            add_memory(case_rows, case, dev, suite.path, memory_steps, seed)
        rows += [{**row, **env, "warmup": warmup} for row in case_rows]
        iterations += [{"case": case.name, "variant": r.variant.name, "round": i, "seconds": t}
                       for r in runners for i, t in enumerate(r.times)]
        write_outputs(rows, iterations, peaks, env, suite, out)
    for precision in list(peaks):  # once more after the load of the whole run
        update_peak(peaks, precision, dev, peak_cfg)
    write_outputs(rows, iterations, peaks, env, suite, out)
    if data_wait_steps > 0:
        waits = [w for case in cases for w in data_wait_rows(case, dev, data_wait_steps, seed)]
        write_data_wait(pd.DataFrame(waits), env, out)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``python -m benchmarks.bench_step``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_step",
        description="Per-iteration time, memory, FLOPs and MFU of ALBEF vs SoftMask++ variants.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--preset", nargs="+", help="models from cases.yaml (default: all of "
                        "the device's grid), e.g. tiny mid base")
    parser.add_argument("--batch", nargs="+", type=int, help="override the grid's batch sizes")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", help="subset of cases.yaml variants "
                        "(albef is always added: every ratio needs it)")
    parser.add_argument("--iters", type=int, default=50, help="timed rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up rounds (default 10)")
    parser.add_argument("--breakdown", action="store_true",
                        help="extra pass timing forward / backward / optimizer separately")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process "
                        "memory probes")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--data-wait", type=int, default=0, metavar="STEPS",
                        help="also measure the data-loading wait over STEPS real batches "
                        "(synthetic data; generated on first use)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=str(DEFAULT_CASES), help="cases YAML")
    parser.add_argument("--out", default="results/benchmarks", help="output directory")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: re-render the tables of --out from its raw files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected cases (or re-render tables); exit 1 if any variant failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    suite = load_suite(args.cases)
    if args.report_only:
        rebuild_reports(args.out, suite)
        sys.stdout.write((Path(args.out) / "cost_table.md").read_text(encoding="utf-8"))
        return 0
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    cases = select_cases(suite, kind, args.preset, args.batch, args.precision, args.variants)
    df = run_benchmark(cases, args.device, args.out, args.iters, args.warmup, suite=suite,
                       breakdown=args.breakdown, memory=not args.no_memory,
                       memory_steps=args.memory_steps, flops=not args.no_flops,
                       seed=args.seed, threads=args.threads, data_wait_steps=args.data_wait)
    sys.stdout.write((Path(args.out) / "cost_table.md").read_text(encoding="utf-8"))
    return 0 if (df["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main())
