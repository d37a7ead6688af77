"""Preflight check of caption annotation files and their images, before any training starts.

``preflight`` reads each annotation file (the pre-training and retrieval JSON formats are
recognised automatically), checks that every entry has an image path and non-empty captions, and
that the images exist under the image root and decode with PIL — all of them, or a seeded random
sample per file for corpora with millions of images. It returns a :class:`PreflightReport` with
per-file counts and the first offending entries; ``report.ok`` is what a launcher's dry run
should test.

Command line::

    python -m model.cli.preflight coco_train.json coco_test.json --image-root DATA/images \\
        [--sample 1000] [--seed 0] [--no-decode] [--workers 8]

exits with status 1 when anything is wrong (2 for unusable arguments), after printing the
report as Markdown.

Truncated image files are reported even when a data loader would tolerate them (ALBEF sets
PIL's ``LOAD_TRUNCATED_IMAGES``): training on them silently feeds grey blocks to the model.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile

from model.data.captions import pre_caption
from model.data.jsonio import DataFileError, iter_json_array

logger = logging.getLogger(__name__)

# Format names reported per file.
PRETRAIN = "pretrain"
RETRIEVAL_TRAIN = "retrieval_train"
RETRIEVAL_EVAL = "retrieval_eval"
NOT_FOUND = "image file not found"
# PIL raises these for unreadable, truncated or absurdly large files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Problem:
    """One offending entry: which file, which entry, which image, and what is wrong."""

    file: str
    index: int | None
    image: str | None
    problem: str


@dataclass
class FileStats:
    """Counts for one annotation file (``images_*`` refer to distinct image paths)."""

    file: str
    format: str = "unknown"
    entries: int = 0
    captions: int = 0
    empty_captions: int = 0
    bad_entries: int = 0
    images_listed: int = 0
    images_checked: int = 0
    images_found: int = 0
    images_decodable: int | None = None


@dataclass
class PreflightReport:
    """Result of :func:`preflight`; ``ok`` is False if any problem was found."""

    image_root: str
    decode: bool
    sample: int | None
    seed: int
    files: list[FileStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        """True when no annotation, caption or image problem was found."""
        return self.problem_count == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of the whole report."""
        return {**asdict(self), "ok": self.ok}

    def to_markdown(self) -> str:
        """The report as Markdown: a status line, per-file counts, then the first problems."""
        status = "OK" if self.ok else f"{self.problem_count} problem(s)"
        checked = (
            "all images" if self.sample is None else f"{self.sample} images/file, seed {self.seed}"
        )
        decode = "exist and decode" if self.decode else "exist (no decoding)"
        lines = [
            f"## Data preflight: {status}",
            "",
            f"Image root `{self.image_root}`; checked {checked} ({decode}).",
            "",
        ]
        if self.files:
            table = pd.DataFrame([asdict(stats) for stats in self.files])
            lines += [table.to_markdown(index=False), ""]
        if self.problems:
            shown = len(self.problems)
            lines += [f"### First {shown} of {self.problem_count} problem(s)", ""]
            table = pd.DataFrame([asdict(problem) for problem in self.problems])
            # "entry" is the position in the file's JSON list (blank for file-level problems).
            table = table.rename(columns={"index": "entry"})
            table["entry"] = table["entry"].astype("Int64")
            lines += [table.to_markdown(index=False), ""]
        return "\n".join(lines)


class _ProblemLog:
    """Keeps the first ``limit`` problems and counts all of them."""

    def __init__(self, limit: int) -> None:
        """Keep at most ``limit`` problems for the report."""
        self.limit = limit
        self.kept: list[Problem] = []
        self.count = 0

    def add(self, problem: Problem) -> None:
        """Record a problem (stored only while under the limit)."""
        self.count += 1
        if len(self.kept) < self.limit:
            self.kept.append(problem)


@dataclass
class _FormatVotes:
    """What the entries of one file look like, to name its format afterwards."""

    str_captions: int = 0
    list_captions: int = 0
    with_image_id: int = 0


def _caption_problems(caption: Any, stats: FileStats, votes: _FormatVotes) -> str | None:
    """Count an entry's captions; return a problem description or None."""
    if isinstance(caption, str):
        votes.str_captions += 1
        captions = [caption]
    elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        votes.list_captions += 1
        captions = caption
        if not caption:
            return "caption list is empty"
    else:
        return f"'caption' should be a string or a list of strings, got {type(caption).__name__}"
    stats.captions += len(captions)
    # ALBEF's cleaning deletes punctuation: "?!" or "..." train as an empty caption.
    empty = sum(1 for c in captions if not pre_caption(c).strip())
    stats.empty_captions += empty
    if empty:
        blank = next(c for c in captions if not pre_caption(c).strip())
        return "empty caption" if not blank.strip() else \
            f"caption {blank!r} is empty after ALBEF's cleaning"
    return None


def _entry_problem(entry: Any, stats: FileStats, votes: _FormatVotes) -> str | None:
    """Validate one annotation entry; return a problem description or None."""
    if not isinstance(entry, dict):
        return f"entry should be an object, got {type(entry).__name__}"
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        return "no non-empty string 'image'"
    if "image_id" in entry:
        votes.with_image_id += 1
        image_id = entry["image_id"]
        if not isinstance(image_id, str | int) or isinstance(image_id, bool):
            return f"'image_id' should be a string or integer, got {type(image_id).__name__}"
    if "caption" not in entry:
        return "no 'caption'"
    return _caption_problems(entry["caption"], stats, votes)


