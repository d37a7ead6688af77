"""Shared plumbing for the dataset converters (``python -m model.cli.prepare <source> ...``).

Each public corpus has its own module (``coco``, ``flickr``, ``vg``, ``sbu``, ``cc3m``) that turns
the raw public download into ALBEF-style caption JSON lists; ``combine`` joins the pre-training
lists into the "4M" corpus. This module holds what they share: caption cleaning, image-directory
scans, the count summary every converter prints and the command-line wiring (the JSON and text
I/O and its error type are model/data/jsonio.py, shared with the training-time readers).

Output formats (image paths are relative to an image root given at training time):

* pre-training: ``[{"image": str, "caption": str}, ...]``, one entry per caption;
* retrieval train: ``[{"image": str, "caption": str, "image_id": str}, ...]``, one per caption;
* retrieval val/test: ``[{"image": str, "caption": [str, ...]}, ...]``, one per image.

Captions are stored raw by default because ALBEF cleans them at load time (``pre_caption``);
converters clean them at conversion time only when asked to.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from tqdm import tqdm

from model.data.captions import pre_caption
from model.data.jsonio import DataFileError, require_dir, write_json_list

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# File suffixes accepted as images when scanning a downloaded-images directory.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

@dataclass(frozen=True)
class ConvertOptions:
    """What every pre-training and retrieval converter takes besides its inputs.

    Attributes:
        image_prefix: Prefix for every written image path (e.g. ``"coco/"`` when all sources
            share one image root).
        clean_captions: Apply ALBEF's ``pre_caption`` now instead of at load time.
        max_words: Word limit for ``clean_captions``.
        show_progress: Force progress bars on/off (None: only on a terminal).
    """

    image_prefix: str = ""
    clean_captions: bool = False
    max_words: int = 30
    show_progress: bool | None = None


class PaperCount(NamedTuple):
    """Corpus sizes as printed in the paper's pre-training corpora table (rounded there)."""

    images: int
    captions: int
    val_images: int
    val_captions: int


# SoftMask++ paper, pre-training corpora table: train images/captions and the validation split
# sizes. The paper rounds (106K, 5.06M, ...), so small differences to exact counts are expected.
PAPER_COUNTS: dict[str, PaperCount] = {
    "coco": PaperCount(106_000, 533_000, 5_000, 25_000),
    "vg": PaperCount(101_000, 5_060_000, 2_100, 106_000),
    "cc3m": PaperCount(3_000_000, 3_000_000, 14_000, 14_000),
    "sbu": PaperCount(990_000, 990_000, 10_000, 10_000),
}


# --------------------------------------------------------------------------------------------
# Captions, paths, progress
# --------------------------------------------------------------------------------------------


def _keep_caption(caption: str) -> str:
    """Identity transform: captions are stored raw (ALBEF cleans them when loading)."""
    return caption


def caption_transform(clean: bool, max_words: int = 30) -> Callable[[str], str]:
    """Return the function applied to every caption before it is written.

    Args:
        clean: Apply ALBEF's ``pre_caption`` now. Off by default because ALBEF's datasets apply
            it at load time; cleaning twice is harmless but loses the raw text.
        max_words: Word limit passed to ``pre_caption`` (ALBEF: 30).
    """
    if not clean:
        return _keep_caption
    if max_words <= 0:
        raise DataFileError(f"--max-words must be positive, got {max_words}")
    return functools.partial(pre_caption, max_words=max_words)


def join_image_path(prefix: str, relative: str) -> str:
    """Join the user's image-path prefix and a path relative to the source's image directory.

    The prefix lets every source share one image root (``coco/``, ``vg/``, ...), which is what a
    single combined pre-training file needs.
    """
    relative = relative.replace(os.sep, "/").lstrip("/")
    if not prefix:
        return relative
    return prefix.rstrip("/") + "/" + relative


def caption_entry(
    relative: str,
    raw: str,
    transform: Callable[[str], str],
    prefix: str,
    stats: dict[str, int],
) -> dict[str, str] | None:
    """The pre-training entry of one image and its caption, or None if the caption is empty.

    The caption is stripped, then transformed; an empty result is counted in
    ``stats["skipped_empty_captions"]``.
    """
    caption = transform(raw.strip())
    if not caption.strip():
        stats["skipped_empty_captions"] += 1
        return None
    return {"image": join_image_path(prefix, relative), "caption": caption}


