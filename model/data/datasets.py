"""Datasets over ALBEF's caption files (and COCO caption files for evaluation).

Caption files are JSON lists of entries ``{"image": path relative to image_root, "caption": str or
list of str}`` (retrieval-training files may add ``"image_id"``). Every caption goes through
``pre_caption``. Images are loaded with PIL and converted to RGB.

Training datasets survive unreadable images: a bad file is logged once, counted, and replaced by
the next readable item, so one corrupt file cannot end a multi-day epoch. Evaluation datasets
raise instead, because silently replacing an evaluation image would change the metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from model.data.captions import pre_caption
from model.data.jsonio import DataFileError, iter_json_array
from model.data.packed import CaptionTable, StringPacker

logger = logging.getLogger(__name__)

# A transform maps a PIL image to a tensor, or (MultiView) to a dict of named tensors.
Transform = Callable[[Image.Image], torch.Tensor | Mapping[str, torch.Tensor]]
# After this many unreadable images in a row the image root is almost certainly wrong.
MAX_CONSECUTIVE_UNREADABLE = 64
# What PIL raises for missing, truncated or corrupt files. SyntaxError is included because some
# PIL decoders report malformed headers with it.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


class UnreadableImageError(OSError):
    """An image could not be read (evaluation datasets, or a whole unreadable training set)."""


def _iter_json_list(path: Path) -> Iterator[Any]:
    """The elements of a caption file, decoded one at a time by the converters' chunked reader.

    ``json.load`` builds every object of the file at once, in every training process at
    start-up (a 237 MiB caption file: 946 MiB at its peak; benchmarks/bench_manifest.py);
    streaming holds one chunk of text and the current element, so the peak is the packed
    table being filled (244 MiB).
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        yield from iter_json_array(path, "annotation file")
    except DataFileError as err:  # malformed JSON or not a list; the message names the file
        raise AnnotationError(str(err)) from err


