"""The sensitivity grid (docs/METHOD.md §7): can the default experiment tell a broken SoftMask
from a working one?

The correct SoftMask cell and ALBEF (``ablations/sensitivity.yaml``: the default grid's cells,
so a finished default grid's runs are reused) and, for every planted SoftMask bug that still
trains (``devtools/method_bugs.py`` TRAINABLE_SOFTMASK), the SoftMask cell trained by the mutated
code: each bug is applied to a scratch copy of the checkout and ``ablations/run_grid.py`` runs
there, into ``<runs-root>/mutants/<bug>``. Then, per bug and per metric of the default tables, a
two-sided Welch's t-test against the correct cell (p < 0.05); the primary metric, declared
before anything ran, is ``occ/drop_gap``. Writes ``<out>/sensitivity.{md,csv,png}`` and
``raw.json``. Run by hand::

    python -m devtools.sensitivity --runs-root runs --out results/sensitivity
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from devtools import method_bugs
from devtools.mutations import REPO, apply, restore, scratch_copy
from model.engine.run_io import read_run
from results.tables import welch_p

MATRIX = "ablations/sensitivity.yaml"
GRID = "softmask_ablation"
PRIMARY = "occ/drop_gap"
METRICS = (PRIMARY, "TR@1", "IR@1", "itc/TR@1", "itc/IR@1", "comp/mean", "comp_itc/mean",
           "loc/pointing", "loc/mass", "itm/clean_acc", "itm/masked_acc", "itm/shortcut",
           "occ/drop", "occ/tr1")


def _grid(root: Path, runs_root: Path, cells: Sequence[str], seeds: int) -> None:
    """run_grid.py in ``root`` (a checkout or a mutated copy) for ``cells``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "ablations/run_grid.py", "--matrix", MATRIX, "--only", *cells,
           "--seeds", str(seeds), "--runs-root", str(runs_root), "--results-out",
           str(Path(tempfile.gettempdir()) / "sensitivity-results" / runs_root.name)]
    subprocess.run(cmd, cwd=root, env=env, check=True)


def seed_metrics(grid_dir: Path, cell: str) -> dict[int, dict[str, float]]:
    """Finished runs' metrics of one cell, by seed."""
    out = {}
    for run_dir in sorted(grid_dir.glob(f"{cell}__s*")):
        verdict = read_run(run_dir)
        if verdict.status == "done" and verdict.result is not None:
            out[int(verdict.result["seed"])] = verdict.result["metrics"]
    return out


def compare(rows: dict[str, dict[int, dict[str, float]]], reference: str) -> pd.DataFrame:
    """One row per (variant, metric): means, Δ vs the reference cell, Welch p, detected."""
    ref = rows[reference]
    table = []
    for name, seeds in rows.items():
        if name == reference:
            continue
        for metric in METRICS:
            a = np.array([m[metric] for m in seeds.values() if metric in m])
            b = np.array([m[metric] for m in ref.values() if metric in m])
            p = welch_p(a, b)
            table.append({"variant": name, "metric": metric, "n": len(a), "n_ref": len(b),
                          "mean": a.mean() if len(a) else np.nan,
                          "mean_ref": b.mean() if len(b) else np.nan,
                          "delta": (a.mean() - b.mean()) if len(a) and len(b) else np.nan,
                          "p": p, "detected": bool(p < 0.05)})
    return pd.DataFrame(table)


def markdown(table: pd.DataFrame, minutes: float) -> str:
    """Variants as rows, metrics as columns: Δ vs the correct cell, * when p < 0.05."""
    cells = table.assign(text=[f"{d:+.2f}" + ("*" if det else "") if not np.isnan(d) else "—"
                               for d, det in zip(table["delta"], table["detected"], strict=True)])
    wide = cells.pivot(index="variant", columns="metric", values="text")[list(METRICS)]
    detected = table[table["metric"] == PRIMARY].set_index("variant")["detected"]
    wide.insert(0, "detected by the primary metric", detected.map({True: "yes", False: "no"}))
    n_tests = len(METRICS)
    caption = (f"*Sensitivity grid (docs/METHOD.md §7): each planted SoftMask bug (and ALBEF) "
               f"vs the correct SoftMask cell, tiny preset, 3 seeds each; Δ of the means, * = "
               f"two-sided Welch's t-test p < 0.05. {n_tests} metrics tested per variant, no "
               f"correction (about {0.05 * n_tests:.1f} false marks per row expected by chance "
               f"alone); primary metric {PRIMARY}, declared before the grid ran. Mutant runs: "
               f"{minutes:.0f} min on this machine.*")
    return caption + "\n\n" + wide.reset_index().to_markdown(index=False) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot(index="variant", columns="metric", values="p")[list(METRICS)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(METRICS), 0.8 + 0.4 * len(grid)))
    im = ax.imshow(-np.log10(grid.to_numpy(dtype=float)), cmap="viridis", vmin=0, vmax=3)
    ax.set_xticks(range(len(METRICS)), METRICS, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(grid)), grid.index, fontsize=7)
    for (i, j), p in np.ndenumerate(grid.to_numpy(dtype=float)):
        ax.text(j, i, "*" if p < 0.05 else "", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label="-log10 Welch p vs correct SoftMask")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def run_mutants(names: Sequence[str], runs_root: Path, seeds: int) -> float:
    """Train the SoftMask cell once per planted bug; returns the minutes it took."""
    start = time.time()
    catalog = {m.name: m for m in method_bugs.MUTATIONS}
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as tmp:
        root = scratch_copy(Path(tmp))
        for name in names:
            originals = apply(catalog[name], root)
            try:
                _grid(root, runs_root / "mutants" / name, ["softmask"], seeds)
            finally:
                restore(originals)
    return (time.time() - start) / 60


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-root", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=REPO / "results" / "sensitivity")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mutants", nargs="*", default=list(method_bugs.TRAINABLE_SOFTMASK))
    args = p.parse_args(argv)
    runs_root = args.runs_root.resolve()
    _grid(REPO, runs_root, ["albef", "softmask"], args.seeds)
    minutes = run_mutants(args.mutants, runs_root, args.seeds)
    rows = {"softmask (correct)": seed_metrics(runs_root / GRID, "softmask"),
            "albef": seed_metrics(runs_root / GRID, "albef")}
    for name in args.mutants:
        rows[name] = seed_metrics(runs_root / "mutants" / name / GRID, "softmask")
    table = compare(rows, "softmask (correct)")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "sensitivity.csv", index=False)
    (args.out / "sensitivity.md").write_text(markdown(table, minutes))
    plot(table, args.out / "sensitivity.png")
    (args.out / "raw.json").write_text(json.dumps(
        {name: {str(s): m for s, m in seeds.items()} for name, seeds in rows.items()},
        indent=1, sort_keys=True) + "\n")
    print((args.out / "sensitivity.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
