"""SBU Captions → pre-training captions, keeping only images that were downloaded.

Inputs: the two line-aligned text files of the SBU release,
``SBU_captioned_photo_dataset_urls.txt`` (one Flickr URL per line) and
``SBU_captioned_photo_dataset_captions.txt`` (the caption of the same line), plus the directory
the images were downloaded into. Images may sit in sub-folders; how a file maps to a line is
chosen with ``--naming``:

* ``basename`` (default): the file is named like the URL's last path component
  (``http://static.flickr.com/2723/4385058960_b0f291553e.jpg`` → ``4385058960_b0f291553e.jpg``);
* ``index``: the file stem is the line number, counted from ``--index-base`` (default 0), with
  any zero padding (``0000123.jpg``, ``123.png``, ``00/0000123.jpg``).

Output: ``--out`` (e.g. ``sbu.json``), ``[{"image": relative path, "caption": str}, ...]`` in line
order. Line terminators and surrounding spaces are stripped from captions (they belong to the
text-file format, not to the caption); nothing else is changed unless ``--clean-captions``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from model.data.jsonio import DataFileError, read_text_lines
from model.data.prepare import (
    ConvertOptions,
    PrepareSummary,
    caption_entry,
    caption_transform,
    index_images,
    parse_index_stem,
    progress,
    write_pretrain,
)

logger = logging.getLogger(__name__)

NAMINGS = ("basename", "index")
# One-line description in ``python -m model.cli.prepare --help``.


def url_basename(url: str) -> str:
    """The last path component of a URL (query and fragment ignored)."""
    return urlsplit(url.strip()).path.rstrip("/").rsplit("/", 1)[-1]


def _file_name(relative: str) -> str:
    """The last component of a '/'-separated relative path."""
    return relative.rsplit("/", 1)[-1]


def index_downloads(
    images_dir: Path, naming: str, show_progress: bool | None = None
) -> tuple[dict[str | int, str], int]:
    """Map each downloaded file to its lookup key (file name or line index).

    Returns:
        ``(key → path relative to images_dir, number of ignored duplicate keys)``. With
        duplicates the first path in sorted order wins, so reruns pick the same file.
    """
    key: Callable[[str], str | int | None]
    key = _file_name if naming == "basename" else parse_index_stem
    found, ignored = index_images(images_dir, key, show_progress)
    for relative, kept in ignored:
        logger.debug("duplicate download %s (keeping %s)", relative, kept)
    return found, len(ignored)


def read_aligned(urls: Path, captions: Path) -> tuple[list[str], list[str]]:
    """Read the URL and caption files and check that they have the same number of lines."""
    url_lines = read_text_lines(urls, "SBU URL file")
    caption_lines = read_text_lines(captions, "SBU caption file")
    if len(url_lines) != len(caption_lines):
        raise DataFileError(
            f"SBU files are not line-aligned: {urls} has {len(url_lines)} lines, "
            f"{captions} has {len(caption_lines)} (expected the same number)"
        )
    return url_lines, caption_lines


def build_entries(
    url_lines: Sequence[str],
    caption_lines: Sequence[str],
    downloads: dict[str | int, str],
    naming: str,
    index_base: int,
    transform: Callable[[str], str],
    prefix: str,
    show_progress: bool | None = None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Pair each line with its downloaded image; count lines without image or caption."""
    entries: list[dict[str, str]] = []
    stats = {"rows": len(url_lines), "rows_without_image": 0, "skipped_empty_captions": 0}
    rows = progress(enumerate(url_lines), "SBU rows", len(url_lines), show_progress)
    for line, url in rows:
        key = url_basename(url) if naming == "basename" else line + index_base
        relative = downloads.get(key)
        if relative is None:
            stats["rows_without_image"] += 1
            continue
        entry = caption_entry(relative, caption_lines[line], transform, prefix, stats)
        if entry is not None:
            entries.append(entry)
    return entries, stats


def prepare_sbu(
    urls: Path,
    captions: Path,
    images_dir: Path,
    out: Path,
    naming: str = "basename",
    index_base: int = 0,
    options: ConvertOptions | None = None,
) -> PrepareSummary:
    """Convert SBU Captions (text files + downloaded images) into a pre-training caption file.

    Args:
        urls: ``SBU_captioned_photo_dataset_urls.txt``.
        captions: ``SBU_captioned_photo_dataset_captions.txt``.
        images_dir: Directory holding the downloaded images (sub-folders allowed).
        out: Output JSON path (e.g. ``sbu.json``).
        naming: ``"basename"`` (file named like the URL) or ``"index"`` (file stem = line number).
        index_base: Line number of the first line for ``naming="index"`` (0 or 1).
        options: Image-path prefix, caption cleaning, progress bars (:class:`ConvertOptions`).
    """
    options = options or ConvertOptions()
    if naming not in NAMINGS:
        raise DataFileError(f"SBU naming must be one of {NAMINGS}, got {naming!r}")
    transform = caption_transform(options.clean_captions, options.max_words)
    url_lines, caption_lines = read_aligned(urls, captions)
    downloads, duplicates = index_downloads(images_dir, naming, options.show_progress)
    entries, stats = build_entries(
        url_lines,
        caption_lines,
        downloads,
        naming,
        index_base,
        transform,
        options.image_prefix,
        options.show_progress,
    )
    stats["rows_with_image"] = stats["rows"] - stats["rows_without_image"]
    stats["image_files_found"] = len(downloads)
    stats["duplicate_image_names_ignored"] = duplicates
    summary = PrepareSummary("sbu", stats=stats)
    write_pretrain(summary, out, entries)
    if not entries:
        summary.notes.append(
            f"no line matched a file in {images_dir}; check --naming ({naming}) and --index-base"
        )
    return summary
