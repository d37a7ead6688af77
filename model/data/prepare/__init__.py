"""Shared plumbing for the dataset converters (``python -m model.data.prepare <source> ...``).

Each public corpus has its own module (``coco``, ``flickr``, ``vg``, ``sbu``, ``cc3m``) that turns
the raw public download into ALBEF-style caption JSON lists; ``combine`` joins the pre-training
lists into the "4M" corpus. This module holds what they share: error type, streaming JSON I/O,
atomic writes, caption cleaning, image-directory scans, the count summary every converter
prints and the command-line wiring.

Output formats (image paths are relative to an image root given at training time):

* pre-training: ``[{"image": str, "caption": str}, ...]``, one entry per caption;
* retrieval train: ``[{"image": str, "caption": str, "image_id": str}, ...]``, one per caption;
* retrieval val/test: ``[{"image": str, "caption": [str, ...]}, ...]``, one per image.

Captions are stored raw by default because ALBEF cleans them at load time (``pre_caption``);
converters clean them at conversion time only when asked to.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypeVar

from tqdm import tqdm

from model.atomic import atomic_writer
from model.data.captions import pre_caption

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# File suffixes accepted as images when scanning a downloaded-images directory.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

# One JSON array element larger than this is treated as a broken file rather than read into memory.
_MAX_ELEMENT_CHARS = 1 << 27
_CHUNK_CHARS = 1 << 20
_NON_WHITESPACE = re.compile(r"\S")


class PrepareError(ValueError):
    """A user-fixable problem with the inputs of a converter (message names file and entry)."""


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
# Reading inputs
# --------------------------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing file, else raise a PrepareError naming ``what``."""
    if not path.is_file():
        raise PrepareError(f"{what} not found: {path} (expected an existing file)")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing directory, else raise a PrepareError naming ``what``."""
    if not path.is_dir():
        raise PrepareError(f"{what} not found: {path} (expected an existing directory)")
    return path


def read_json(path: Path, what: str) -> Any:
    """Parse a whole JSON file, turning I/O and syntax errors into PrepareError.

    Use this for inputs that fit in memory (Karpathy splits, VG image metadata). Large lists
    should go through :func:`iter_json_array` instead.
    """
    require_file(path, what)
    try:
        with path.open(encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise PrepareError(
            f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    except UnicodeDecodeError as err:
        raise PrepareError(f"{what} {path} is not UTF-8 text: {err}") from err


class _ArrayStream:
    """Incremental reader for a file whose top level is a JSON array.

    ``json.load`` of a 5M-entry caption list costs several GB of Python objects; decoding one
    element at a time keeps memory at the size of the largest element.
    """

    def __init__(self, fh: TextIO, path: Path) -> None:
        """Read from the open text file ``fh``; ``path`` is only used in messages."""
        self._fh = fh
        self._path = path
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of the buffer so far
        self._eof = False

    def _fill(self) -> bool:
        """Drop the consumed prefix and append the next chunk; False once the file is exhausted."""
        if self._eof:
            return False
        data = self._fh.read(_CHUNK_CHARS)
        self._offset += self._pos
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        if not data:
            self._eof = True
        return bool(data)

    def _peek(self) -> str:
        """Skip whitespace and return the next significant character ('' at end of file)."""
        while True:
            match = _NON_WHITESPACE.search(self._buf, self._pos)
            if match:
                self._pos = match.start()
                return self._buf[self._pos]
            self._pos = len(self._buf)
            if not self._fill():
                return ""

    def _decode(self, index: int) -> Any:
        """Decode the element starting at the current position, reading more text as needed."""
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                where = self._offset + err.pos  # before _fill shifts the buffer
                too_big = len(self._buf) - self._pos > _MAX_ELEMENT_CHARS
                if too_big or not self._fill():
                    raise PrepareError(
                        f"{self._path}: invalid or truncated JSON in list element {index} "
                        f"(character offset {where}): {err.msg}"
                    ) from err
                continue
            # A number that ends exactly at the buffer end may continue in the next chunk.
            if end == len(self._buf) and self._fill():
                continue
            self._pos = end
            return value

    def __iter__(self) -> Iterator[Any]:
        """Yield the list's elements in order, checking the separators between them."""
        first = self._peek()
        if first != "[":
            found = repr(first) if first else "end of file"
            raise PrepareError(f"{self._path}: expected a JSON list at top level, found {found}")
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            self._check_trailing()
            return
        index = 0
        while True:
            if not self._peek():
                raise PrepareError(f"{self._path}: file ends inside the list (element {index})")
            yield self._decode(index)
            sep = self._peek()
            self._pos += 1
            if sep == "]":
                self._check_trailing()
                return
            if sep != ",":
                found = repr(sep) if sep else "end of file"
                raise PrepareError(
                    f"{self._path}: expected ',' or ']' after list element {index}, found {found}"
                )
            index += 1

    def _check_trailing(self) -> None:
        """Reject text after the closing bracket (a concatenation of two files, for instance)."""
        extra = self._peek()
        if extra:
            raise PrepareError(f"{self._path}: unexpected {extra!r} after the closing ']'")


