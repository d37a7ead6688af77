"""``python -m model.cli.prepare sbu``: the command line of
model/data/prepare/sbu.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import sbu as source
from model.data.prepare.sbu import NAMINGS, prepare_sbu

HELP = "SBU Captions (url + caption text files, downloaded images) -> sbu.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sbu`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "sbu", HELP, source.__doc__, run)
    parser.add_argument(
        "--urls", type=Path, required=True, help="SBU_captioned_photo_dataset_urls.txt"
    )
    parser.add_argument(
        "--captions", type=Path, required=True, help="SBU_captioned_photo_dataset_captions.txt"
    )
    parser.add_argument("--images", type=Path, required=True, help="directory of downloaded images")
    parser.add_argument("--out", type=Path, required=True, help="output JSON, e.g. sbu.json")
    parser.add_argument(
        "--naming",
        choices=NAMINGS,
        default="basename",
        help="how image files are named: like the URL's basename, or by line index",
    )
    parser.add_argument(
        "--index-base", type=int, default=0, help="number of the first line for --naming index"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``sbu`` subcommand."""
    return call_converter(prepare_sbu, args, images_dir="images")
