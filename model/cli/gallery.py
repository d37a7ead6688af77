"""``python -m model.cli.gallery --run-dir RUN``: the per-word Grad-CAM gallery of a trained run
(model/evaluation/gallery.py), from its evaluation split or from given image/caption pairs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from model.evaluation.gallery import GalleryResult, gradcam_gallery


def _load_config(run_dir: Path, sets: Sequence[str]):
    from model.config.experiment import build_experiment
    from model.config.loader import load_yaml_file, merge_layers, parse_dotlist
    from model.engine.run_io import CONFIG

    path = run_dir / CONFIG
    layers = [(str(path), load_yaml_file(path))]
    if sets:
        layers.append(("--set", parse_dotlist(sets)))
    merged, origins = merge_layers(layers)
    return build_experiment(merged, origins)


def _eval_pairs(cfg, sources, n: int
                ) -> tuple[list[Image.Image], list[str], list[list[list[float]]] | None]:
    """The first ``n`` evaluation images with their first caption, and their object boxes when
    the split has a boxes file (synthetic data)."""
    from model.engine.data import build_eval_dataset
    from model.evaluation.localisation import load_box_items

    dataset = build_eval_dataset(cfg, sources)
    by_image = ({item["image"]: [o["box"] for o in item["objects"]]
                 for item in load_box_items(sources.boxes_file)}
                if sources.boxes_file is not None else None)
    images, captions, boxes = [], [], []
    for i in range(min(n, len(dataset))):
        with Image.open(dataset.image_root / dataset.image_paths[i]) as raw:
            images.append(raw.convert("RGB"))
        captions.append(dataset.texts[dataset.img2txt[i][0]])
        if by_image is not None:
            boxes.append(by_image.get(str(dataset.image_paths[i]), []))
    return images, captions, boxes if by_image is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.cli.gallery",
                                description="Per-word Grad-CAM gallery of a trained run.")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (config.yaml)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="full checkpoint (default: RUN/checkpoint.pt)")
    p.add_argument("--n", type=int, default=6, help="pairs from the evaluation split")
    p.add_argument("--out", type=Path, default=None,
                   help="output PNG (default: RUN/gradcam_gallery.png)")
    p.add_argument("--image", action="append", default=[], type=Path,
                   help="image file (repeat; pairs with --caption in order)")
    p.add_argument("--caption", action="append", default=[], help="caption (repeat)")
    p.add_argument("--layer", type=int, default=None,
                   help="0-based fusion layer (default: the run's softmask.layer)")
    p.add_argument("--mask-word", type=int, default=None,
                   help="word index for the mask panel (default: random, seeded)")
    p.add_argument("--panel-size", type=int, default=128)
    p.add_argument("--max-words", type=int, default=12)
    p.add_argument("--no-blur", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (e.g. data.cache_dir=/data/cache)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of the checkpoint (trusted files only)")
    return p


def main(argv: Sequence[str] | None = None) -> GalleryResult:
    args = build_parser().parse_args(argv)
    if len(args.image) != len(args.caption):
        raise SystemExit(f"--image and --caption must pair up ({len(args.image)} images, "
                         f"{len(args.caption)} captions)")
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise SystemExit(f"--out {args.out}: the gallery is a PNG image; expected a file name "
                         "ending in .png")
    from model.build import build_objective
    from model.checkpoints import CheckpointReadError
    from model.data.transforms import build_transform
    from model.engine.data import build_tokenizer, resolve_sources, special_ids
    from model.engine.resume import checkpoint_path, load_objective_weights

    run_dir: Path = args.run_dir
    from model.config.loader import ConfigError

    try:  # a run folder from someone else: a bad or hostile config.yaml is one line, no code
        cfg = _load_config(run_dir, args.sets)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    sources = resolve_sources(cfg)
    tokenizer = build_tokenizer(sources)
    objective = build_objective(cfg, special_ids(tokenizer))
    ckpt = args.checkpoint or checkpoint_path(run_dir)
    if not Path(ckpt).is_file():
        raise SystemExit(f"no checkpoint at {ckpt} (pass --checkpoint)")
    try:
        load_objective_weights(objective, ckpt, trust_pickle=args.trust_pickle)
    except CheckpointReadError as exc:
        raise SystemExit(f"error: {exc}") from exc
    student = objective.student.to(args.device).eval()

    if args.image:
        images = []
        for path in args.image:
            with Image.open(path) as raw:
                images.append(raw.convert("RGB"))
        captions, boxes = list(args.caption), None
    else:
        images, captions, boxes = _eval_pairs(cfg, sources, args.n)
    out = args.out or run_dir / "gradcam_gallery.png"
    result = gradcam_gallery(
        student, tokenizer, images, captions,
        transform=build_transform("test", cfg.model.vision.image_size),
        layer=cfg.softmask.layer if args.layer is None else args.layer,
        out_path=out, mask_word=args.mask_word, panel_size=args.panel_size,
        blur=not args.no_blur, max_words=args.max_words, max_tokens=cfg.data.eval_max_tokens,
        seed=args.seed, boxes=boxes,
    )
    print(f"wrote {result.path} ({result.size[1]}x{result.size[0]} px, {len(result.rows)} rows, "
          f"layer {result.layer})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
