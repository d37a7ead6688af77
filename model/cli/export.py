"""``python -m model.cli.export FULL_CKPT OUT [--format albef]``: write a slim release
checkpoint (model/release.py) and print the sizes before and after."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from model.checkpoints import CheckpointReadError
from model.release import export_release


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the sizes before and after."""
    parser = argparse.ArgumentParser(
        prog="python -m model.cli.export",
        description="Write a slim release (student weights only) of a training checkpoint.")
    parser.add_argument("checkpoint", help="full training checkpoint (.pt) to read")
    parser.add_argument("out", help="release file to write")
    parser.add_argument("--format", choices=("ours", "albef"), default="ours",
                        help="key naming of the release (default: ours)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of the input (trusted files only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sizes = export_release(args.checkpoint, args.out, args.format,
                               trust_pickle=args.trust_pickle)
    except (FileNotFoundError, CheckpointReadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{sizes['input']}: {sizes['before_bytes']} bytes ({sizes['before_mb']:.2f} MB)\n"
          f"{sizes['output']}: {sizes['after_bytes']} bytes ({sizes['after_mb']:.2f} MB), "
          f"{sizes['tensors']} tensors, format {sizes['format']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
