"""Which per-GPU batch fits in 24 / 40 / 80 GB: an estimate from measured activation memory.

    python -m benchmarks.fit_table --bench results/benchmarks/cpu-levers --preset base

(``--bench`` takes several folders when the batch sizes were measured in separate runs.)

Reads a cost benchmark's ``steps.csv`` run at two or more batch sizes of one model
(``bench_step --batch 2 4``): the slope of the peak memory growth over the batch is the
activation memory per sample of each variant (the weights, gradients and optimizer state do not
grow with the batch, so they cancel). The fixed part is counted from the model itself: student
and momentum weights, the student's gradients and AdamW state (÷ world size with ``train.zero``),
the feature queues. The batch that fits a card is (capacity × headroom − fixed − CUDA context) /
activation per sample. Labelled an estimate: CPU allocator peaks stand in for CUDA's, and bf16
autocast is assumed to halve activations; a GPU run of the same benchmark replaces both.
Writes ``fit.md`` and ``fit.csv`` next to the benchmark's tables.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.cases import ModelSpec, load_suite
from model.build import build_objective
from model.config.experiment import load_experiment
from results.render import write_files

CARDS_GB = (24, 40, 80)
HEADROOM = 0.9  # fragmentation and allocator slack
CUDA_CONTEXT_GIB = 1.0  # CUDA context and cuDNN/cuBLAS workspaces (typical, not measured)
BF16_ACTIVATION_FACTOR = 0.5  # assumption: autocast keeps activations in 16 bits


def activation_per_sample(steps: pd.DataFrame) -> pd.DataFrame:
    """Per variant: the least-squares slope of peak memory (MiB) over the batch size."""
    rows = []
    for (variant, label), group in steps.dropna(subset=["peak_mem_mib"]).groupby(
            ["variant", "label"], sort=False):
        if group["batch"].nunique() < 2:
            continue
        slope = float(np.polyfit(group["batch"], group["peak_mem_mib"], 1)[0])
        rows.append({"variant": variant, "label": label, "act_mib_per_sample": slope,
                     "batches": ",".join(str(b) for b in sorted(group["batch"].unique())),
                     "sec_it_median": dict(zip(group["batch"], group["sec_it_median"],
                                               strict=True))})
    return pd.DataFrame(rows)


def element_counts(model: ModelSpec) -> tuple[int, int, int]:
    """(student parameters, momentum-twin parameters, buffers incl. the queues) of the model,
    built once: every fixed-memory figure below is arithmetic on these."""
    cfg = load_experiment(preset=model.preset, sets=list(model.sets))
    objective = build_objective(cfg, model.special)
    return (sum(p.numel() for p in objective.student.parameters()),
            sum(p.numel() for p in objective.teacher.parameters()),
            sum(b.numel() for b in objective.buffers()))


def fixed_gib(counts: tuple[int, int, int], world: int = 1, zero: bool = False) -> float:
    """Weights (student + momentum twin), gradients and AdamW state of the student, queues."""
    student, teacher, buffers = counts
    adam = 2 * student / (world if zero else 1)
    return 4 * (student + teacher + student + adam + buffers) / 2**30


def free_gib(card_gb: int, fixed: float) -> float:
    """What a card of ``card_gb`` GB leaves for activations: the usable share minus the fixed
    memory and the CUDA context."""
    return card_gb * 1e9 / 2**30 * HEADROOM - fixed - CUDA_CONTEXT_GIB


def fit_table(acts: pd.DataFrame, fixed: float, fixed_zero8: float) -> pd.DataFrame:
    rows = []
    for _, a in acts.iterrows():
        row = {"variant": a["label"], "activation MiB/sample (fp32, measured on CPU)":
               a["act_mib_per_sample"]}
        for precision, factor in (("fp32", 1.0), ("bf16", BF16_ACTIVATION_FACTOR)):
            per = a["act_mib_per_sample"] * factor / 1024
            for gb in CARDS_GB:
                row[f"{gb} GB {precision}"] = (max(0, math.floor(free_gib(gb, fixed) / per))
                                               if per > 0 else None)
        per_bf16 = a["act_mib_per_sample"] * BF16_ACTIVATION_FACTOR / 1024
        row["80 GB bf16, ZeRO over 8"] = max(0, math.floor(free_gib(80, fixed_zero8) / per_bf16))
        row["batch 64, fp32 (GiB)"] = fixed + CUDA_CONTEXT_GIB + 64 * a["act_mib_per_sample"] / 1024
        rows.append(row)
    return pd.DataFrame(rows)


LEVER_PAIRS = (("albef", "albef_ckpt"), ("ours", "ours_ckpt"))


def checkpointing_summary(acts: pd.DataFrame) -> str:
    """Activation checkpointing against the same variant without it: the share of activation
    memory per sample it saves, and its time ratio at the smallest batch both ran at (where
    they were timed interleaved, in one process)."""
    by = acts.set_index("variant")
    parts = []
    for plain, ckpt in LEVER_PAIRS:
        if plain not in by.index or ckpt not in by.index:
            continue
        saved = 1 - by.at[ckpt, "act_mib_per_sample"] / by.at[plain, "act_mib_per_sample"]
        times_p, times_c = by.at[plain, "sec_it_median"], by.at[ckpt, "sec_it_median"]
        batch = min(set(times_p) & set(times_c))
        parts.append(f"{by.at[ckpt, 'label']}: {saved:.0%} less activation memory per sample, "
                     f"{times_c[batch] / times_p[batch]:.2f}x the time (batch {batch})")
    return "; ".join(parts) + "." if parts else ""


def report(table: pd.DataFrame, fixed: float, fixed_zero8: float, preset: str) -> str:
    caption = " ".join([
        f"**Estimate** ({preset} model of benchmarks/cases.yaml): the per-GPU batch that fits",
        "each card, from the activation memory per sample measured on CPU (slope of peak",
        "memory over two batch sizes, fp32) and the model's fixed memory counted exactly",
        f"({fixed:.2f} GiB: student and momentum weights, student gradients and AdamW state,",
        f"queues; {fixed_zero8:.2f} GiB with train.zero over 8 ranks), with",
        f"{CUDA_CONTEXT_GIB:g} GiB of CUDA context and {HEADROOM:.0%} of the card usable.",
        "bf16 columns assume autocast halves activations. The paper's recipe is 64 per GPU;",
        "the last column is the memory that batch needs in fp32. Not a GPU measurement:",
        "`python -m benchmarks.gpu_check` replaces it with measured peaks."])
    return caption + "\n\n" + table.to_markdown(index=False, floatfmt=".1f") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fit_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, nargs="+", required=True,
                        help="bench_step --out folders (their steps.csv are combined; the "
                             "tables are written to the first)")
    parser.add_argument("--preset", default="base", help="a model of benchmarks/cases.yaml")
    args = parser.parse_args(argv)
    steps = pd.concat([pd.read_csv(b / "steps.csv") for b in args.bench], ignore_index=True)
    steps = steps[steps["preset"] == args.preset]
    acts = activation_per_sample(steps)
    if acts.empty:
        raise SystemExit(f"{args.bench[0]}/steps.csv: no variant of preset {args.preset!r} was "
                         "measured at two batch sizes (run bench_step with --batch 2 4)")
    torch.manual_seed(0)
    model = load_suite().models[args.preset]
    counts = element_counts(model)
    fixed, fixed_zero8 = fixed_gib(counts), fixed_gib(counts, world=8, zero=True)
    table = fit_table(acts, fixed, fixed_zero8)
    text = report(table, fixed, fixed_zero8, args.preset)
    summary = checkpointing_summary(acts)
    text += f"\n{summary}\n" if summary else ""
    out = args.bench[0]
    write_files({out / "fit.md": text, out / "fit.csv": table.to_csv(index=False)})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
