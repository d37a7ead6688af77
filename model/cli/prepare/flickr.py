"""``python -m model.cli.prepare flickr``: the command line of
model/data/prepare/flickr.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import flickr as source
from model.data.prepare.flickr import DEFAULT_IMAGE_DIR, prepare_flickr

HELP = "Flickr30K + Karpathy split -> flickr_{train,val,test}.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flickr`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "flickr", HELP, source.__doc__, run)
    parser.add_argument("--karpathy", type=Path, required=True, help="dataset_flickr30k.json")
    parser.add_argument(
        "--image-dir",
        default=DEFAULT_IMAGE_DIR,
        help=f"folder of the images below the image root (default: {DEFAULT_IMAGE_DIR})",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``flickr`` subcommand."""
    return call_converter(prepare_flickr, args)
