"""``python -m model.cli.prepare cc3m``: the command line of
model/data/prepare/cc3m.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import cc3m as source
from model.data.prepare.cc3m import LAYOUTS, prepare_cc3m

HELP = "Conceptual Captions (TSV + downloaded images) -> cc3m_<split>.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cc3m`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "cc3m", HELP, source.__doc__, run)
    parser.add_argument("--images", type=Path, required=True, help="download directory")
    parser.add_argument("--out", type=Path, required=True, help="output JSON, e.g. cc3m_train.json")
    parser.add_argument("--tsv", type=Path, help="Train_GCC-training.tsv (or the validation TSV)")
    parser.add_argument("--layout", choices=LAYOUTS, default="img2dataset", help="download layout")
    parser.add_argument(
        "--index-base", type=int, default=0, help="number of the first TSV row for --layout index"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``cc3m`` subcommand."""
    return call_converter(prepare_cc3m, args, images_dir="images")
