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

CLI: ``python -m benchmarks.bench_step --device cpu --preset tiny --out results/benchmarks/``;
add ``--cluster slurm [--tier 1gpu] [--wait]`` to run the same command as a job
(``benchmarks.submit``). Code calls ``run_benchmark(cases, device, out_dir, iters, warmup)``.

This module is the entry point; the work is done by ``benchmarks.cases`` (suite, cases,
batches), ``benchmarks.measure`` (timing, FLOPs, matmul peak, environment),
``benchmarks.probes`` (fresh-process memory, data wait) and ``benchmarks.report`` (tables).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.cases import DEFAULT_CASES, REFERENCE, Case, Suite, load_suite
from benchmarks.measure import environment, run_case, summarise, update_peak
from benchmarks.probes import add_memory, data_wait_rows
from benchmarks.report import rebuild_reports, write_data_wait, write_outputs
from benchmarks.submit import (
    SubmissionError,
    add_submission_options,
    run_submission,
    select_from_args,
)


def run_benchmark(cases: Sequence[Case], device: str | torch.device, out_dir: str | Path,
                  iters: int = 50, warmup: int = 10, *, suite: Suite | None = None,
                  breakdown: bool = False, memory: bool = True, memory_steps: int = 3,
                  flops: bool = True, seed: int = 0, threads: int | None = None,
                  data_wait_steps: int = 0, data_formats: Sequence[str] = ("json",),
                  data_workers: Sequence[int | None] = (None,)) -> pd.DataFrame:
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
        waits = [w for case in cases for w in data_wait_rows(case, dev, data_wait_steps, seed,
                                                              data_formats, data_workers)]
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
    parser.add_argument("--data-formats", nargs="+", choices=("json", "shards"),
                        default=["json"], help="data formats the data wait is measured for")
    parser.add_argument("--data-workers", nargs="+", type=int, default=None,
                        help="loader worker counts for the data wait (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=str(DEFAULT_CASES), help="cases YAML")
    parser.add_argument("--out", default="results/benchmarks", help="output directory")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: re-render the tables of --out from its raw files")
    add_submission_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected cases (or re-render tables); exit 1 if any variant failed.

    With ``--cluster`` the same command, minus the submission options, runs as a job
    (``benchmarks.submit``); the job calls this function again.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cluster is not None:
        return run_submission(args, parser)
    if args.report_only:
        rebuild_reports(args.out, load_suite(args.cases))
        sys.stdout.write((Path(args.out) / "cost_table.md").read_text(encoding="utf-8"))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    try:  # the same selection and checks as a submission (benchmarks.submit)
        suite, cases = select_from_args(args)
    except SubmissionError as exc:
        parser.error(str(exc))  # exit 2, nothing measured or written
    df = run_benchmark(cases, args.device, args.out, args.iters, args.warmup, suite=suite,
                       breakdown=args.breakdown, memory=not args.no_memory,
                       memory_steps=args.memory_steps, flops=not args.no_flops,
                       seed=args.seed, threads=args.threads, data_wait_steps=args.data_wait,
                       data_formats=args.data_formats, data_workers=args.data_workers or [None])
    sys.stdout.write((Path(args.out) / "cost_table.md").read_text(encoding="utf-8"))
    return 0 if (df["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main())
