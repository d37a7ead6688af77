"""Measurement of the training step: interleaved timing, FLOPs, the matmul peak, the environment.

What is timed is the trainer's own ``model.engine.step.train_step`` on objectives built by
``benchmarks.cases``. A variant that fails (e.g. out of memory) is recorded on its ``Runner``
and dropped from the remaining rounds; the other variants keep running. Everything here works
in the calling process; measurements that need another process or a real data loader are in
``benchmarks.probes``.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from benchmarks.cases import REFERENCE, Case, Variant, build_variant, make_batch
from model.engine.run_io import git_revision
from model.engine.step import train_step

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.4  # ALBEF's distillation weight after its ramp; it does not change the cost


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


def spread(values: Sequence[float]) -> tuple[float, float, float]:
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
    ref_median = spread(ref.times)[0]
    rows = []
    for r in runners:
        med, p10, p90 = spread(r.times)
        ratio_med, ratio_p10, ratio_p90 = spread(paired_ratios(r.times, ref.times))
        achieved = ratio(r.flops, med)
        phases = {k: spread([p[k] for p in r.phases])[0]
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
    sha, dirty = git_revision(REPO_ROOT)
    if sha == "unknown":
        return sha
    return sha[:7] + ("-dirty" if dirty else "")


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
