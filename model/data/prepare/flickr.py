"""Flickr30K with Karpathy's split → retrieval caption files.

Input: Karpathy's ``dataset_flickr30k.json`` (same format as ``dataset_coco.json`` but without
``filepath``/``cocoid``); the images are expected in one folder, ``flickr30k-images/`` by default.

Outputs (in ``--out-dir``): ``flickr_train.json`` (train, plus restval if the file has any; one
entry per caption with ``image_id``), ``flickr_val.json`` and ``flickr_test.json`` (1K images each,
one entry per image with its caption list, in split order). Flickr30K is not part of the 4M
pre-training corpus, so no pre-training file is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.data.prepare import (
    PrepareSummary,
    add_common_arguments,
    call_converter,
    caption_transform,
    new_subparser,
    note_raw_captions,
)
from model.data.prepare.coco import (
    build_split_entries,
    karpathy_split_stats,
    read_karpathy,
    write_karpathy_outputs,
)

DEFAULT_IMAGE_DIR = "flickr30k-images"
# One-line description in ``python -m model.data.prepare --help``.
HELP = "Flickr30K + Karpathy split -> flickr_{train,val,test}.json"


def prepare_flickr(
    karpathy: Path,
    out_dir: Path,
    image_dir: str = DEFAULT_IMAGE_DIR,
    image_prefix: str = "",
    clean_captions: bool = False,
    max_words: int = 30,
    show_progress: bool | None = None,
) -> PrepareSummary:
    """Convert Flickr30K + Karpathy split into ``flickr_{train,val,test}.json``.

    Args:
        karpathy: Karpathy's ``dataset_flickr30k.json``.
        out_dir: Output directory (created if needed).
        image_dir: Folder (relative to the image root) holding the ``<id>.jpg`` files.
        image_prefix: Prefix for every written image path (e.g. ``"flickr30k/"``).
        clean_captions: Apply ALBEF's ``pre_caption`` now instead of at load time.
        max_words: Word limit for ``clean_captions``.
        show_progress: Force progress bars on/off (None: only on a terminal).
    """
    transform = caption_transform(clean_captions, max_words)
    images = read_karpathy(karpathy, "flickr30k", image_dir.strip("/"), show_progress)
    summary = PrepareSummary("flickr30k", stats=karpathy_split_stats(images))
    entries, skipped = build_split_entries(images, transform, image_prefix)
    summary.stats["skipped_empty_captions"] = skipped
    summary.outputs = write_karpathy_outputs(entries, out_dir, "flickr", pretrain=False)
    note_raw_captions(summary, clean_captions)
    return summary


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flickr`` on the ``python -m model.data.prepare`` command line."""
    parser = new_subparser(subparsers, "flickr", HELP, __doc__, run)
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
