"""COCO Captions 2014 with Karpathy's split → retrieval and pre-training caption files.

Input: Karpathy's ``dataset_coco.json`` (``{"images": [{"filepath", "filename", "split",
"cocoid", "sentences": [{"raw", ...}], ...}]}``) and, optionally, the official
``captions_train2014.json`` / ``captions_val2014.json`` to cross-check every Karpathy image
against the official annotations.

Outputs (in ``--out-dir``):

* ``coco_train.json``: Karpathy ``train`` + ``restval`` (≈113K images), one entry per caption with
  ``image_id`` (retrieval fine-tuning);
* ``coco_val.json`` / ``coco_test.json``: the 5K-image splits, one entry per image with the list of
  its captions, in split order;
* ``coco_pretrain.json``: the same train + restval captions in the pre-training format. This is
  what ALBEF's released ``coco.json`` covers; the paper's table reports 106K images / 533K
  captions instead, and the summary prints both.

The Karpathy parsing here is shared with the Flickr30K converter.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.data.jsonio import DataFileError, read_json, require_file, write_json_list
from model.data.prepare import (
    ConvertOptions,
    OutputCount,
    PrepareSummary,
    caption_transform,
    count_captions,
    count_images,
    join_image_path,
    note_raw_captions,
    paper_comparison,
    progress,
)

logger = logging.getLogger(__name__)

# Karpathy's split names and the output each one goes to: "restval" is the part of the official
# val2014 set that Karpathy's split hands to training.
SPLIT_TO_OUTPUT = {"train": "train", "restval": "train", "val": "val", "test": "test"}
_MAX_EXAMPLES = 10
# One-line description in ``python -m model.cli.prepare --help``.


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy split file, reduced to what the converters need."""

    index: int
    image: str
    image_id: str
    split: str
    captions: tuple[str, ...]
    filename: str
    cocoid: int | None


def _require_key(path: Path, index: int, item: dict[str, Any], key: str, kind: type) -> Any:
    """Return ``item[key]`` if present with type ``kind``; else a DataFileError naming the entry."""
    if key not in item:
        raise DataFileError(f"{path}: images[{index}] has no {key!r} key (Karpathy split format)")
    value = item[key]
    # bool is an int subclass; an id of True is a broken file, not an id.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataFileError(
            f"{path}: images[{index}][{key!r}] should be {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def _sentences(path: Path, index: int, item: dict[str, Any]) -> tuple[str, ...]:
    """The ``raw`` strings of an image's sentences, validated."""
    sentences = _require_key(path, index, item, "sentences", list)
    raws = []
    for j, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
            raise DataFileError(
                f"{path}: images[{index}]['sentences'][{j}] should be an object with a string "
                "'raw' caption"
            )
        raws.append(sentence["raw"])
    return tuple(raws)


def parse_karpathy_image(
    path: Path, index: int, item: Any, dataset: str, image_dir: str
) -> KarpathyImage:
    """Validate one ``images[index]`` entry of a Karpathy split file.

    Args:
        path: The split file (for messages).
        index: Position of the entry in ``images``.
        item: The raw entry.
        dataset: ``"coco"`` (needs ``filepath`` and ``cocoid``) or ``"flickr30k"``.
        image_dir: Flickr only: the folder holding the images (Karpathy's file has no path).
    """
    if not isinstance(item, dict):
        raise DataFileError(
            f"{path}: images[{index}] should be an object, got {type(item).__name__}"
        )
    filename = _require_key(path, index, item, "filename", str)
    split = _require_key(path, index, item, "split", str)
    if split not in SPLIT_TO_OUTPUT:
        raise DataFileError(
            f"{path}: images[{index}]['split'] is {split!r}; expected one of "
            f"{sorted(SPLIT_TO_OUTPUT)}"
        )
    captions = _sentences(path, index, item)
    if dataset == "coco":
        cocoid = _require_key(path, index, item, "cocoid", int)
        folder = _require_key(path, index, item, "filepath", str)
        image_id = f"coco_{cocoid}"
    else:
        cocoid, folder = None, image_dir
        image_id = f"flickr_{Path(filename).stem}"
    return KarpathyImage(
        index=index,
        image=f"{folder}/{filename}" if folder else filename,
        image_id=image_id,
        split=split,
        captions=captions,
        filename=filename,
        cocoid=cocoid,
    )


def read_karpathy(
    path: Path, dataset: str, image_dir: str = "", show_progress: bool | None = None
) -> list[KarpathyImage]:
    """Read and validate a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Raises:
        DataFileError: Missing file, wrong structure (names the ``images[i]`` entry), or an image
            listed twice.
    """
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFileError(
            f"{path}: expected a JSON object with an 'images' list (Karpathy split format)"
        )
    declared = data.get("dataset")
    if declared is not None and declared != dataset:
        logger.warning("%s declares dataset %r, expected %r", path, declared, dataset)
    images = [
        parse_karpathy_image(path, index, item, dataset, image_dir)
        for index, item in enumerate(
            progress(data["images"], f"reading {path.name}", None, show_progress)
        )
    ]
    seen: dict[str, int] = {}
    for image in images:
        if image.image in seen:
            raise DataFileError(
                f"{path}: images[{image.index}] repeats {image.image!r} "
                f"(first at images[{seen[image.image]}])"
            )
        seen[image.image] = image.index
    return images


