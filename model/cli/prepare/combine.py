"""``python -m model.cli.prepare combine``: the command line of
model/data/prepare/combine.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    new_subparser,
    progress_flag,
)
from model.data.prepare import combine as combine_module
from model.data.prepare.combine import SOURCES, CombineResult, combine

HELP = "join coco/vg/sbu/cc3m pre-training files into pretrain_4m.json + counts table"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``combine`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "combine", HELP, combine_module.__doc__, run)
    for source in SOURCES:
        parser.add_argument(
            f"--{source}", type=Path, nargs="+", default=[], help=f"{source} pre-training file(s)"
        )
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory")
    parser.add_argument("--name", default="pretrain_4m", help="output file stem")
    parser.add_argument(
        "--manifest-only",
        action="store_true",
        help="do not write the combined JSON; only the manifest and the counts",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show progress bars")


def run(args: argparse.Namespace) -> CombineResult:
    """Run the ``combine`` subcommand."""
    return combine(
        sources={source: getattr(args, source) for source in SOURCES},
        out_dir=args.out_dir,
        name=args.name,
        write_combined=not args.manifest_only,
        show_progress=progress_flag(args),
    )