def iter_json_array(path: Path, what: str = "JSON list") -> Iterator[Any]:
    """Yield the elements of a top-level JSON list one at a time (constant memory).

    Raises:
        PrepareError: If the file is missing, is not a list, or an element is malformed; the
            message names the file and the element index.
    """
    require_file(path, what)
    with path.open(encoding="utf-8-sig") as fh:
        yield from _ArrayStream(fh, path)


def read_text_lines(path: Path, what: str) -> list[str]:
    """Read a UTF-8 text file into lines without their line terminators.

    Undecodable bytes are replaced rather than fatal: web-scraped caption files contain a few
    broken encodings and dropping a whole corpus for them helps nobody.
    """
    require_file(path, what)
    with path.open(encoding="utf-8", errors="replace", newline=None) as fh:
        return [line.rstrip("\n") for line in fh]


# --------------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------------


def write_json_list(path: Path, entries: Iterable[Mapping[str, Any]]) -> int:
    """Stream ``entries`` into ``path`` as a JSON list (one entry per line), atomically.

    Returns:
        The number of entries written.
    """
    count = 0
    with atomic_writer(path) as fh:
        fh.write("[")
        for entry in entries:
            fh.write(",\n" if count else "\n")
            fh.write(json.dumps(entry, ensure_ascii=False))
            count += 1
        fh.write("\n]\n" if count else "]\n")
    return count


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
        raise PrepareError(f"--max-words must be positive, got {max_words}")
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


# --------------------------------------------------------------------------------------------
# Command-line plumbing shared by the converters
# --------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, default_prefix: str = "") -> None:
    """Options every converter accepts: image-path prefix, caption cleaning, progress bars."""
    parser.add_argument(
        "--image-prefix",
        default=default_prefix,
        help="prefix prepended to every written image path, e.g. 'coco/' when all sources share "
        f"one image root (default: {default_prefix!r})",
    )
    parser.add_argument(
        "--clean-captions",
        action="store_true",
        help="apply ALBEF's pre_caption now (default: store raw captions; ALBEF cleans at load "
        "time)",
    )
    parser.add_argument(
        "--max-words", type=int, default=30, help="word limit for --clean-captions (default: 30)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="never show progress bars (default: on a TTY)"
    )


def progress_flag(args: argparse.Namespace) -> bool | None:
    """Map ``--no-progress`` to the ``show_progress`` argument of the converters."""
    return False if args.no_progress else None


def new_subparser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    doc: str | None,
    run: Callable[[argparse.Namespace], Any],
) -> argparse.ArgumentParser:
    """Register the sub-command ``name``, carried out by ``run(args)``.

    Its ``--help`` shows ``doc`` (the converter's module docstring) verbatim below the usage.
    """
    parser = subparsers.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run)
    return parser


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The converter keyword arguments set by :func:`add_common_arguments`'s options."""
    return {
        "image_prefix": args.image_prefix,
        "clean_captions": args.clean_captions,
        "max_words": args.max_words,
        "show_progress": progress_flag(args),
    }


def call_converter(convert: Callable[..., T], args: argparse.Namespace, **renamed: str) -> T:
    """Call ``convert`` with the parsed options that are named like its parameters.

    Args:
        convert: A ``prepare_*`` function.
        args: The parsed command line (the common options map through :func:`common_kwargs`).
        renamed: Parameter name → option attribute, where the two differ (``images_dir="images"``
            for ``--images``).

    Raises:
        TypeError: If a parameter has no option, so a converter and its command line cannot
            silently drift apart.
    """
    options = {**vars(args), **common_kwargs(args)}
    kwargs = {}
    for name in inspect.signature(convert).parameters:
        key = renamed.get(name, name)
        if key not in options:
            raise TypeError(f"{convert.__name__}: no command-line option for parameter {name!r}")
        kwargs[name] = options[key]
    return convert(**kwargs)
