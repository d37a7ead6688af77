"""Visual Genome region descriptions → pre-training captions (one entry per region phrase).

Inputs:

* ``region_descriptions.json``: ``[{"id": image_id, "regions": [{"region_id", "image_id",
  "phrase", "x", "y", "width", "height"}, ...]}, ...]`` (read incrementally: the file is large);
* ``image_data.json``: ``[{"image_id", "url", "width", "height", "coco_id", "flickr_id"}, ...]``;
  the ``url`` tells which download folder holds the image (``VG_100K/`` or ``VG_100K_2/``);
* optionally Karpathy's ``dataset_coco.json``: VG images that are COCO images in the Karpathy
  val/test splits are dropped (``--exclude-coco-karpathy``), as ALBEF does, so pre-training
  never sees the retrieval test images;
* optionally the image directory (``--images``): then only images that exist are kept, and an
  image found in the other ``VG_100K*`` folder than its URL says is still found.

Output: ``--out`` (e.g. ``vg.json``), ``[{"image": "VG_100K/1.jpg", "caption": phrase}, ...]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from model.data.jsonio import (
    DataFileError,
    iter_json_array,
    read_json,
    require_dir,
    write_json_list,
)
from model.data.prepare import (
    ConvertOptions,
    PrepareSummary,
    add_pretrain_output,
    caption_transform,
    join_image_path,
    note_raw_captions,
    progress,
)
from model.data.prepare.coco import read_karpathy

logger = logging.getLogger(__name__)

VG_FOLDERS = ("VG_100K", "VG_100K_2")
# Number of images in Visual Genome 1.2; only used to size the progress bar.
_VG_IMAGES = 108_077
# One-line description in ``python -m model.cli.prepare --help``.


@dataclass(frozen=True)
class VgImage:
    """Where one VG image lives and which COCO image it is (if any)."""

    relative: str
    coco_id: int | None


def _image_id(path: Path, index: int, item: dict[str, Any]) -> int:
    """The image id of an ``image_data.json``/``region_descriptions.json`` entry.

    VG 1.2 uses ``image_id`` in image_data.json and ``id`` in region_descriptions.json; VG 1.0
    used ``id`` in both, so accept either.
    """
    value = item.get("image_id", item.get("id"))
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataFileError(f"{path}: entry {index} has no integer 'image_id' (or 'id')")
    return value


def relative_path_from_url(url: str, image_id: int) -> str:
    """``https://.../VG_100K_2/1.jpg`` → ``VG_100K_2/1.jpg`` (the layout of the zip downloads)."""
    parts = urlsplit(url).path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] in VG_FOLDERS:
        return f"{parts[-2]}/{parts[-1]}"
    # An unusual URL: fall back on the first folder and the id, the common case in VG.
    return f"{VG_FOLDERS[0]}/{image_id}.jpg"


def read_image_data(path: Path) -> dict[int, VgImage]:
    """Read ``image_data.json`` into image id → (relative path, COCO id)."""
    data = read_json(path, "VG image_data.json")
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of image records")
    images: dict[int, VgImage] = {}
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataFileError(f"{path}: entry {index} should be an object")
        image_id = _image_id(path, index, item)
        url = item.get("url")
        if not isinstance(url, str):
            raise DataFileError(f"{path}: entry {index} (image {image_id}) has no string 'url'")
        coco_id = item.get("coco_id")
        images[image_id] = VgImage(
            relative_path_from_url(url, image_id), coco_id if isinstance(coco_id, int) else None
        )
    return images


def karpathy_eval_coco_ids(dataset_coco: Path) -> set[int]:
    """COCO ids of the Karpathy val and test images (the images pre-training must not see)."""
    images = read_karpathy(dataset_coco, "coco")
    return {img.cocoid for img in images if img.split in ("val", "test") and img.cocoid is not None}


def locate(image: VgImage, images_dir: Path | None) -> str | None:
    """The image's path relative to the VG root; None if ``images_dir`` is given and lacks it."""
    if images_dir is None:
        return image.relative
    name = image.relative.rsplit("/", 1)[-1]
    # The two zip downloads are sometimes unpacked into one folder or swapped; look in both.
    others = [f"{folder}/{name}" for folder in VG_FOLDERS]
    for candidate in [image.relative, *others]:
        if (images_dir / candidate).is_file():
            return candidate
    return None


@dataclass
class _VgTally:
    """Counters filled while the phrase stream is written."""

    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "input_images",
                "input_regions",
                "excluded_coco_karpathy_images",
                "excluded_coco_karpathy_regions",
                "images_without_metadata",
                "missing_images",
                "skipped_empty_captions",
                "duplicate_phrases_in_image",
            ),
            0,
        )
    )
    images: int = 0
    captions: int = 0


