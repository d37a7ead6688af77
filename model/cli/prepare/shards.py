"""Tar shards for streaming pre-training (``data.format = shards``).

``shards``: convert ALBEF caption files (+ their image folder) into webdataset shards
``NNNNN.tar`` (``key.<image ext>`` with the file's own bytes, ``key.txt`` the first caption,
``key.json`` {"caption": the caption field as written, "image": its path}) and the index
``shards.json`` that a config names in ``data.shards.index``.

``shard-index``: write ``shards.json`` for shards that exist already, e.g. img2dataset output
(``--output_format webdataset``): the sample counts come from img2dataset's
``NNNNN_stats.json`` files when they are there, else from reading every shard. Shards may be
given as brace patterns (``'data/{00000..00127}.tar'``) or remote URLs (``pipe:aws s3 cp
s3://bucket/00000.tar -``; a remote shard without stats is read once to count it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.cli.prepare.common import new_subparser
from model.data.datasets import AnnotationError
from model.data.jsonio import DataFileError
from model.data.shards import (
    ShardError,
    expand_shard_urls,
    index_shards,
    read_shard_index,
    write_shards,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``shards`` and ``shard-index`` on the ``python -m model.cli.prepare`` line."""
    parser = new_subparser(subparsers, "shards", "ALBEF caption files -> tar shards + index",
                           __doc__, run_shards)
    parser.add_argument("--ann", type=Path, nargs="+", required=True,
                        help="ALBEF pre-training caption files (JSON lists)")
    parser.add_argument("--image-root", type=Path, required=True,
                        help="folder the entries' image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    parser.add_argument("--maxcount", type=int, default=10_000,
                        help="samples per shard (img2dataset's default: 10000)")
    index = new_subparser(subparsers, "shard-index", "index existing tar shards (img2dataset)",
                          __doc__, run_index)
    index.add_argument("shards", nargs="+", help="shard paths, brace patterns or URLs")
    index.add_argument("--out", type=Path, required=True, help="the index file, e.g. "
                       "DIR/shards.json (shards inside DIR are stored relative to it)")


def _summary(path: Path) -> str:
    index = read_shard_index(path)
    return (f"{len(index.urls)} shards, {index.total} samples\nindex: {path}\n"
            f"train with: --set data.format=shards --set data.shards.index={path}")


def run_shards(args: argparse.Namespace) -> str:
    """Run the ``shards`` subcommand."""
    if args.maxcount < 1:
        raise DataFileError(f"--maxcount must be >= 1, got {args.maxcount}")
    try:
        return _summary(write_shards(args.ann, args.image_root, args.out, args.maxcount))
    except (ShardError, AnnotationError, FileNotFoundError) as err:
        raise DataFileError(str(err)) from err


def run_index(args: argparse.Namespace) -> str:
    """Run the ``shard-index`` subcommand."""
    urls = [u for pattern in args.shards for u in expand_shard_urls(pattern)]
    try:
        return _summary(index_shards(urls, args.out))
    except ShardError as err:
        raise DataFileError(str(err)) from err
