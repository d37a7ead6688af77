"""A short tiny-preset training run on a device beside the same run on CPU.

Both runs start from the same seed and weights; their random streams (hard negatives, MLM
corruption) come from per-device generators, so the curves are not bit-identical across
devices: they should *track* each other. Reported, not asserted: per logged step the CPU and
device losses and their difference, and the mean relative difference over the second half.

CLI: ``python -m benchmarks.device_parity --device cuda --steps 200 --out DIR``
(``--precision bf16`` trains the device run under bf16 autocast; the CPU run is always fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from model.config.experiment import load_experiment
from model.engine.run_io import METRICS
from model.engine.train import train

LOSSES = ("loss/itc", "loss/itm", "loss/mlm", "loss/total")
# --quick: a small synthetic set, for a dry run of the command on CPU (CI).
QUICK_DATA = ("data.synthetic.n_train_images=256", "data.synthetic.n_test_images=32",
              "train.batch_size=16", "model.queue_size=64")


def train_curve(device: str, steps: int, run_dir: Path, cache_dir: Path, precision: str,
                extra: Sequence[str] = ()) -> pd.DataFrame:
    """Train the tiny preset for ``steps`` steps on ``device``; logged losses per step."""
    cfg = load_experiment(preset="tiny", sets=[
        f"train.max_steps={steps}", "train.log_every=10", "data.num_workers=0",
        f"data.cache_dir={cache_dir}", f"train.precision={precision}", *extra])
    torch.manual_seed(cfg.train.seed)
    train(cfg, run_dir, device=device, progress=False)
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    return pd.DataFrame([{"step": r["step"], **{k: r[k] for k in LOSSES}} for r in train_rows])


def compare(cpu: pd.DataFrame, dev: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Side-by-side table and the mean relative difference per loss over the second half."""
    both = cpu.merge(dev, on="step", suffixes=(" cpu", " device"))
    late = both[both["step"] > both["step"].max() / 2]
    summary = {}
    for key in LOSSES:
        both[f"{key} diff"] = both[f"{key} device"] - both[f"{key} cpu"]
        rel = (late[f"{key} device"] - late[f"{key} cpu"]).abs() / late[f"{key} cpu"].abs()
        summary[key] = float(rel.mean())
    return both, summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="synthetic data cache (default: OUT/cache)")
    ap.add_argument("--quick", action="store_true", help="small data (a CPU dry run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device.startswith("cuda"):
        # fp32 means fp32 on both sides: TF32 matmuls would differ from CPU by ~1e-3.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cache = args.cache_dir or args.out / "cache"
    extra = QUICK_DATA if args.quick else ()
    cpu = train_curve("cpu", args.steps, args.out / "run_cpu", cache, "fp32", extra)
    dev = train_curve(args.device, args.steps, args.out / "run_device", cache, args.precision,
                      extra)
    table, summary = compare(cpu, dev)
    table.to_csv(args.out / "parity.csv", index=False)
    (args.out / "parity.json").write_text(json.dumps(
        {"device": args.device, "precision": args.precision, "steps": args.steps,
         "mean_rel_diff_second_half": summary}, indent=2) + "\n")
    text = (f"Tiny preset, {args.steps} steps, CPU fp32 vs {args.device} {args.precision}; "
            f"mean relative difference over the second half: "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()) + "\n\n"
            + table.to_markdown(index=False, floatfmt=".4f") + "\n")
    (args.out / "parity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
