"""Writing a generated set in ALBEF's file formats, cached by its spec (the manifest is written
last)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from model.data.synthetic.captions import Triple, hard_negatives, relation_caption, scene_captions
from model.data.synthetic.render import Box, render_scene_with_boxes
from model.data.synthetic.scenes import sample_eval_scenes, sample_train_scenes, split_rng
from model.data.synthetic.spec import FORMAT_VERSION, Scene, SceneObject, SyntheticSpec
from model.data.tokenizer import build_wordpiece_vocab

logger = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 6  # fixed explicitly: PNG bytes must not depend on a Pillow default

@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives. ``root`` is the image root of every JSON file."""

    root: Path
    train_file: Path
    test_file: Path
    val_file: Path | None
    coco_file: Path
    negatives_file: Path
    boxes_file: Path
    vocab_file: Path
    manifest_file: Path


@dataclass(frozen=True)
class _Record:
    """One rendered image: its path relative to the root, captions, and main relation triple."""

    image: str
    captions: list[str]
    main: Triple | None
    objects: tuple[SceneObject, ...] = ()
    boxes: tuple[Box, ...] = ()


def _render_split(
    split: str, scenes: list[Scene], spec: SyntheticSpec, root: Path
) -> list[_Record]:
    """Render and save one split's images; captions are drawn from the same stream."""
    rng = split_rng(spec, split)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(scenes):
        captions, main = scene_captions(scene, spec.captions_per_image, rng,
                                        spec.caption_style)
        pixels, boxes = render_scene_with_boxes(scene, spec, rng)
        relative = f"images/{split}/{index:06d}.png"
        Image.fromarray(pixels).save(
            root / relative, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        records.append(_Record(image=relative, captions=captions, main=main,
                               objects=scene.objects, boxes=tuple(boxes)))
    return records


def _write_json(path: Path, data: object) -> None:
    """Deterministic JSON (insertion order, fixed indent, trailing newline)."""
    path.write_text(json.dumps(data, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")


def _caption_entries(records: list[_Record]) -> list[dict[str, object]]:
    """ALBEF's caption-file entries: {"image": path, "caption": [captions]}."""
    return [{"image": r.image, "caption": list(r.captions)} for r in records]


def _coco_captions(records: list[_Record], size: int) -> dict[str, object]:
    """The COCO captions format; image ids follow the order of ``test.json`` (starting at 1)."""
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record.image, "width": size, "height": size})
        for caption in record.captions:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "caption": caption}
            )
    info = {
        "description": "synthetic compositional shapes (test split)",
        "version": str(FORMAT_VERSION),
    }
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


