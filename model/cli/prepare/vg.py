"""``python -m model.cli.prepare vg``: the command line of
model/data/prepare/vg.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import vg as source
from model.data.prepare.vg import prepare_vg

HELP = "Visual Genome region descriptions -> vg.json (pre-training)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vg`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "vg", HELP, source.__doc__, run)
    parser.add_argument("--regions", type=Path, required=True, help="region_descriptions.json")
    parser.add_argument("--image-data", type=Path, required=True, help="image_data.json")
    parser.add_argument("--out", type=Path, required=True, help="output JSON, e.g. vg.json")
    parser.add_argument(
        "--images", type=Path, help="VG image root (VG_100K/, VG_100K_2/); keeps only found images"
    )
    parser.add_argument(
        "--exclude-coco-karpathy",
        type=Path,
        metavar="DATASET_COCO_JSON",
        help="drop VG images that are COCO Karpathy val/test images (as ALBEF does)",
    )
    parser.add_argument(
        "--dedupe-phrases", action="store_true", help="drop repeated phrases within an image"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``vg`` subcommand."""
    return call_converter(prepare_vg, args, region_descriptions="regions", images_dir="images")