def _entry_captions(path: Path, index: int, entry: Any) -> tuple[str, list[str]]:
    """Validate one caption-file entry; return its image path and its raw captions."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("image", "caption"):
        if key not in entry:
            raise AnnotationError(f"{where}: missing key {key!r} (keys: {sorted(entry)})")
    image = entry["image"]
    if not isinstance(image, str) or not image:
        raise AnnotationError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    caption = entry["caption"]
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions:
        raise AnnotationError(
            f"{where}: 'caption' must be a string or a non-empty list of strings, got {caption!r}"
        )
    for k, text in enumerate(captions):
        if not isinstance(text, str) or not text.strip():
            raise AnnotationError(f"{where}: caption {k} is empty or not a string: {text!r}")
    return image, captions


@dataclass(frozen=True)
class CaptionEntry:
    """One validated caption-file entry.

    Attributes:
        image: Image path relative to the image root.
        caption: The raw caption field (a string or a list of strings), kept as written because
            ALBEF samples from a list even when it holds a single caption.
        image_id: The optional ``image_id`` field (retrieval-training files), else None.
    """

    image: str
    caption: str | list[str]
    image_id: Any = None

    @property
    def captions(self) -> list[str]:
        """The captions as a list."""
        return [self.caption] if isinstance(self.caption, str) else list(self.caption)


def load_caption_file(path: str | Path) -> list[CaptionEntry]:
    """Read and validate an ALBEF caption file.

    Returns:
        The entries in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        AnnotationError: If the file is not a JSON list of valid entries.
    """
    return list(iter_caption_file(path))


def iter_caption_file(path: str | Path) -> Iterator[CaptionEntry]:
    """:func:`load_caption_file` one validated entry at a time (the datasets pack them as they
    come, so a large file's entries are not held twice)."""
    path = Path(path)
    for index, entry in enumerate(_iter_json_list(path)):
        image, _ = _entry_captions(path, index, entry)
        yield CaptionEntry(image=image, caption=entry["caption"], image_id=entry.get("image_id"))


def _check_max_words(max_words: int) -> None:
    """Reject a non-positive word limit before any file is read."""
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")


class _ImageCaptionBase(Dataset):
    """Image loading, transform application and unreadable-image handling shared by datasets."""

    def __init__(self, image_root: str | Path, transform: Transform, max_words: int) -> None:
        """Store the shared settings and start the unreadable-image bookkeeping."""
        _check_max_words(max_words)
        self.image_root = Path(image_root)
        self.transform = transform
        self.max_words = max_words
        # Per process: with DataLoader workers every worker keeps its own count.
        self.skipped = 0
        self.bad_files: set[str] = set()

    def _image_path(self, index: int) -> str:
        """Relative path of the image of item ``index`` (defined by subclasses)."""
        raise NotImplementedError

    def _load_image(self, index: int) -> Image.Image:
        """Item ``index``'s image as RGB (raises one of ``IMAGE_ERRORS`` if unreadable)."""
        with Image.open(self.image_root / self._image_path(index)) as raw:
            return raw.convert("RGB")  # forces the full decode, so corrupt data fails here

    def _views(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Apply the transform: ``{"image": ...}``, plus further views from a MultiView."""
        out = self.transform(image)
        if isinstance(out, Mapping):
            return dict(out)
        return {"image": out}

    def _views_or_next(self, index: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Views of item ``index``, or of the next readable item (index+1, +2, ... wrapping).

        Each unreadable file is logged once and every substitution counts in ``skipped``.

        Raises:
            UnreadableImageError: After ``MAX_CONSECUTIVE_UNREADABLE`` (or all) items in a row
                failed.
        """
        n = len(self)
        attempts = min(n, MAX_CONSECUTIVE_UNREADABLE)
        for step in range(attempts):
            current = (index + step) % n
            try:
                image = self._load_image(current)
            except IMAGE_ERRORS as err:
                self._note_bad(current, err)
                continue
            # Outside the try: an error in the transform is a bug, not a bad file.
            return current, self._views(image)
        raise UnreadableImageError(
            f"{attempts} images in a row could not be read, starting at item {index} "
            f"({self.image_root / self._image_path(index)}); check image_root={self.image_root}"
        )

    def _note_bad(self, index: int, err: BaseException) -> None:
        """Count a substitution; warn the first time a file is seen to be unreadable."""
        self.skipped += 1
        relative = self._image_path(index)
        if relative not in self.bad_files:
            self.bad_files.add(relative)
            logger.warning(
                "skipping unreadable image %s (item %d): %s: %s",
                self.image_root / relative,
                index,
                type(err).__name__,
                err,
            )


class PretrainDataset(_ImageCaptionBase):
    """ALBEF's pre-training dataset: one item per entry, one random caption per load.

    Items: ``{"image": Tensor, ["image_strong": Tensor,] "caption": str, "index": int}``, where
    ``index`` is the entry actually returned (the next readable one if the asked-for image is
    unreadable). A list caption is sampled uniformly with Python's ``random`` on every load (the
    DataLoader seeds it per worker).
    """

    def __init__(
        self,
        ann_files: Sequence[str | Path],
        image_root: str | Path,
        transform: Transform,
        max_words: int = 30,
    ) -> None:
        """Args: ann_files: caption files, concatenated in order; image_root: base of the
        entries' image paths; transform: a transform or a MultiView; max_words: see pre_caption.
        """
        super().__init__(image_root, transform, max_words)
        if isinstance(ann_files, (str, Path)):
            raise TypeError("ann_files must be a sequence of paths, got a single path")
        # Packed arrays, not a list of entries: see model/data/packed.py (memory per process,
        # pages shared with forked DataLoader workers).
        self.table = CaptionTable((e.image, e.caption) for f in ann_files
                                  for e in iter_caption_file(f))
        if not len(self.table):
            raise AnnotationError(f"no entries in annotation files {[str(f) for f in ann_files]}")

    def __len__(self) -> int:
        """Number of items."""
        return len(self.table)

    def _image_path(self, index: int) -> str:
        """Relative image path of item ``index``."""
        return self.table.images[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Image view(s), one cleaned caption, and the index of the entry actually used."""
        index, views = self._views_or_next(index)
        # As ALBEF: a list is always sampled (one draw from `random`), a string never.
        text = self.table.sample_caption(index)
        return {**views, "caption": pre_caption(text, self.max_words), "index": index}


class RetrievalTrainDataset(_ImageCaptionBase):
    """ALBEF's retrieval-training dataset: one item per caption.

    Items: ``{"image", ["image_strong",] "caption": str, "image_idx": int, "index": int}``.
    ``image_idx`` numbers distinct images in order of first appearance, keyed by the entry's
    ``image_id`` when present (ALBEF's COCO/Flickr train files have one entry per caption with an
    ``image_id``) and by its image path otherwise; for files with one entry per image it is the
    entry's position. ALBEF's contrastive targets treat captions with equal ``image_idx`` as
    positives of each other.
    """

    def __init__(
        self,
        ann_files: Sequence[str | Path],
        image_root: str | Path,
        transform: Transform,
        max_words: int = 30,
    ) -> None:
        """Arguments as for :class:`PretrainDataset`."""
        super().__init__(image_root, transform, max_words)
        if isinstance(ann_files, (str, Path)):
            raise TypeError("ann_files must be a sequence of paths, got a single path")
        images, captions = StringPacker(), StringPacker()
        image_idx = array("q")
        image_ids: dict[Any, int] = {}
        for ann_file in ann_files:
            for entry in iter_caption_file(ann_file):
                key = entry.image_id if entry.image_id is not None else entry.image
                idx = image_ids.setdefault(key, len(image_ids))
                for caption in entry.captions:
                    images.append(entry.image)
                    captions.append(caption)
                    image_idx.append(idx)
        if not len(captions):
            raise AnnotationError(f"no entries in annotation files {[str(f) for f in ann_files]}")
        # One item per caption, packed: see model/data/packed.py.
        self.images, self.captions = images.build(), captions.build()
        self.image_idx = np.frombuffer(image_idx, dtype=np.int64)
        self.n_images = len(image_ids)

    def __len__(self) -> int:
        """Number of items."""
        return len(self.captions)

    def _image_path(self, index: int) -> str:
        """Relative image path of item ``index``."""
        return self.images[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Image view(s), the cleaned caption, its image's ``image_idx`` and the sample index."""
        index, views = self._views_or_next(index)
        caption, image_idx = self.captions[index], int(self.image_idx[index])
        return {
            **views,
            "caption": pre_caption(caption, self.max_words),
            "image_idx": image_idx,
            "index": index,
        }


class RetrievalEvalDataset(_ImageCaptionBase):
    """ALBEF's retrieval-evaluation split: images as items, captions as bookkeeping.

    Attributes:
        texts: Every caption, ``pre_caption``-ed, flattened in annotation order.
        img2txt: Image index -> ids (positions in ``texts``) of its captions.
        txt2img: Caption id -> image index.
        image_paths: Image path of every image index (relative to ``image_root``).

    Items: ``{"image": Tensor, "index": i}``, one per image, in annotation order. An unreadable
    image raises :class:`UnreadableImageError` (no substitution during evaluation).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transform: Transform,
        max_words: int = 30,
    ) -> None:
        """Read an ALBEF evaluation file: a list of ``{"image", "caption": [captions]}``
        (a single string caption is accepted as a one-caption list)."""
        entries = [(e.image, e.captions) for e in load_caption_file(ann_file)]
        self._setup(entries, ann_file, image_root, transform, max_words)

    @classmethod
    def from_coco(
        cls,
        ann_file: str | Path,
        image_root: str | Path,
        transform: Transform,
        max_words: int = 30,
    ) -> RetrievalEvalDataset:
        """Read a COCO captions file with pycocotools: images in increasing id order, each
        image's captions in increasing annotation-id order, ``file_name`` relative to
        ``image_root``."""
        dataset = cls.__new__(cls)
        dataset._setup(_coco_entries(Path(ann_file)), ann_file, image_root, transform, max_words)
        return dataset

    def _setup(
        self,
        entries: list[tuple[str, list[str]]],
        ann_file: str | Path,
        image_root: str | Path,
        transform: Transform,
        max_words: int,
    ) -> None:
        """Build ALBEF's bookkeeping from (image path, captions) pairs."""
        super().__init__(image_root, transform, max_words)
        if not entries:
            raise AnnotationError(f"{ann_file}: no images")
        self.ann_file = Path(ann_file)
        self.image_paths: list[str] = []
        self.texts: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for image_index, (image, captions) in enumerate(entries):
            self.image_paths.append(image)
            self.img2txt[image_index] = []
            for caption in captions:
                text_id = len(self.texts)
                self.texts.append(pre_caption(caption, max_words))
                self.img2txt[image_index].append(text_id)
                self.txt2img[text_id] = image_index

    def __len__(self) -> int:
        """Number of items."""
        return len(self.image_paths)

    def _image_path(self, index: int) -> str:
        """Relative image path of item ``index``."""
        return self.image_paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Image view(s) of image ``index`` and the index itself."""
        try:
            image = self._load_image(index)
        except IMAGE_ERRORS as err:
            raise UnreadableImageError(
                f"{self.ann_file}: image {index} ({self.image_root / self.image_paths[index]}) "
                f"cannot be read: {err}"
            ) from err
        return {**self._views(image), "index": index}


def _coco_entries(path: Path) -> list[tuple[str, list[str]]]:
    """(file_name, captions) per image of a COCO captions file, in ALBEF's order."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        # pycocotools reports progress with print(); keep library output in logging instead.
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            coco = COCO(str(path))
    except (AssertionError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: not a COCO annotation file ({err})") from err
    logger.debug("pycocotools: %s", chatter.getvalue().strip())
    entries = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        file_name = info.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise AnnotationError(f"{path}: image id {image_id} has no 'file_name'")
        captions = []
        for ann_id in sorted(coco.getAnnIds(imgIds=[image_id])):
            caption = coco.anns[ann_id].get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise AnnotationError(
                    f"{path}: annotation id {ann_id} (image id {image_id}) has no caption text"
                )
            captions.append(caption)
        if not captions:
            raise AnnotationError(f"{path}: image id {image_id} ({file_name}) has no captions")
        entries.append((file_name, captions))
    return entries
