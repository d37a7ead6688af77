"""Regenerate the paper-style tables and plots.

From run directories (also writes the compact raw summary)::

    python -m results --runs RUNS_DIR [--grid GRID] --out results/generated

From committed raw summaries, without the run directories::

    python -m results --raw results/raw/GRID.jsonl --out results/generated
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from results.collect import (
    RawFileError,
    collect_runs,
    deduplicate,
    frame_to_records,
    load_curves,
    merge_with_raw,
    read_raw_file,
    records_to_frame,
    select_runs,
    write_raw,
)
from results.plots import plot_curves, plot_table
from results.tables import (
    PAPER_PATH,
    SPECS_PATH,
    Specs,
    build_tables,
    load_paper,
    load_specs,
    write_summary,
    write_table,
)

logger = logging.getLogger("results")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, help="directory holding <grid>/<run> dirs")
    source.add_argument("--raw", type=Path, nargs="+", help="raw summary file(s) (.jsonl)")
    parser.add_argument("--grid", help="grid to read from --runs (default: every grid)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/generated"),
        help="output directory for tables, plots and summary.md",
    )
    parser.add_argument(
        "--raw-dir",
        type=Path,
        default=Path("results/raw"),
        help="where --runs writes <grid>.jsonl (default results/raw)",
    )
    parser.add_argument("--no-raw", action="store_true", help="do not write the raw summary")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="--runs: overwrite the raw summary with the collected runs only (default: merge "
        "them into it, keeping the rows of cells and seeds that were not collected now)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop malformed raw lines (counted in the captions) instead of failing",
    )
    parser.add_argument("--preset", help="keep only runs of this preset (tiny/base)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="requested seeds (default: every seed seen in the runs)",
    )
    parser.add_argument("--specs", type=Path, default=SPECS_PATH, help="table_specs.yaml")
    parser.add_argument("--paper", type=Path, default=PAPER_PATH, help="paper_numbers.yaml")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser.parse_args(argv)


def spec_cells(specs: Specs) -> list[str]:
    """Every cell any table needs, in first-appearance order (each read once)."""
    return list(dict.fromkeys(c for spec in specs.tables.values() for c in spec.cells))


def from_runs(args: argparse.Namespace, cells: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect run dirs (and write the raw summary unless --no-raw)."""
    frame = collect_runs(args.runs, args.grid, cells=cells, seeds=args.seeds, preset=args.preset)
    curves = load_curves(args.runs, args.grid, runs=frame)
    if not args.no_raw:
        grids = sorted(frame.loc[frame["status"] != "missing", "grid"].dropna().unique())
        name = args.grid or (grids[0] if len(grids) == 1 else "all")
        path = args.raw_dir / f"{name}.jsonl"
        if not args.no_merge:  # a partial grid updates its own rows, keeps every other row
            frame, curves = merge_with_raw(frame, curves, path, args.skip_bad)
        write_raw(frame, path, curves)
        skipped = frame.attrs.get("skipped_lines", 0)
        frame = select_runs(frame, preset=args.preset, cells=cells, seeds=args.seeds)
        frame.attrs["skipped_lines"] = skipped
    return frame, curves


def from_raw(args: argparse.Namespace, cells: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild frame and curves from raw summaries (a cell/seed in two files: newest wins)."""
    files = [read_raw_file(path, args.skip_bad) for path in args.raw]
    records = [r for runs, _ in files for r in frame_to_records(runs)]
    frame = records_to_frame(deduplicate(records))
    frame = select_runs(frame, preset=args.preset, cells=cells, seeds=args.seeds)
    frame.attrs["skipped_lines"] = sum(runs.attrs.get("skipped_lines", 0) for runs, _ in files)
    curves = pd.concat([c for _, c in files], ignore_index=True)
    live = set(frame.loc[frame["status"].isin(["done", "running"]), "run_id"].dropna())
    return frame, curves[curves["run_id"].isin(live)]


def regenerate(
    frame: pd.DataFrame,
    curves: pd.DataFrame,
    out: Path,
    specs: Specs,
    paper_path: Path,
    cells: list[str],
) -> list[Path]:
    """Write every table (md/tex/csv/png), the curves figure and summary.md into ``out``."""
    paper = load_paper(paper_path)
    skipped = frame.attrs.get("skipped_lines", 0)
    note = f"{skipped} malformed raw line(s) were skipped (--skip-bad)." if skipped else ""
    results = build_tables(frame, specs, paper, note=note)
    written: list[Path] = []
    for name, result in results.items():
        written += write_table(result, out)
        written.append(plot_table(result, out / f"{name}.png", paper))
    curve_path = plot_curves(curves, out / "curves.png", cells=cells)
    if curve_path is not None:
        written.append(curve_path)
    written.append(write_summary(results, out / "summary.md", paper))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        specs = load_specs(args.specs)
        cells = spec_cells(specs)
        frame, curves = from_runs(args, cells) if args.runs else from_raw(args, cells)
        written = regenerate(frame, curves, args.out, specs, args.paper, cells)
    except RawFileError as err:
        for problem in err.problems:
            logger.error("%s", problem)
        logger.error("%d malformed raw line(s); fix them or pass --skip-bad", len(err.problems))
        return 2
    except ValueError as err:
        logger.error("%s", err)
        return 2
    logger.info("wrote %d file(s) to %s", len(written), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
