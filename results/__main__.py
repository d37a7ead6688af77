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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from model.safe_paths import name_problem, output_dir_problem
from results.collect import (
    CURVE_COLUMNS,
    collect_runs,
    deduplicate,
    frame_to_records,
    load_curves,
    records_to_frame,
    select_runs,
)
from results.paper import PAPER_PATH, load_paper
from results.plots import plot_curves, plot_table
from results.raw_files import raw_destination
from results.raw_format import RawFileError, fill_steps, merge_with_raw, read_raw_file, write_raw
from results.recipes import UNKNOWN, Plan, adopt_plan, recipes_in
from results.tables import (
    SPECS_PATH,
    Specs,
    build_tables,
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
    parser.add_argument(
        "--replace",
        action="store_true",
        help="--runs: merge the collected runs into <grid>.jsonl even when its rows are of "
        "another grid recipe (they are then replaced cell by cell); by default another recipe "
        "goes to its own raw file and table folder",
    )
    parser.add_argument(
        "--fingerprint",
        help="--raw: build the tables for this grid recipe (default: the reference cell's)",
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


@dataclass
class Output:
    """One set of tables: the runs of one grid recipe, where their raw summary and tables go."""

    frame: pd.DataFrame  # this recipe's runs, plus other recipes' runs (listed as excluded)
    curves: pd.DataFrame
    fingerprint: str | None
    out: Path
    raw: Path | None = None


def _fingerprints(frame: pd.DataFrame, first: str | None) -> list[str]:
    """The recipes of the runs in ``frame`` (``first`` leading)."""
    found = frame.loc[frame["status"] != "missing", "fingerprint"].fillna(UNKNOWN)
    return list(dict.fromkeys([*([first] if first is not None else []), *found]))


def _collected(args: argparse.Namespace, cells: list[str], plan: Plan | None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run directories of the grid (with the plan's recipe on its runs); empty frames when a
    planned grid has none yet (its raw summary alone is then regenerated)."""
    try:
        frame = collect_runs(args.runs, args.grid, cells=cells, seeds=args.seeds,
                             preset=args.preset)
    except ValueError:
        if plan is None:
            raise
        logger.info("no run directories of %s under %s: regenerating from the raw summary",
                    args.grid, args.runs)
        return records_to_frame([]), pd.DataFrame(columns=CURVE_COLUMNS)
    frame = adopt_plan(frame, plan)
    return frame, load_curves(args.runs, args.grid, runs=frame)


def from_runs(args: argparse.Namespace, cells: list[str], reference: str,
              plan: Plan | None = None) -> list[Output]:
    """Collect run dirs and merge each grid recipe into its own raw summary (unless
    --no-raw): the grid's file when it holds that recipe (or --replace), else a file and a
    table folder named after the settings that differ (results/raw_files.py)."""
    frame, curves = _collected(args, cells, plan)
    if frame.empty and not (args.raw_dir / f"{args.grid}.jsonl").is_file():
        raise ValueError(f"no run directories of grid {args.grid} under {args.runs} and no raw "
                         f"summary {args.raw_dir / f'{args.grid}.jsonl'}: nothing to collect")
    first = plan.fingerprint if plan is not None else None
    if args.no_raw:
        return [Output(frame, curves, first, args.out)]
    grids = sorted(frame.loc[frame["status"] != "missing", "grid"].dropna().unique())
    name = args.grid or (grids[0] if len(grids) == 1 else "all")
    outputs = []
    for fp in _fingerprints(frame, first) or [first]:
        mine = frame[(frame["status"] == "missing") | (frame["fingerprint"].fillna(UNKNOWN) == fp)]
        dest = raw_destination(args.raw_dir, name, fp, recipes_in(mine).get(fp or "", {}),
                               reference, replace=args.replace or args.no_merge, plan=plan,
                               skip_bad=args.skip_bad)
        own = curves[curves["run_id"].isin(set(mine["run_id"].dropna()))]
        merged, merged_curves = mine, own
        if not args.no_merge:  # a partial grid updates its own rows, keeps every other row
            merged, merged_curves = merge_with_raw(mine, own, dest.path, args.skip_bad)
            merged = adopt_plan(merged, plan)
        write_raw(merged, dest.path, merged_curves)
        dest.announce(fp)
        skipped = merged.attrs.get("skipped_lines", 0)
        others = frame[(frame["status"] != "missing")
                       & (frame["fingerprint"].fillna(UNKNOWN) != fp)]
        table = select_runs(pd.concat([merged, others], ignore_index=True),
                            preset=args.preset, cells=cells, seeds=args.seeds)
        table = fill_steps(table, pd.concat([merged_curves, curves], ignore_index=True))
        table.attrs["skipped_lines"] = skipped
        out = args.out if dest.variant is None else args.out / dest.variant
        outputs.append(Output(table, merged_curves, fp, out, dest.path))
    return outputs


def from_raw(args: argparse.Namespace, cells: list[str]) -> list[Output]:
    """Rebuild frame and curves from raw summaries (a cell/seed in two files: newest wins)."""
    files = [read_raw_file(path, args.skip_bad) for path in args.raw]
    records = [r for runs, _ in files for r in frame_to_records(runs)]
    frame = records_to_frame(deduplicate(records))
    frame = select_runs(frame, preset=args.preset, cells=cells, seeds=args.seeds)
    frame.attrs["skipped_lines"] = sum(runs.attrs.get("skipped_lines", 0) for runs, _ in files)
    curves = pd.concat([c for _, c in files], ignore_index=True)
    frame = fill_steps(frame, curves)
    live = set(frame.loc[frame["status"].isin(["done", "running"]), "run_id"].dropna())
    return [Output(frame, curves[curves["run_id"].isin(live)], args.fingerprint, args.out)]


def regenerate(output: Output, specs: Specs, paper_path: Path, cells: list[str]) -> list[Path]:
    """Write every table (md/tex/csv/png), the curves figure and summary.md into the
    output's folder, for its grid recipe."""
    paper = load_paper(paper_path)
    frame, out = output.frame, output.out
    skipped = frame.attrs.get("skipped_lines", 0)
    note = f"{skipped} malformed raw line(s) were skipped (--skip-bad)." if skipped else ""
    results = build_tables(frame, specs, paper, note=note, fingerprint=output.fingerprint)
    written: list[Path] = []
    for name, result in results.items():
        written += write_table(result, out)
        written.append(plot_table(result, out / f"{name}.png", paper))
    shown = set(frame.loc[frame["fingerprint"].fillna(UNKNOWN) == (output.fingerprint or ""),
                          "run_id"].dropna()) if output.fingerprint is not None else None
    curves = output.curves if shown is None else \
        output.curves[output.curves["run_id"].isin(shown)]
    curve_path = plot_curves(curves, out / "curves.png", cells=cells)
    if curve_path is not None:
        written.append(curve_path)
    written.append(write_summary(results, out / "summary.md", paper))
    return written


def output_problems(args: argparse.Namespace) -> list[str]:
    """Bad output folders and grid names, found before anything is read or written."""
    problems = []
    if args.grid is not None and (why := name_problem(args.grid)) is not None:
        problems.append(f"--grid: {why}")
    outs = [("--out", args.out)] + ([("--raw-dir", args.raw_dir)]
                                    if args.runs and not args.no_raw else [])
    problems += [f"{flag} {path}: {why}" for flag, path in outs
                 if (why := output_dir_problem(path)) is not None]
    return problems


def run(args: argparse.Namespace, plan: Plan | None = None) -> int:
    """Regenerate as ``args`` say; ``plan``: the grid invocation's recipe and runs
    (ablations/run_grid.py). Returns the process exit status."""
    problems = output_problems(args)
    if problems:
        for problem in problems:
            logger.error("%s", problem)
        return 2
    try:
        specs = load_specs(args.specs)
        cells = spec_cells(specs)
        outputs = (from_runs(args, cells, specs.reference, plan) if args.runs
                   else from_raw(args, cells))
        written = [p for o in outputs for p in regenerate(o, specs, args.paper, cells)]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
