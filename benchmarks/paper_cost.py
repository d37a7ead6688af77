"""What the paper's grid costs: FLOPs of every cell at the paper's preset, and GPU-hours.

    python -m benchmarks.paper_cost --out results/benchmarks/paper-cost

Every cell of ``ablations/matrix.yaml`` is resolved at the ``base`` preset exactly as the grid
resolves it (base.yaml, the cell's overrides), built, and one training step on a synthetic
batch is counted with ``FlopCounterMode`` (``benchmarks.measure.count_step_flops``: forward with
the Grad-CAM pass, backward; the momentum encoder's forward included). FLOPs per sample are
exact for the code; everything after that is an estimate with its assumptions printed:

* the schedule: ALBEF's 4M corpus (4.0M images, 5.1M image-text pairs; an epoch visits every
  pair), 30 epochs;
* the pace: ALBEF's authors report 2 to 3 days on 8 A100 GPUs for that schedule (ALBEF GitHub
  issue #31). Divided into ALBEF's counted FLOPs this gives the sustained FLOP/s of their run,
  and every cell is assumed to run at that FLOP/s (time proportional to FLOPs: the CPU cost
  tables show time ratios close to FLOP ratios). ``--tflops`` replaces the anchor by a rate
  you measured (``bench_step --device cuda --preset base`` reports MFU and GFLOP/step);
* storage: one full checkpoint (student, momentum encoder, queues, AdamW state) per run.

Fine-tuning and evaluation are not included (COCO retrieval fine-tuning is about 2.8M
sample-steps at 384 px against 153M at 256 px for pre-training).
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from ablations.grid import MATRIX_FILE, expand, load_matrix
from benchmarks.cases import Case, Variant, load_suite, make_batch
from benchmarks.measure import Runner, count_step_flops
from benchmarks.report import render_markdown
from model.build import build_objective
from model.config.schema import ExperimentConfig
from model.engine.optim import build_optimizer
from results.render import write_files

SAMPLES_PER_EPOCH = 5.1e6  # ALBEF's 4M pre-training corpus: image-text pairs
EPOCHS = 30
ANCHOR_DAYS = (2.0, 3.0)  # ALBEF GitHub issue #31: 8 x A100, 4M corpus, 30 epochs
ANCHOR_GPUS = 8
A100_TF32_PEAK = 156e12  # dense TF32 tensor-core peak of an A100 (NVIDIA datasheet); ALBEF's fp32
# code ran its matmuls in TF32 on A100 under the PyTorch versions of its time
COUNT_BATCH = 4  # FLOPs are linear in the batch (the in-batch B x B terms are negligible)
REFERENCE_CELL = "albef"


def count_cell(cfg: ExperimentConfig, case: Case, device: torch.device) -> tuple[float, int]:
    """(FLOPs per sample of one training step, bytes of a full checkpoint) of one cell."""
    torch.manual_seed(0)
    objective = build_objective(cfg, case.model.special, seed=0).to(device)
    objective.train()
    optimizer = build_optimizer(objective, cfg.train)
    runner = Runner(Variant("cell", "cell", ()), objective, optimizer)
    count_step_flops(runner, make_batch(case, device, seed=0), "fp32", device)
    if runner.status != "ok":
        raise RuntimeError(f"FLOP count failed: {runner.detail}")
    state = sum(t.numel() * t.element_size() for t in objective.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in objective.parameters()
                    if p.requires_grad)
    flops = runner.flops / case.batch
    del runner, objective, optimizer
    gc.collect()
    return flops, state + 2 * trainable  # AdamW: exp_avg and exp_avg_sq per parameter


def cost_frame(counts: dict[str, tuple[float, int]], overrides: dict[str, str], seeds: int,
               tflops: float | None) -> tuple[pd.DataFrame, str]:
    """One row per cell plus the grid total, and the caption naming every assumption."""
    samples = SAMPLES_PER_EPOCH * EPOCHS
    ref = counts[REFERENCE_CELL][0]
    if tflops is None:
        rates = [ref * samples / (d * 86400 * ANCHOR_GPUS) for d in ANCHOR_DAYS]
        pace = (f"ALBEF's reported pace (2-3 days on {ANCHOR_GPUS} A100 GPUs, ALBEF issue #31) "
                f"= {rates[1] / 1e12:.1f}-{rates[0] / 1e12:.1f} TFLOP/s sustained per GPU "
                f"for ALBEF's counted FLOPs ({rates[1] / A100_TF32_PEAK:.0%}-"
                f"{rates[0] / A100_TF32_PEAK:.0%} of the A100's dense TF32 peak); every cell "
                f"assumed to run at that FLOP/s")
    else:
        rates = [tflops * 1e12, tflops * 1e12]
        pace = f"a sustained {tflops:g} TFLOP/s per GPU (given)"
    rows = []
    for cell, (flops, ckpt) in counts.items():
        hours = [flops * samples / r / 3600 for r in rates]
        rows.append({"cell": cell, "overrides": overrides[cell],
                     "GFLOP/sample": flops / 1e9, "x ALBEF": flops / ref,
                     "GPU-h/run": f"{hours[0]:,.0f}-{hours[1]:,.0f}" if tflops is None
                     else f"{hours[0]:,.0f}",
                     f"days on {ANCHOR_GPUS} GPUs": f"{hours[0] / ANCHOR_GPUS / 24:.1f}-"
                     f"{hours[1] / ANCHOR_GPUS / 24:.1f}" if tflops is None
                     else f"{hours[0] / ANCHOR_GPUS / 24:.1f}",
                     "_lo": hours[0], "_hi": hours[1],
                     "checkpoint GiB": ckpt / 2**30})
    frame = pd.DataFrame(rows)
    lo, hi = frame["_lo"].sum() * seeds, frame["_hi"].sum() * seeds
    total = (f"{lo:,.0f}-{hi:,.0f}" if tflops is None else f"{lo:,.0f}")
    caption = (f"Pre-training cost of the grid at the base preset (ViT-B/16 at 256 px, "
               f"BERT-base 6+6, queue 65,536): FLOPs counted on one step of each cell's own "
               f"config (forward incl. Grad-CAM pass and momentum encoder, backward; batch "
               f"{COUNT_BATCH}, per sample); {SAMPLES_PER_EPOCH / 1e6:.1f}M pairs x {EPOCHS} "
               f"epochs; GPU-hours at {pace}. Grid: {len(frame)} cells x {seeds} seeds = "
               f"{len(frame) * seeds} runs, {total} GPU-hours, "
               f"{frame['checkpoint GiB'].sum() * seeds:,.0f} GiB of final checkpoints. "
               f"Fine-tuning and evaluation not included.")
    return frame.drop(columns=["_lo", "_hi"]), caption


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(MATRIX_FILE))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tflops", type=float, default=None,
                        help="sustained TFLOP/s per GPU instead of ALBEF's reported pace")
    parser.add_argument("--only", nargs="*", default=(), help="cells (default: all)")
    parser.add_argument("--out", default="results/benchmarks/paper-cost")
    args = parser.parse_args(argv)
    only = list(args.only)
    if only and REFERENCE_CELL not in only:
        only.insert(0, REFERENCE_CELL)  # every ratio needs it
    specs = expand(args.matrix, preset="base", seeds=[0], only=only,
                   sets=[f"train.batch_size={COUNT_BATCH}"])
    suite = load_suite()
    case = Case(suite.models["base"], COUNT_BATCH, "fp32",
                (Variant("albef", "ALBEF", ()),), suite.text)
    device = torch.device("cpu")
    cells = load_matrix(args.matrix).cells
    counts, overrides = {}, {}
    for spec in specs:
        counts[spec.cell] = count_cell(spec.config, case, device)
        overrides[spec.cell] = " + ".join(Path(f).stem for f in cells[spec.cell].overrides) or "-"
        print(f"{spec.cell}: {counts[spec.cell][0] / 1e9:.1f} GFLOP/sample", flush=True)
    frame, caption = cost_frame(counts, overrides, args.seeds, args.tflops)
    formats = {"GFLOP/sample": ".1f", "x ALBEF": ".3f", "checkpoint GiB": ".2f"}
    out = Path(args.out)
    write_files({out / "paper_cost.md": render_markdown(frame, formats, caption),
                 out / "paper_cost.csv": frame.to_csv(index=False)})
    print(caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
