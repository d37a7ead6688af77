"""Conceptual Captions 3M → pre-training captions from the downloaded images.

Inputs: the release TSV (``Train_GCC-training.tsv`` or ``Validation_GCC-1.1.0-Validation.tsv``:
``caption<TAB>url`` per line, no header; a ``caption<TAB>url`` header line added for downloaders is
skipped) and the directory the images were downloaded into, in one of two layouts
(``--layout``):

* ``img2dataset`` (default): img2dataset's ``--output_format files`` tree, shards of
  ``<key>.jpg`` with ``<key>.txt`` (caption) and ``<key>.json`` (``caption``, ``url``, ``status``,
  ...). The caption comes from the ``.json`` (else the ``.txt``). The TSV is optional here and only
  used to count how many TSV rows have an image (matched through the ``url`` of the ``.json``).
* ``index``: files whose stem is the TSV row number counted from ``--index-base`` (default 0),
  with any zero padding and sub-folders; the caption comes from the TSV, which is required.

Output: ``--out`` (e.g. ``cc3m_train.json``), ``[{"image": relative path, "caption": str}, ...]``
sorted by image path (img2dataset) or in TSV order (index). ALBEF's 4M set uses CC3M train *and*
validation: run the converter once per TSV and pass both outputs to ``combine``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.data.jsonio import DataFileError, require_file
from model.data.prepare import (
    ConvertOptions,
    PrepareSummary,
    caption_entry,
    caption_transform,
    index_images,
    parse_index_stem,
    progress,
    scan_images,
    write_pretrain,
)

logger = logging.getLogger(__name__)

LAYOUTS = ("img2dataset", "index")
_HEADER = ("caption", "url")
# One-line description in ``python -m model.cli.prepare --help``.


def iter_tsv(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield ``(row, caption, url)`` for each data line of a CC3M TSV (row counted from 0).

    Raises:
        DataFileError: On a line that is not ``caption<TAB>url`` (names the line number).
    """
    require_file(path, "CC3M TSV")
    row = 0
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if line_no == 1 and tuple(f.strip().lower() for f in fields) == _HEADER:
                continue
            if len(fields) != 2:
                raise DataFileError(
                    f"{path}: line {line_no} has {len(fields)} tab-separated fields; "
                    "expected 2 (caption, url)"
                )
            yield row, fields[0], fields[1].strip()
            row += 1


@dataclass(frozen=True)
class Download:
    """One downloaded image of an img2dataset tree and its metadata."""

    relative: str
    caption: str | None
    url: str | None
    status: str | None


def _read_sidecar_json(path: Path) -> dict[str, Any]:
    """The per-sample ``.json`` written by img2dataset, or {} if absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFileError(f"{path}: unreadable img2dataset metadata ({err})") from err
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: img2dataset metadata should be a JSON object")
    return data


def read_download(images_dir: Path, relative: str) -> Download:
    """Read the caption/url/status of one img2dataset sample from its side-car files."""
    image = images_dir / relative
    meta = _read_sidecar_json(image.with_suffix(".json"))
    caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    text_file = image.with_suffix(".txt")
    if caption is None and text_file.is_file():
        caption = text_file.read_text(encoding="utf-8", errors="replace")
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    status = meta.get("status") if isinstance(meta.get("status"), str) else None
    return Download(relative, caption, url, status)


def img2dataset_entries(
    images_dir: Path, transform: Callable[[str], str], prefix: str, show_progress: bool | None
) -> tuple[list[dict[str, str]], set[str], dict[str, int]]:
    """Entries of an img2dataset tree, the set of downloaded URLs, and skip counts."""
    entries: list[dict[str, str]] = []
    urls: set[str] = set()
    stats = {
        "image_files": 0,
        "skipped_failed_status": 0,
        "skipped_no_caption": 0,
        "skipped_empty_captions": 0,
    }
    for relative in scan_images(images_dir, show_progress):
        stats["image_files"] += 1
        sample = read_download(images_dir, relative)
        # img2dataset only writes images it fetched, but a partial rerun can leave stale files.
        if sample.status is not None and sample.status != "success":
            stats["skipped_failed_status"] += 1
            continue
        if sample.caption is None:
            stats["skipped_no_caption"] += 1
            continue
        entry = caption_entry(relative, sample.caption, transform, prefix, stats)
        if entry is None:
            continue
        if sample.url:
            urls.add(sample.url.strip())
        entries.append(entry)
    return entries, urls, stats


def count_rows_with_images(tsv: Path, urls: set[str], show_progress: bool | None) -> dict[str, int]:
    """How many TSV rows have a downloaded image, matched by URL."""
    rows = with_image = 0
    for _, _, url in progress(iter_tsv(tsv), "CC3M rows", None, show_progress):
        rows += 1
        with_image += url in urls
    return {"rows": rows, "rows_with_image": with_image, "rows_without_image": rows - with_image}


def index_entries(
    tsv: Path,
    images_dir: Path,
    index_base: int,
    transform: Callable[[str], str],
    prefix: str,
    show_progress: bool | None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Entries for images named by TSV row number, with their TSV captions."""
    files, ignored = index_images(images_dir, parse_index_stem, show_progress)
    entries: list[dict[str, str]] = []
    stats = {
        "rows": 0,
        "rows_with_image": 0,
        "skipped_empty_captions": 0,
        "duplicate_image_names_ignored": len(ignored),
    }
    for row, raw, _ in progress(iter_tsv(tsv), "CC3M rows", None, show_progress):
        stats["rows"] += 1
        relative = files.get(row + index_base)
        if relative is None:
            continue
        stats["rows_with_image"] += 1
        entry = caption_entry(relative, raw, transform, prefix, stats)
        if entry is not None:
            entries.append(entry)
    stats["rows_without_image"] = stats["rows"] - stats["rows_with_image"]
    return entries, stats


def prepare_cc3m(
    images_dir: Path,
    out: Path,
    tsv: Path | None = None,
    layout: str = "img2dataset",
    index_base: int = 0,
    options: ConvertOptions | None = None,
) -> PrepareSummary:
    """Convert downloaded Conceptual Captions images into a pre-training caption file.

    Args:
        images_dir: Download directory (img2dataset tree or row-index named files).
        out: Output JSON path (e.g. ``cc3m_train.json``).
        tsv: The release TSV; required for ``layout="index"``, optional (row counts only) for
            ``"img2dataset"``.
        layout: ``"img2dataset"`` or ``"index"``.
        index_base: Row number of the first TSV data row for ``layout="index"``.
        options: Image-path prefix, caption cleaning, progress bars (:class:`ConvertOptions`).
    """
    options = options or ConvertOptions()
    if layout not in LAYOUTS:
        raise DataFileError(f"CC3M layout must be one of {LAYOUTS}, got {layout!r}")
    transform = caption_transform(options.clean_captions, options.max_words)
    summary = PrepareSummary("cc3m")
    if layout == "index":
        if tsv is None:
            raise DataFileError("CC3M --layout index needs --tsv (captions come from the TSV)")
        entries, summary.stats = index_entries(
            tsv, images_dir, index_base, transform, options.image_prefix, options.show_progress
        )
    else:
        entries, urls, summary.stats = img2dataset_entries(
            images_dir, transform, options.image_prefix, options.show_progress
        )
        if tsv is not None and urls:
            summary.stats.update(count_rows_with_images(tsv, urls, options.show_progress))
        else:
            reason = "no --tsv given" if tsv is None else "the .json side-car files have no url"
            summary.notes.append(f"TSV rows with an image: unknown ({reason})")
    write_pretrain(summary, out, entries)
    return summary
