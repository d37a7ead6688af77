"""Command line: ``python -m model.cli.prepare <source> [options]``.

Sources: ``coco``, ``flickr``, ``vg``, ``sbu``, ``cc3m`` (one converter each), ``combine``
(the "4M" pre-training corpus), the downstream tasks ``snli-ve``, ``nlvr2``, ``vqa``, and
``shards`` / ``shard-index`` (tar shards for streaming pre-training).
``python -m model.cli.prepare <source> --help`` lists the options and the expected input
layout; docs/DATA.md has the full walk-through.

Exit status: 0 on success, 2 when an input is missing or malformed (the message names the file
and the offending entry).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from model.cli.prepare import corpora, shards, tasks
from model.data.jsonio import DataFileError
from model.data.prepare import PrepareSummary
from model.data.prepare.combine import CombineResult


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per source."""
    parser = argparse.ArgumentParser(
        prog="python -m model.cli.prepare",
        description="Convert public caption datasets into ALBEF-style JSON files.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only log warnings and errors")
    subparsers = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    corpora.add_parsers(subparsers)
    tasks.add_parser(subparsers)
    shards.add_parser(subparsers)
    return parser


def _report(result: PrepareSummary | CombineResult | str) -> str:
    """Text printed after a successful run."""
    if isinstance(result, str):
        return result
    if isinstance(result, PrepareSummary):
        return result.to_text()
    lines = [result.table.to_markdown(index=False), ""]
    lines.extend(f"{kind}: {path}" for kind, path in result.outputs.items())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen converter and print its summary."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.run(args)
    except DataFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
