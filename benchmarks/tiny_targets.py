"""Learning targets of the CPU-scale experiment, measured on a finished grid (never asserted).

Reads the raw run records that ``python -m results`` writes (``results/raw/<grid>.jsonl``) and
reports, for the reference cell (``albef``) and every other cell, the numbers the tiny preset
is meant to reach, next to the target and whether it was reached:

* clean-pair ITM loss (last quarter of training) <= 0.35;
* ITM-re-ranked R@1 >= ITC-only R@1 + 3 points, text->image and image->text;
* ITC-only R@1 >= 25 % in both directions (200 test images);
* compositional swap accuracy by ITM (mean of colour / shape / relation) >= 80 %.

With several seeds the value is the mean over the cell's finished seeds. The grid's wall time
is not in the raw records: pass it with ``--wall-min`` (e.g. from ``time``) to report it too.
CLI: ``python -m benchmarks.tiny_targets --raw results/raw/softmask_ablation.jsonl
--out results/benchmarks/tiny-targets``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Target:
    """One learning target: a value computed from a run's metrics and its threshold."""

    name: str
    value: Callable[[dict[str, float]], float]
    threshold: float
    higher_is_better: bool = True

    def reached(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


TARGETS: tuple[Target, ...] = (
    Target("clean-pair ITM loss", lambda m: m["itm/clean_loss"], 0.35, higher_is_better=False),
    Target("re-ranked TR@1 - ITC TR@1", lambda m: m["TR@1"] - m["itc/TR@1"], 3.0),
    Target("re-ranked IR@1 - ITC IR@1", lambda m: m["IR@1"] - m["itc/IR@1"], 3.0),
    Target("ITC TR@1", lambda m: m["itc/TR@1"], 25.0),
    Target("ITC IR@1", lambda m: m["itc/IR@1"], 25.0),
    Target("swap accuracy by ITM (comp/mean)", lambda m: m["comp/mean"], 80.0),
)
# Shown beside the targets: what ITC alone reaches on the swaps, and matching at all.
CONTEXT = {"swap accuracy by ITC": "comp_itc/mean", "ITM true vs another scene's caption":
           "comp/random", "Grad-CAM pointing game": "loc/pointing"}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Finished run records of a raw file (one JSON object per line)."""
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            record = json.loads(line)
            if record.get("record", "run") == "run" and record.get("status") == "done":
                if not isinstance(record.get("metrics"), dict):
                    raise ValueError(f"{path}:{number}: a finished run without metrics")
                records.append(record)
    return records


def cell_means(records: Sequence[dict[str, Any]]) -> dict[str, tuple[dict[str, float], int]]:
    """Per cell: metric means over its finished seeds, and the number of seeds."""
    out = {}
    frame = pd.DataFrame([{"cell": r["cell"], "seed": r["seed"], **r["metrics"]}
                          for r in records])
    for cell, rows in frame.groupby("cell", sort=False):
        out[str(cell)] = (rows.drop(columns=["cell", "seed"]).mean(numeric_only=True).to_dict(),
                          len(rows))
    return out


def target_table(means: dict[str, tuple[dict[str, float], int]], reference: str) -> pd.DataFrame:
    """One row per target for the reference cell, with the range over all cells."""
    rows = []
    ref, n = means[reference]
    for target in TARGETS:
        values = [target.value(m) for m, _ in means.values() if _has(target, m)]
        value = target.value(ref) if _has(target, ref) else float("nan")
        rows.append({
            "target": target.name,
            "threshold": f"{'<=' if not target.higher_is_better else '>='} {target.threshold:g}",
            f"{reference} (n={n})": round(value, 3),
            "reached": "yes" if target.reached(value) else "no",
            "all cells: min": round(min(values), 3) if values else float("nan"),
            "all cells: max": round(max(values), 3) if values else float("nan"),
        })
    for label, key in CONTEXT.items():
        values = [m[key] for m, _ in means.values() if key in m]
        rows.append({"target": label, "threshold": "(context)",
                     f"{reference} (n={n})": round(ref.get(key, float("nan")), 3),
                     "reached": "", "all cells: min": round(min(values), 3) if values else "",
                     "all cells: max": round(max(values), 3) if values else ""})
    return pd.DataFrame(rows)


def _has(target: Target, metrics: dict[str, float]) -> bool:
    try:
        target.value(metrics)
    except KeyError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tiny_targets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, required=True, help="results/raw/<grid>.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", default="albef")
    ap.add_argument("--wall-min", type=float, default=None,
                    help="measured wall time of the grid run, minutes (reported as given)")
    args = ap.parse_args(argv)
    means = cell_means(read_records(args.raw))
    if args.reference not in means:
        raise SystemExit(f"{args.raw}: no finished run of cell {args.reference!r}")
    table = target_table(means, args.reference)
    seeds = sorted({n for _, n in means.values()})
    lines = [f"Learning targets of the tiny preset, from {args.raw.name} "
             f"({len(means)} cells, seeds per cell: {seeds}).", ""]
    if args.wall_min is not None:
        lines += [f"Grid wall time as measured: {args.wall_min:.1f} min.", ""]
    text = "\n".join(lines) + table.to_markdown(index=False) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "targets.md").write_text(text)
    table.to_csv(args.out / "targets.csv", index=False)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
