"""Peak memory of one variant's training step, measured in the process that runs this module.

``benchmarks.bench_step`` (through ``benchmarks.probes.probe_memory``) starts
``python -m benchmarks.bench_memory ...`` once per variant, so no other variant's weights, no
allocator cache and no Python heap growth from earlier work are in the number. The result is
printed as one JSON line on stdout.

What is measured:

* CPU (``mem_kind = cpu_rss_growth``): first a throw-away copy of the variant at batch 2 runs
  one step and is deleted, so that shared-library pages, thread pools and kernel caches that
  the first step of *any* variant loads (about 40 MiB, the same for all) are not counted.
  Then the objective, optimizer and batch are built and the garbage collector run; the
  kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, value 5) so that transient
  peaks of model construction do not count, and the resident set size read from
  ``/proc/self/statm`` is the *baseline*. ``warm-up + steps`` training steps run and the
  peak RSS is read (``VmHWM`` of ``/proc/self/status``; ``getrusage``'s ``ru_maxrss`` is
  wrong in a spawned child, see ``peak_rss_bytes``; it is used only where /proc is missing):
  ``peak_mem_mib = peak RSS - baseline``, i.e. activations and autograd buffers, gradients,
  AdamW's two moment buffers (created by the first step), temporaries and allocator slack.
  The weights of the student and of the momentum twin are in the baseline (equal across
  variants). If the mark cannot be reset (``hwm_reset = false``), the peak may still hold
  a construction peak: ``peak_masked = true`` then says the steps never exceeded it and the
  value is only an upper bound.
* CUDA (``mem_kind = cuda_max_allocated``): after the warm-up steps,
  ``torch.cuda.reset_peak_memory_stats``; then ``steps`` steps; ``peak_mem_mib`` is
  ``max_memory_allocated`` (weights, optimizer state and activations: the whole step, as the
  paper's per-GPU figure) and ``peak_reserved_mib`` is ``max_memory_reserved``.

An allocation failure is reported as ``mem_status = "oom"`` (never a smaller batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import sys
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.cases import (
    DEFAULT_CASES,
    Case,
    build_variant,
    load_suite,
    make_batch,
    select_cases,
)
from benchmarks.measure import ALPHA, describe_failure, synchronize
from model.engine.step import train_step

MIB = 2**20


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); falls back to the peak mark elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            resident_pages = int(fh.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process's address space: ``VmHWM`` (Linux), else ``ru_maxrss``.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss`` on Linux: across ``execve`` the kernel keeps the
    previous address space's peak in it, and ``subprocess`` starts children with ``vfork``,
    whose previous address space is the *parent's*; the child's ``ru_maxrss`` therefore starts
    at the parent's peak (measured: +125 MiB from a 1 GiB benchmark parent, identical for
    every variant) and ``clear_refs`` does not lower it. ``VmHWM`` is this address space's own
    mark, which ``clear_refs`` resets.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _steps(case: Case, objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
           batch: dict[str, torch.Tensor], device: torch.device, n: int) -> None:
    for _ in range(n):
        train_step(objective, optimizer, batch, ALPHA, case.precision)
    synchronize(device)


def prewarm(case: Case, device: torch.device, seed: int) -> None:
    """One step of a batch-2 copy of the variant, then freed: loads code, not our memory."""
    small = dataclasses.replace(case, batch=2)
    objective, optimizer = build_variant(small, small.variants[0], device, seed)
    _steps(small, objective, optimizer, make_batch(small, device, seed), device, 1)
    del objective, optimizer
    gc.collect()


def measure_cpu(case: Case, device: torch.device, steps: int, warmup: int, seed: int
                ) -> dict[str, Any]:
    """Peak RSS growth of ``warmup + steps`` training steps over the built state (see module)."""
    prewarm(case, device, seed)
    objective, optimizer = build_variant(case, case.variants[0], device, seed)
    batch = make_batch(case, device, seed)
    gc.collect()
    # Reset first, then read: the mark can only be >= the RSS read just after it.
    hwm_reset = reset_peak_rss()
    baseline = current_rss_bytes()
    peak_before = peak_rss_bytes()
    _steps(case, objective, optimizer, batch, device, warmup + steps)
    peak = peak_rss_bytes()
    return {
        "mem_kind": "cpu_rss_growth",
        "peak_mem_mib": (peak - baseline) / MIB,
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": peak / MIB,
        "ru_maxrss_mib": ru_maxrss_bytes() / MIB,  # for reference only (see peak_rss_bytes)
        "hwm_reset": hwm_reset,
        # Without a reset, a construction peak above the step's peak would hide the latter.
        "peak_masked": (not hwm_reset) and peak == peak_before,
    }


def measure_cuda(case: Case, device: torch.device, steps: int, warmup: int, seed: int
                 ) -> dict[str, Any]:
    """Peak allocated / reserved CUDA memory of ``steps`` steps after ``warmup`` steps."""
    objective, optimizer = build_variant(case, case.variants[0], device, seed)
    batch = make_batch(case, device, seed)
    static = torch.cuda.memory_allocated(device)
    _steps(case, objective, optimizer, batch, device, warmup)
    torch.cuda.reset_peak_memory_stats(device)
    _steps(case, objective, optimizer, batch, device, steps)
    return {
        "mem_kind": "cuda_max_allocated",
        "peak_mem_mib": torch.cuda.max_memory_allocated(device) / MIB,
        "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB,
        "static_mem_mib": static / MIB,
    }


def measure(case: Case, device: torch.device, steps: int, warmup: int, seed: int
            ) -> dict[str, Any]:
    """Run the measurement of ``case.variants[0]``; failures become a status, not a crash."""
    try:
        fn = measure_cuda if device.type == "cuda" else measure_cpu
        result = fn(case, device, steps, warmup, seed)
    except RuntimeError as exc:  # includes torch.cuda.OutOfMemoryError
        status, detail = describe_failure(exc)
        return {"mem_status": status, "mem_detail": detail}
    return {"mem_status": "ok", "mem_detail": "", "mem_steps": warmup + steps, **result}


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``python -m benchmarks.bench_memory`` (one variant, one case)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory",
                                     description="Peak memory of one variant (fresh process).")
    parser.add_argument("--variant", required=True, help="a variant name from cases.yaml")
    parser.add_argument("--preset", required=True, help="a model name from cases.yaml")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cases", default=str(DEFAULT_CASES))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print one JSON line; failures are a status in it, not an exit code."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suite = load_suite(args.cases)
    kind = "cuda" if device.type == "cuda" else "cpu"
    (case,) = select_cases(suite, kind, [args.preset], [args.batch], [args.precision],
                           [args.variant])
    # select_cases puts the reference first; measure only the requested variant.
    case = Case(case.model, case.batch, case.precision,
                tuple(v for v in case.variants if v.name == args.variant), case.text)
    result = measure(case, device, args.steps, args.warmup, args.seed)
    sys.stdout.write(json.dumps({"variant": args.variant, **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