def _tqdm_disable(show_progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None lets tqdm decide (bars only on a terminal, so batch logs stay
    clean); True/False force the bar off/on."""
    return None if show_progress is None else not show_progress


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    show_progress: bool | None = None,
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar on stderr (see :func:`_tqdm_disable`)."""
    return tqdm(iterable, desc=desc, total=total, disable=_tqdm_disable(show_progress))


def scan_images(root: Path, show_progress: bool | None = None) -> Iterator[str]:
    """Yield the paths (relative to ``root``, '/'-separated) of all image files below ``root``.

    Directories and files are visited in sorted order so outputs are reproducible.
    """
    require_dir(root, "image directory")
    bar = tqdm(desc=f"scanning {root.name}", unit="file", disable=_tqdm_disable(show_progress))
    with bar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root)
            for name in sorted(filenames):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    bar.update()
                    yield (rel_dir / name).as_posix()


def index_images(
    root: Path, key: Callable[[str], K | None], show_progress: bool | None = None
) -> tuple[dict[K, str], list[tuple[str, str]]]:
    """Map the images below ``root`` (see :func:`scan_images`) by ``key(relative path)``.

    Files whose key is None are ignored. When several files share a key the first in sorted
    order wins, so reruns pick the same file.

    Returns:
        ``(key → relative path, [(ignored relative path, kept relative path), ...])``.
    """
    found: dict[K, str] = {}
    ignored: list[tuple[str, str]] = []
    for relative in scan_images(root, show_progress):
        value = key(relative)
        if value is None:
            continue
        if value in found:
            ignored.append((relative, found[value]))
            continue
        found[value] = relative
    return found, ignored


def parse_index_stem(relative: str) -> int | None:
    """Return the integer a file is named by (``000123.jpg`` → 123), or None if not numeric."""
    stem = Path(relative).stem
    return int(stem) if stem.isdigit() else None


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputCount:
    """What one written file contains."""

    name: str
    path: Path
    entries: int
    images: int
    captions: int


@dataclass
class PrepareSummary:
    """Counts reported by a converter: written files, input statistics and notes."""

    source: str
    outputs: list[OutputCount] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def output(self, name: str) -> OutputCount:
        """Return the output called ``name`` (KeyError if the converter wrote no such file)."""
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"{self.source}: no output named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (paths as strings)."""
        return {
            "source": self.source,
            "outputs": [{**asdict(out), "path": str(out.path)} for out in self.outputs],
            "stats": dict(self.stats),
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        """A short human-readable summary, as printed by the CLIs."""
        lines = [f"[{self.source}]"]
        width = max((len(out.name) for out in self.outputs), default=0)
        for out in self.outputs:
            lines.append(
                f"  {out.name:<{width}}  {out.entries:>10,} entries  {out.images:>10,} images  "
                f"{out.captions:>10,} captions  -> {out.path}"
            )
        lines.extend(f"  {key}: {value:,}" for key, value in self.stats.items())
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def paper_comparison(source: str, images: int, captions: int) -> str:
    """One line comparing our pre-training counts with the paper's table for ``source``."""
    paper = PAPER_COUNTS[source]
    return (
        f"pre-training counts: ours {images:,} images / {captions:,} captions; "
        f"paper's table {paper.images:,} / {paper.captions:,} (rounded in the paper)"
    )


def count_images(entries: Sequence[Mapping[str, Any]]) -> int:
    """Number of distinct ``image`` values in a list of entries."""
    return len({entry["image"] for entry in entries})


def count_captions(entries: Sequence[Mapping[str, Any]]) -> int:
    """Number of caption strings (a list-valued caption counts each element)."""
    return sum(
        len(entry["caption"]) if isinstance(entry["caption"], list) else 1 for entry in entries
    )


def note_raw_captions(summary: PrepareSummary, clean_captions: bool) -> None:
    """Add the note that captions were stored raw, unless they were cleaned now."""
    if not clean_captions:
        summary.notes.append("captions stored raw; ALBEF's pre_caption runs at load time")


def add_pretrain_output(
    summary: PrepareSummary, path: Path, entries: int, images: int, captions: int
) -> None:
    """Record a written pre-training file and compare its counts with the paper's table."""
    summary.outputs.append(OutputCount("pretrain", path, entries, images, captions))
    summary.notes.append(paper_comparison(summary.source, images, captions))


def write_pretrain(
    summary: PrepareSummary, path: Path, entries: Sequence[Mapping[str, Any]]
) -> None:
    """Write a one-caption-per-entry pre-training list to ``path`` and record it in ``summary``."""
    write_json_list(path, entries)
    add_pretrain_output(summary, path, len(entries), count_images(entries), len(entries))