def _negative_entries(records: list[_Record]) -> list[dict[str, object]]:
    """Hard negatives for every two-object image, plus an easy reference negative ("random":
    the main caption of the two-object image half the list away, a different scene since test
    descriptions are distinct): accuracy on it says whether ITM matches at all."""
    pairs = [r for r in records if r.main is not None]
    return [
        {
            "image": r.image,
            "caption": relation_caption(*r.main),
            "negatives": {
                **hard_negatives(*r.main),
                **({"random": relation_caption(*pairs[(i + len(pairs) // 2) % len(pairs)].main)}
                   if len(pairs) > 1 else {}),
            },
        }
        for i, r in enumerate(pairs)
    ]


def _box_entries(records: list[_Record]) -> list[dict[str, object]]:
    """Every image's first caption and, per object, its words and box (pixels, x0 y0 x1 y1)."""
    return [
        {
            "image": r.image,
            "caption": r.captions[0],
            "objects": [
                {"colour": o.colour, "shape": o.shape, "size": o.size,
                 "box": [round(v, 3) for v in box]}
                for o, box in zip(r.objects, r.boxes, strict=True)
            ],
        }
        for r in records
    ]


def _split_counts(records: list[_Record]) -> dict[str, int]:
    """Images, captions and the one/two-object breakdown of a split (for the manifest)."""
    two = sum(r.main is not None for r in records)
    return {
        "images": len(records),
        "captions": sum(len(r.captions) for r in records),
        "single_object": len(records) - two,
        "two_object": two,
    }


_FILE_NAMES = {
    "train": "train.json",
    "val": "val.json",
    "test": "test.json",
    "coco": "test_coco.json",
    "negatives": "test_negatives.json",
    "boxes": "test_boxes.json",
    "vocab": "vocab.txt",
}


def _paths(root: Path, has_val: bool) -> SyntheticPaths:
    """The dataset's file layout under ``root``."""
    return SyntheticPaths(
        root=root,
        train_file=root / _FILE_NAMES["train"],
        test_file=root / _FILE_NAMES["test"],
        val_file=root / _FILE_NAMES["val"] if has_val else None,
        coco_file=root / _FILE_NAMES["coco"],
        negatives_file=root / _FILE_NAMES["negatives"],
        boxes_file=root / _FILE_NAMES["boxes"],
        vocab_file=root / _FILE_NAMES["vocab"],
        manifest_file=root / "manifest.json",
    )


def _read_manifest(path: Path) -> dict[str, object] | None:
    """The existing manifest, {} if it is unreadable, None if there is none."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable synthetic manifest %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _is_complete(paths: SyntheticPaths) -> bool:
    """Whether every file of a generated dataset is present."""
    files = [
        paths.train_file,
        paths.test_file,
        paths.coco_file,
        paths.negatives_file,
        paths.boxes_file,
        paths.vocab_file,
    ]
    if paths.val_file is not None:
        files.append(paths.val_file)
    return all(f.is_file() for f in files) and (paths.root / "images").is_dir()


def _remove_previous(root: Path) -> None:
    """Delete a previous generation's outputs (only called when its manifest proves it is ours)."""
    (root / "manifest.json").unlink(missing_ok=True)
    for name in _FILE_NAMES.values():
        (root / name).unlink(missing_ok=True)
    if (root / "images").is_dir():
        shutil.rmtree(root / "images")


def generate(root: str | Path, spec: SyntheticSpec | None = None) -> SyntheticPaths:
    """Generate the dataset under ``root``, or reuse it if the same spec was generated there.

    The manifest is written last, so an interrupted generation is redone on the next call. A
    different spec over an earlier generation deletes that generation's files first (only files
    this module writes; nothing else in ``root`` is touched). Two processes must not generate
    into the same ``root`` at the same time.

    Args:
        root: Output directory; it becomes the ``image_root`` of every JSON file.
        spec: What to generate (defaults to ``SyntheticSpec()``).

    Returns:
        The paths of the generated files.
    """
    spec = spec if spec is not None else SyntheticSpec()
    root = Path(root)
    paths = _paths(root, has_val=spec.n_val_images > 0)
    previous = _read_manifest(paths.manifest_file)
    if previous is not None and previous.get("spec_hash") == spec.hash() and _is_complete(paths):
        logger.info("synthetic dataset at %s is up to date (spec %s)", root, spec.hash())
        return paths
    start = time.perf_counter()
    test_scenes, val_scenes = sample_eval_scenes(spec)  # may reject the spec: before any I/O
    held_out = test_scenes + val_scenes if spec.holdout_eval_scenes else []
    if previous is not None:
        logger.info("regenerating synthetic dataset at %s (spec changed or files missing)", root)
        _remove_previous(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _render_split("train", sample_train_scenes(spec, held_out), spec, root),
        "test": _render_split("test", test_scenes, spec, root),
    }
    if val_scenes:
        splits["val"] = _render_split("val", val_scenes, spec, root)
    manifest = _write_annotations(paths, splits, spec)
    logger.info(
        "generated synthetic dataset at %s in %.1f s: %s",
        root,
        time.perf_counter() - start,
        json.dumps(manifest["counts"]),
    )
    return paths


def _write_annotations(
    paths: SyntheticPaths, splits: dict[str, list[_Record]], spec: SyntheticSpec
) -> dict[str, object]:
    """Write the JSON files, the vocabulary and, last, the manifest (returned)."""
    _write_json(paths.train_file, _caption_entries(splits["train"]))
    _write_json(paths.test_file, _caption_entries(splits["test"]))
    if paths.val_file is not None:
        _write_json(paths.val_file, _caption_entries(splits["val"]))
    _write_json(paths.coco_file, _coco_captions(splits["test"], spec.image_size))
    negatives = _negative_entries(splits["test"])
    _write_json(paths.negatives_file, negatives)
    _write_json(paths.boxes_file, _box_entries(splits["test"]))
    all_captions = [c for records in splits.values() for r in records for c in r.captions]
    build_wordpiece_vocab(all_captions, paths.vocab_file)
    counts: dict[str, object] = {name: _split_counts(records) for name, records in splits.items()}
    counts["test_negatives"] = len(negatives)
    manifest: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "spec_hash": spec.hash(),
        "spec": spec.to_dict(),
        "counts": counts,
        "vocab_size": len(paths.vocab_file.read_text(encoding="utf-8").splitlines()),
        "files": {key: name for key, name in _FILE_NAMES.items() if key != "val" or paths.val_file},
    }
    _write_json(paths.manifest_file, manifest)
    return manifest