def _name_format(path: Path, stats: FileStats, votes: _FormatVotes, log: _ProblemLog) -> str:
    """Name the file's format from the entry shapes; log files that fit none."""
    valid = votes.str_captions + votes.list_captions
    if stats.entries == 0:
        log.add(Problem(str(path), None, None, "annotation file has no entries"))
        return "empty"
    if votes.with_image_id and votes.with_image_id != valid:
        log.add(
            Problem(
                str(path), None, None, f"'image_id' on {votes.with_image_id} of {valid} entries"
            )
        )
        return "mixed"
    if valid and votes.list_captions == valid:
        return RETRIEVAL_EVAL
    if votes.with_image_id:
        return RETRIEVAL_TRAIN
    return PRETRAIN


def scan_annotations(path: Path, log: _ProblemLog) -> tuple[FileStats, dict[str, int]]:
    """Parse and validate one annotation file.

    Returns:
        The file's counts and its distinct image paths, each with the first entry using it.
    """
    stats = FileStats(file=str(path))
    votes = _FormatVotes()
    images: dict[str, int] = {}
    try:
        for index, entry in enumerate(iter_json_array(path, "annotation file")):
            stats.entries += 1
            problem = _entry_problem(entry, stats, votes)
            if problem:
                stats.bad_entries += 1
                image = entry.get("image") if isinstance(entry, dict) else None
                log.add(
                    Problem(str(path), index, image if isinstance(image, str) else None, problem)
                )
            if isinstance(entry, dict) and isinstance(entry.get("image"), str) and entry["image"]:
                images.setdefault(entry["image"], index)
    except DataFileError as err:
        # Keep the counts up to the break; the file as a whole is unusable.
        stats.format = "invalid"
        log.add(Problem(str(path), None, None, str(err)))
        stats.images_listed = len(images)
        return stats, images
    stats.format = _name_format(path, stats, votes, log)
    stats.images_listed = len(images)
    return stats, images


def check_image(path: Path, decode: bool = True) -> str | None:
    """Return None if ``path`` is a readable image, else a short description of the problem."""
    if not path.is_file():
        return NOT_FOUND
    if not decode:
        return None
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except _DECODE_ERRORS as err:
        return f"cannot decode image ({type(err).__name__}: {err})"
    return None


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL fail on truncated files for the duration of the check, then restore the flag."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def choose_images(images: dict[str, int], sample: int | None, seed: int) -> list[tuple[str, int]]:
    """All images, or a seeded random sample of ``sample`` of them (in file order)."""
    items = list(images.items())
    if sample is None or sample >= len(items):
        return items
    picked = set(random.Random(seed).sample(range(len(items)), sample))
    return [item for position, item in enumerate(items) if position in picked]


def _check_many(paths: Sequence[Path], decode: bool, workers: int) -> list[str | None]:
    """Check images sequentially or on a thread pool (I/O and decoding release the GIL)."""
    if workers <= 0:
        return [check_image(path, decode) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda path: check_image(path, decode), paths))


def check_file_images(
    path: Path,
    chosen: Sequence[tuple[str, int]],
    image_root: Path,
    decode: bool,
    workers: int,
    cache: dict[Path, str | None],
    stats: FileStats,
    log: _ProblemLog,
) -> None:
    """Check the chosen images of one file, reusing results for images shared between files."""
    targets = [image_root / image for image, _ in chosen]
    todo = [target for target in dict.fromkeys(targets) if target not in cache]
    cache.update(zip(todo, _check_many(todo, decode, workers), strict=True))
    stats.images_checked = len(chosen)
    readable = 0
    for (image, index), target in zip(chosen, targets, strict=True):
        problem = cache[target]
        stats.images_found += problem != NOT_FOUND
        readable += problem is None
        if problem is not None:
            log.add(Problem(str(path), index, image, problem))
    # Without decoding, "readable" only means "exists", so it is not reported as decodable.
    stats.images_decodable = readable if decode else None


def preflight(
    ann_files: Sequence[Path],
    image_root: Path,
    sample: int | None = None,
    seed: int = 0,
    decode: bool = True,
    workers: int = 0,
    max_problems: int = 20,
) -> PreflightReport:
    """Check annotation files and their images; never raises for data problems.

    Args:
        ann_files: ALBEF-style caption JSON files (pre-training or retrieval format).
        image_root: Directory the ``image`` paths are relative to.
        sample: Check only this many randomly chosen distinct images per file (None: all).
        seed: Seed of the image sample.
        decode: Also decode every checked image with PIL (otherwise: existence only).
        workers: Threads used for the image checks (0: check in the calling thread).
        max_problems: How many offending entries the report lists (all are counted).
    """
    if sample is not None and sample < 0:
        raise ValueError(f"preflight: sample must be >= 0 or None, got {sample}")
    image_root = Path(image_root)
    report = PreflightReport(str(image_root), decode, sample, seed)
    log = _ProblemLog(max_problems)
    root_ok = image_root.is_dir()
    if not root_ok:
        log.add(Problem(str(image_root), None, None, "image root is not a directory"))
    cache: dict[Path, str | None] = {}
    with _strict_truncation():
        for ann in map(Path, ann_files):
            stats, images = scan_annotations(ann, log)
            if root_ok:
                chosen = choose_images(images, sample, seed)
                check_file_images(ann, chosen, image_root, decode, workers, cache, stats, log)
            report.files.append(stats)
    report.problems, report.problem_count = log.kept, log.count
    return report
