"""One prepared device check: everything to measure on a GPU machine, in one command.

``python -m benchmarks.gpu_check --out DIR`` (CUDA, the paper-scale plan) runs, each as its own
subprocess with its own time limit, so that one crash or OOM never loses the others:

1. ``tests``: the ``gpu``-marked tests (tests/integration/test_cuda.py: CUDA vs CPU losses and
   gradients, what bf16 autocast keeps in fp32, memory probes), JUnit XML in DIR/tests.xml;
2. ``cost``: the base-size cost table (ALBEF, ours w/o SoftMask, ours, each component alone) at
   batch 64 and 128 per GPU, fp32 and bf16: s/it with p10/p90, peak allocated and reserved
   memory, MFU against a bf16/fp32 matmul peak measured in the same run, OOM as a row
   (``benchmarks.bench_step``), in DIR/cost/;
3. ``retrieval``: ALBEF's protocol at COCO-5K shape (5,000 images x 25,000 captions, k_test
   256), feature extraction and re-rank, batched vs per-query loop
   (``benchmarks.bench_retrieval``), in DIR/retrieval/;
4. ``parity``: a 200-step tiny training run on CUDA beside the same run on CPU
   (``benchmarks.device_parity``), in DIR/parity/;
5. ``levers``: the memory levers (activation checkpointing on ALBEF and ours, fused AdamW) at
   base size, batch 32 and 64 per GPU in bf16, side by side with their plain variants, in
   DIR/levers/ (``python -m benchmarks.fit_table --bench DIR/levers`` then gives the per-card
   batch from GPU peaks instead of CPU ones).

``--device cpu`` runs the same five steps at tiny size in seconds (the ``gpu`` tests are then
skipped): a dry run that CI executes. DIR/environment.json records the machine (GPU, driver,
CUDA, torch); DIR/summary.md and DIR/summary.json the status, exit code and wall time of every
step. The exit code is 1 when any step failed or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.measure import environment

REPO = Path(__file__).resolve().parents[1]
LEVER_VARIANTS = ("albef", "albef_ckpt", "ours", "ours_ckpt", "albef_fused")


@dataclass(frozen=True)
class Step:
    """One subprocess of the check: ``python -m <module> <args>`` with a time limit."""

    name: str
    module: str
    args: tuple[str, ...]
    timeout_s: int


def plan(device: str, out: Path) -> list[Step]:
    """The steps for ``device``: the paper-scale plan on CUDA, a tiny dry run on CPU."""
    tests = Step("tests", "pytest", ("-m", "gpu", "-q", "-p", "no:cacheprovider",
                                     str(REPO / "tests" / "integration" / "test_cuda.py"),
                                     f"--junitxml={out / 'tests.xml'}"), 180)
    if device.startswith("cuda"):
        return [
            tests,
            Step("cost", "benchmarks.bench_step", (
                "--device", device, "--preset", "base", "--batch", "64", "128",
                "--precision", "fp32", "bf16", "--iters", "12", "--warmup", "4",
                "--memory-steps", "3", "--out", str(out / "cost")), 330),
            Step("retrieval", "benchmarks.bench_retrieval", (
                "--device", device, "--preset", "base", "--images", "5000", "--k", "256",
                "--repeats", "1", "--out", str(out / "retrieval")), 240),
            Step("parity", "benchmarks.device_parity", (
                "--device", device, "--steps", "200", "--out", str(out / "parity")), 240),
            Step("levers", "benchmarks.bench_step", (
                "--device", device, "--preset", "base", "--batch", "32", "64",
                "--precision", "bf16", "--variants", *LEVER_VARIANTS, "--iters", "8",
                "--warmup", "3", "--memory-steps", "2", "--out", str(out / "levers")), 210),
        ]
    return [
        tests,
        Step("cost", "benchmarks.bench_step", (
            "--device", "cpu", "--preset", "tiny", "--batch", "8", "--precision", "fp32",
            "--iters", "2", "--warmup", "1", "--no-memory", "--threads", "1",
            "--out", str(out / "cost")), 300),
        Step("retrieval", "benchmarks.bench_retrieval", (
            "--device", "cpu", "--preset", "tiny", "--images", "20", "--k", "4", "--repeats",
            "1", "--threads", "1", "--out", str(out / "retrieval")), 300),
        Step("parity", "benchmarks.device_parity", (
            "--device", "cpu", "--steps", "10", "--quick", "--out", str(out / "parity")), 300),
        Step("levers", "benchmarks.bench_step", (
            "--device", "cpu", "--preset", "tiny", "--batch", "8", "--precision", "fp32",
            "--variants", *LEVER_VARIANTS, "--iters", "1", "--warmup", "1", "--no-memory",
            "--threads", "1", "--out", str(out / "levers")), 300),
    ]


def run_step(step: Step, logs: Path) -> dict[str, object]:
    """Run one step; its combined output goes to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{step.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, "-m", step.module, *step.args], cwd=REPO,
                                  stdout=fh, stderr=subprocess.STDOUT, timeout=step.timeout_s)
            code: int | None = proc.returncode
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, f"timeout ({step.timeout_s} s)"
    return {"step": step.name, "status": status, "exit_code": code,
            "wall_s": round(time.perf_counter() - t0, 1), "log": str(log.relative_to(
                logs.parent))}


def write_summary(rows: Sequence[dict[str, object]], out: Path, device: str) -> str:
    """summary.json and summary.md; returns the Markdown."""
    (out / "summary.json").write_text(json.dumps({"device": device, "steps": list(rows)},
                                                 indent=2) + "\n")
    lines = [f"Device check on {device}:", "", "| step | status | exit code | wall (s) | log |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['exit_code']} | {r['wall_s']} | {r['log']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a tiny dry run)")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=("tests", "cost", "retrieval", "parity", "levers"),
                    help="run these steps only (e.g. split the check over two sessions)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here "
                         "(use --device cpu for the dry run)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(
        json.dumps(environment(torch.device(args.device)), indent=2, default=str) + "\n")
    steps = [s for s in plan(args.device, out) if args.only is None or s.name in args.only]
    rows = []
    for step in steps:
        rows.append(run_step(step, out / "logs"))
        print(f"{step.name}: {rows[-1]['status']} in {rows[-1]['wall_s']} s", flush=True)
    print(write_summary(rows, out, args.device))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