def build_split_entries(
    images: Sequence[KarpathyImage], transform: Callable[[str], str], prefix: str
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Group Karpathy images into the train (per caption) and val/test (per image) entries.

    Returns:
        ``({"train": [...], "val": [...], "test": [...]}, skipped_empty_captions)``.
    """
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    skipped = 0
    for image in images:
        path = join_image_path(prefix, image.image)
        captions = [transform(raw) for raw in image.captions]
        kept = [c for c in captions if c.strip()]
        skipped += len(captions) - len(kept)
        target = SPLIT_TO_OUTPUT[image.split]
        if target == "train":
            out[target].extend(
                {"image": path, "caption": c, "image_id": image.image_id} for c in kept
            )
        elif kept:
            out[target].append({"image": path, "caption": kept})
        else:
            logger.warning("%s (%s) has no non-empty caption; left out", image.image, image.split)
    return out, skipped


def write_karpathy_outputs(
    entries: dict[str, list[dict[str, Any]]], out_dir: Path, stem: str, pretrain: bool
) -> list[OutputCount]:
    """Write ``<stem>_{train,val,test}.json`` (and ``<stem>_pretrain.json`` if asked)."""
    outputs = []
    files = [(split, entries[split]) for split in ("train", "val", "test")]
    if pretrain:
        files.append(
            ("pretrain", [{"image": e["image"], "caption": e["caption"]} for e in entries["train"]])
        )
    for name, rows in files:
        path = out_dir / f"{stem}_{name}.json"
        write_json_list(path, rows)
        outputs.append(OutputCount(name, path, len(rows), count_images(rows), count_captions(rows)))
    return outputs


def _load_official(files: Sequence[Path]) -> tuple[dict[int, str], dict[int, int]]:
    """Read official COCO caption files with pycocotools: image id → file name and → #captions."""
    from pycocotools.coco import COCO  # deferred: only needed for the optional cross-check

    names: dict[int, str] = {}
    n_captions: dict[int, int] = {}
    for path in files:
        require_file(path, "official COCO captions file")
        try:
            # pycocotools prints progress with print(); keep the converter's output readable.
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(str(path))
        except (json.JSONDecodeError, AssertionError, KeyError, TypeError) as err:
            raise DataFileError(
                f"{path}: not a COCO captions annotation file ({type(err).__name__}: {err}); "
                "expected an object with 'images' and 'annotations' lists"
            ) from err
        for image_id, info in coco.imgs.items():
            names[image_id] = info.get("file_name", "")
            n_captions[image_id] = len(coco.imgToAnns.get(image_id, []))
    return names, n_captions


def cross_check_official(
    images: Sequence[KarpathyImage], official: Sequence[Path]
) -> tuple[dict[str, int], list[str]]:
    """Check every Karpathy image against the official annotations.

    Returns:
        Mismatch counts (``missing``, ``file name differs``, ``caption count differs``) and up to
        ten example messages.
    """
    names, n_captions = _load_official(official)
    counts = dict.fromkeys(
        ("official_missing", "official_filename_differs", "official_ncaptions_differs"), 0
    )
    examples: list[str] = []
    for image in images:
        problem = None
        if image.cocoid not in names:
            counts["official_missing"] += 1
            problem = "not in the official annotations"
        elif names[image.cocoid] != image.filename:
            counts["official_filename_differs"] += 1
            problem = f"official file name is {names[image.cocoid]!r}"
        elif n_captions[image.cocoid] != len(image.captions):
            counts["official_ncaptions_differs"] += 1
            problem = f"{n_captions[image.cocoid]} official captions vs {len(image.captions)}"
        if problem and len(examples) < _MAX_EXAMPLES:
            examples.append(
                f"images[{image.index}] cocoid {image.cocoid} ({image.image}): {problem}"
            )
    return counts, examples


def karpathy_split_stats(images: Sequence[KarpathyImage]) -> dict[str, int]:
    """Number of input images per Karpathy split name."""
    stats = {f"karpathy_{split}_images": 0 for split in SPLIT_TO_OUTPUT}
    for image in images:
        stats[f"karpathy_{image.split}_images"] += 1
    return stats


def prepare_coco(
    karpathy: Path,
    out_dir: Path,
    official: Sequence[Path] = (),
    strict: bool = False,
    options: ConvertOptions | None = None,
) -> PrepareSummary:
    """Convert COCO + Karpathy split into ``coco_{train,val,test,pretrain}.json``.

    Args:
        karpathy: Karpathy's ``dataset_coco.json``.
        out_dir: Output directory (created if needed).
        official: Optional official ``captions_{train,val}2014.json`` files to cross-check.
        strict: Fail instead of warning when an image is missing from the official files or
            has a different file name there.
        options: Image-path prefix, caption cleaning, progress bars (:class:`ConvertOptions`).
    """
    options = options or ConvertOptions()
    transform = caption_transform(options.clean_captions, options.max_words)
    images = read_karpathy(karpathy, "coco", show_progress=options.show_progress)
    summary = PrepareSummary("coco", stats=karpathy_split_stats(images))
    if official:
        counts, examples = cross_check_official(images, official)
        summary.stats.update(counts)
        for example in examples:
            logger.warning("official cross-check: %s", example)
        fatal = counts["official_missing"] + counts["official_filename_differs"]
        if strict and fatal:
            raise DataFileError(
                f"{karpathy}: {fatal} Karpathy images are missing from or named differently in "
                f"{', '.join(map(str, official))}; first: {examples[0]}"
            )
    entries, skipped = build_split_entries(images, transform, options.image_prefix)
    summary.stats["skipped_empty_captions"] = skipped
    summary.outputs = write_karpathy_outputs(entries, out_dir, "coco", pretrain=True)
    pre = summary.output("pretrain")
    summary.notes.append(paper_comparison("coco", pre.images, pre.captions))
    summary.notes.append("pre-training file = Karpathy train + restval (as ALBEF's coco.json)")
    note_raw_captions(summary, options.clean_captions)
    return summary
