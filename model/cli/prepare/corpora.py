"""``python -m model.cli.prepare coco | flickr | vg | sbu | cc3m | combine``: the command lines
of the corpus converters in model/data/prepare/ (each sub-command's --help shows its
converter's documentation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import (
    add_common_arguments,
    call_converter,
    new_subparser,
    progress_flag,
)
from model.data.prepare import PrepareSummary
from model.data.prepare import cc3m as cc3m_converter
from model.data.prepare import coco as coco_converter
from model.data.prepare import combine as combine_converter
from model.data.prepare import flickr as flickr_converter
from model.data.prepare import sbu as sbu_converter
from model.data.prepare import vg as vg_converter
from model.data.prepare.cc3m import LAYOUTS, prepare_cc3m
from model.data.prepare.coco import prepare_coco
from model.data.prepare.combine import SOURCES, CombineResult, combine
from model.data.prepare.flickr import DEFAULT_IMAGE_DIR, prepare_flickr
from model.data.prepare.sbu import NAMINGS, prepare_sbu
from model.data.prepare.vg import prepare_vg

HELP = {
    'coco': "COCO 2014 + Karpathy split -> coco_{train,val,test,pretrain}.json",
    'flickr': "Flickr30K + Karpathy split -> flickr_{train,val,test}.json",
    'vg': "Visual Genome region descriptions -> vg.json (pre-training)",
    'sbu': "SBU Captions (url + caption text files, downloaded images) -> sbu.json",
    'cc3m': "Conceptual Captions (TSV + downloaded images) -> cc3m_<split>.json",
    'combine': "join coco/vg/sbu/cc3m pre-training files into pretrain_4m.json + counts table",
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register every corpus converter on the ``python -m model.cli.prepare`` command line."""
    add_coco(subparsers)
    add_flickr(subparsers)
    add_vg(subparsers)
    add_sbu(subparsers)
    add_cc3m(subparsers)
    add_combine(subparsers)


def add_coco(subparsers: argparse._SubParsersAction) -> None:
    """Register ``coco`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "coco", HELP["coco"],
                           coco_converter.__doc__, run_coco)
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


def run_coco(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``coco`` subcommand."""
    return call_converter(prepare_coco, args)


def add_flickr(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flickr`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "flickr", HELP["flickr"],
                           flickr_converter.__doc__, run_flickr)
    parser.add_argument("--karpathy", type=Path, required=True, help="dataset_flickr30k.json")
    parser.add_argument(
        "--image-dir",
        default=DEFAULT_IMAGE_DIR,
        help=f"folder of the images below the image root (default: {DEFAULT_IMAGE_DIR})",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory")
    add_common_arguments(parser)


def run_flickr(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``flickr`` subcommand."""
    return call_converter(prepare_flickr, args)


def add_vg(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vg`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "vg", HELP["vg"],
                           vg_converter.__doc__, run_vg)
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


def run_vg(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``vg`` subcommand."""
    return call_converter(prepare_vg, args, region_descriptions="regions", images_dir="images")


def add_sbu(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sbu`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "sbu", HELP["sbu"],
                           sbu_converter.__doc__, run_sbu)
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


def run_sbu(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``sbu`` subcommand."""
    return call_converter(prepare_sbu, args, images_dir="images")


def add_cc3m(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cc3m`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "cc3m", HELP["cc3m"],
                           cc3m_converter.__doc__, run_cc3m)
    parser.add_argument("--images", type=Path, required=True, help="download directory")
    parser.add_argument("--out", type=Path, required=True, help="output JSON, e.g. cc3m_train.json")
    parser.add_argument("--tsv", type=Path, help="Train_GCC-training.tsv (or the validation TSV)")
    parser.add_argument("--layout", choices=LAYOUTS, default="img2dataset", help="download layout")
    parser.add_argument(
        "--index-base", type=int, default=0, help="number of the first TSV row for --layout index"
    )
    add_common_arguments(parser)


def run_cc3m(args: argparse.Namespace) -> PrepareSummary:
    """Run the ``cc3m`` subcommand."""
    return call_converter(prepare_cc3m, args, images_dir="images")


def add_combine(subparsers: argparse._SubParsersAction) -> None:
    """Register ``combine`` on the ``python -m model.cli.prepare`` command line."""
    parser = new_subparser(subparsers, "combine", HELP["combine"],
                           combine_converter.__doc__, run_combine)
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


def run_combine(args: argparse.Namespace) -> CombineResult:
    """Run the ``combine`` subcommand."""
    return combine(
        sources={source: getattr(args, source) for source in SOURCES},
        out_dir=args.out_dir,
        name=args.name,
        write_combined=not args.manifest_only,
        show_progress=progress_flag(args),
    )
