"""``python -m model.cli.prepare coco``: the command line of
model/data/prepare/coco.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import coco as source
from model.data.prepare.coco import prepare_coco

HELP = "COCO 2014 + Karpathy split -> coco_{train,val,test,pretrain}.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``coco`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "coco", HELP, source.__doc__, run)
    parser.add_argument("--karpathy", type=Path, required=True, help="dataset_coco.json")
    parser.add_argument(
        "--official",
        type=Path,
        nargs="+",
        default=[],
        help="official captions_train2014.json captions_val2014.json (optional cross-check)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on cross-check mismatches (default: warn)"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``coco`` subcommand."""
    return call_converter(prepare_coco, args)
