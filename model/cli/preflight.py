"""``python -m model.cli.preflight ANN... --image-root DIR``: check caption files and their images
before training (model/data/preflight.py); exit status 0 if all is well, 1 on problems, 2 on bad
arguments."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from model.data.preflight import preflight


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m model.cli.preflight``."""
    parser = argparse.ArgumentParser(
        prog="python -m model.cli.preflight",
        description="Check caption JSON files and their images before training.",
    )
    parser.add_argument("ann_files", type=Path, nargs="+", help="annotation JSON file(s)")
    parser.add_argument("--image-root", type=Path, required=True, help="root of the image paths")
    parser.add_argument("--sample", type=int, help="check N random images per file (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")
    parser.add_argument("--no-decode", action="store_true", help="only check that images exist")
    parser.add_argument("--workers", type=int, default=0, help="image-check threads (default: 0)")
    parser.add_argument("--max-problems", type=int, default=20, help="problems listed (default 20)")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preflight CLI; exit status 0 if all is well, 1 on problems, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.sample is not None and args.sample < 0:
        print(f"error: --sample must be >= 0, got {args.sample}", file=sys.stderr)
        return 2
    report = preflight(
        args.ann_files,
        args.image_root,
        sample=args.sample,
        seed=args.seed,
        decode=not args.no_decode,
        workers=args.workers,
        max_problems=args.max_problems,
    )
    text = report.to_markdown()
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