def _phrases(path: Path, index: int, item: Any) -> list[str]:
    """The phrases of one ``region_descriptions.json`` entry, validated."""
    regions = item.get("regions") if isinstance(item, dict) else None
    if not isinstance(regions, list):
        raise DataFileError(f"{path}: entry {index} should be an object with a 'regions' list")
    phrases = []
    for j, region in enumerate(regions):
        if not isinstance(region, dict) or not isinstance(region.get("phrase"), str):
            raise DataFileError(f"{path}: entry {index}, regions[{j}] has no string 'phrase'")
        phrases.append(region["phrase"])
    return phrases


@dataclass(frozen=True)
class _VgOptions:
    """Conversion settings threaded through the phrase stream."""

    images: dict[int, VgImage]
    images_dir: Path | None
    excluded_coco: set[int]
    transform: Callable[[str], str]
    prefix: str
    dedupe: bool


def _keep_phrases(phrases: list[str], opts: _VgOptions, tally: _VgTally) -> list[str]:
    """Clean, drop empty and (optionally) repeated phrases of one image, counting each."""
    kept: list[str] = []
    seen: set[str] = set()
    for phrase in map(opts.transform, phrases):
        if not phrase.strip():
            tally.stats["skipped_empty_captions"] += 1
            continue
        # VG annotators often describe the same region twice; counting repeats explains part of
        # the gap to the paper's 5.06M.
        key = phrase.strip().lower()
        if key in seen:
            tally.stats["duplicate_phrases_in_image"] += 1
            if opts.dedupe:
                continue
        seen.add(key)
        kept.append(phrase)
    return kept


def _stream_entries(
    path: Path, opts: _VgOptions, tally: _VgTally, show_progress: bool | None
) -> Iterator[dict[str, str]]:
    """Yield ``{"image", "caption"}`` per kept phrase while counting what was dropped and why."""
    stream = iter_json_array(path, "VG region_descriptions.json")
    for index, item in enumerate(progress(stream, "VG regions", _VG_IMAGES, show_progress)):
        phrases = _phrases(path, index, item)
        image_id = _image_id(path, index, item)
        tally.stats["input_images"] += 1
        tally.stats["input_regions"] += len(phrases)
        image = opts.images.get(image_id)
        if image is None:
            tally.stats["images_without_metadata"] += 1
            continue
        if image.coco_id is not None and image.coco_id in opts.excluded_coco:
            tally.stats["excluded_coco_karpathy_images"] += 1
            tally.stats["excluded_coco_karpathy_regions"] += len(phrases)
            continue
        relative = locate(image, opts.images_dir)
        if relative is None:
            tally.stats["missing_images"] += 1
            continue
        kept = _keep_phrases(phrases, opts, tally)
        if kept:
            tally.images += 1
            tally.captions += len(kept)
        image_path = join_image_path(opts.prefix, relative)
        for phrase in kept:
            yield {"image": image_path, "caption": phrase}


def prepare_vg(
    region_descriptions: Path,
    image_data: Path,
    out: Path,
    images_dir: Path | None = None,
    exclude_coco_karpathy: Path | None = None,
    dedupe_phrases: bool = False,
    options: ConvertOptions | None = None,
) -> PrepareSummary:
    """Convert VG region descriptions into a pre-training caption file.

    Args:
        region_descriptions: VG ``region_descriptions.json``.
        image_data: VG ``image_data.json`` (folder of each image, COCO ids).
        out: Output JSON path (e.g. ``vg.json``).
        images_dir: VG image root holding ``VG_100K/`` and ``VG_100K_2/``; if given, images
            that are not there are dropped and counted.
        exclude_coco_karpathy: Karpathy ``dataset_coco.json``; drop VG images that are COCO
            Karpathy val/test images.
        dedupe_phrases: Drop repeated phrases within one image (off: keep VG as released).
        options: Image-path prefix, caption cleaning, progress bars (:class:`ConvertOptions`).
    """
    options = options or ConvertOptions()
    opts = _VgOptions(
        images=read_image_data(image_data),
        images_dir=require_dir(images_dir, "VG image directory") if images_dir else None,
        excluded_coco=(
            karpathy_eval_coco_ids(exclude_coco_karpathy) if exclude_coco_karpathy else set()
        ),
        transform=caption_transform(options.clean_captions, options.max_words),
        prefix=options.image_prefix,
        dedupe=dedupe_phrases,
    )
    tally = _VgTally()
    entries = write_json_list(
        out, _stream_entries(region_descriptions, opts, tally, options.show_progress))
    summary = PrepareSummary("vg", stats=tally.stats)
    add_pretrain_output(summary, out, entries, tally.images, tally.captions)
    if exclude_coco_karpathy is None:
        summary.notes.append("COCO Karpathy val/test images NOT excluded (--exclude-coco-karpathy)")
    note_raw_captions(summary, options.clean_captions)
    if tally.stats["images_without_metadata"]:
        logger.warning(
            "%d images of %s have no record in %s and were left out",
            tally.stats["images_without_metadata"],
            region_descriptions,
            image_data,
        )
    return summary
