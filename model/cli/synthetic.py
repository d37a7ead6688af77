"""``python -m model.cli.synthetic --out DIR``: write the generated synthetic set
(model/data/synthetic/), or reuse it when the same spec is already there, and print its counts.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from model.data.synthetic import SyntheticSpec, generate


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; defaults come from SyntheticSpec."""
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m model.cli.synthetic",
        description="Generate the synthetic compositional image-caption dataset.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (image root)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--n-train", type=int, default=defaults.n_train_images)
    parser.add_argument("--n-test", type=int, default=defaults.n_test_images)
    parser.add_argument("--n-val", type=int, default=defaults.n_val_images)
    parser.add_argument("--captions-per-image", type=int, default=defaults.captions_per_image)
    parser.add_argument(
        "--single-object-fraction", type=float, default=defaults.single_object_fraction
    )
    parser.add_argument(
        "--holdout-eval-scenes",
        action="store_true",
        help="keep test/val scene descriptions out of training (compositional generalisation)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate (or reuse) a dataset and print its counts."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    spec = SyntheticSpec(
        seed=args.seed,
        n_train_images=args.n_train,
        n_test_images=args.n_test,
        n_val_images=args.n_val,
        captions_per_image=args.captions_per_image,
        image_size=args.image_size,
        single_object_fraction=args.single_object_fraction,
        holdout_eval_scenes=args.holdout_eval_scenes,
    )
    paths = generate(args.out, spec)
    manifest = json.loads(paths.manifest_file.read_text(encoding="utf-8"))
    print(f"synthetic dataset at {paths.root} (spec {manifest['spec_hash']})")
    for split, counts in manifest["counts"].items():
        print(f"  {split}: {counts}")
    print(f"  vocab_size: {manifest['vocab_size']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
