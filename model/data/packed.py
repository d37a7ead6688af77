"""Caption-file contents held as a few flat numpy arrays instead of millions of Python objects.

A pre-training manifest of N entries kept as a list of objects costs several hundred bytes per
entry in every process (4M entries: ~2 GB), and DataLoader workers forked from it copy those
pages one by one, because reading a Python object writes its reference count. The same strings
packed into one UTF-8 byte buffer plus an offsets array cost their bytes plus 8 per string, and
reading them never writes to the pages, so forked workers share them.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterable, Sequence

import numpy as np


def _span(ends: np.ndarray, index: int) -> tuple[int, int]:
    """[start, stop) of item ``index`` in a buffer whose items end at ``ends``."""
    return (int(ends[index - 1]) if index else 0), int(ends[index])


class StringPacker:
    """Appends strings in place (one growing byte buffer, one offsets array), so that building
    never holds a list of str or of encoded copies: little more than the result itself."""

    def __init__(self) -> None:
        self._buffer, self._ends = bytearray(), array("q")

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, text: str) -> None:
        self._buffer += text.encode("utf-8")
        self._ends.append(len(self._buffer))

    def build(self) -> PackedStrings:
        """The packed strings; numpy views of the buffers (no copy). Append nothing after."""
        return PackedStrings(np.frombuffer(self._buffer, dtype=np.uint8),
                             np.frombuffer(self._ends, dtype=np.int64))


class PackedStrings(Sequence[str]):
    """An immutable sequence of strings in one ``uint8`` buffer with ``int64`` end offsets."""

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        self._data, self._ends = data, ends

    @classmethod
    def pack(cls, strings: Iterable[str]) -> PackedStrings:
        """Pack any iterable of strings."""
        packer = StringPacker()
        for text in strings:
            packer.append(text)
        return packer.build()

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        start, stop = _span(self._ends, index % len(self))
        return self._data[start:stop].tobytes().decode("utf-8")

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the strings cost in memory)."""
        return int(self._data.nbytes + self._ends.nbytes)


class CaptionTable:
    """Per entry: an image path and a caption field (a string, or a list of strings).

    Whether the field was a list is kept, because ALBEF's pre-training dataset samples a list
    (one ``random.choice``, even for a single caption) and never samples a string.
    """

    def __init__(self, entries: Iterable[tuple[str, str | list[str]]]) -> None:
        images, captions = StringPacker(), StringPacker()
        ends, is_list = array("q"), array("b")
        for image, caption in entries:
            images.append(image)
            for text in [caption] if isinstance(caption, str) else caption:
                captions.append(text)
            ends.append(len(captions))
            is_list.append(not isinstance(caption, str))
        self.images, self.captions = images.build(), captions.build()
        self._caption_ends = np.frombuffer(ends, dtype=np.int64)
        self._is_list = np.frombuffer(is_list, dtype=np.int8).view(bool)

    def __len__(self) -> int:
        return len(self.images)

    def caption_range(self, index: int) -> range:
        """Positions in ``captions`` of entry ``index``'s captions."""
        return range(*_span(self._caption_ends, index))

    def sample_caption(self, index: int) -> str:
        """Entry ``index``'s caption, drawn with ``random.choice`` when the field is a list.

        ``random.choice`` over the range draws exactly as it would over the list itself (one
        ``randbelow(len)``), so the stream of captions is the one ALBEF's dataset produces.
        """
        positions = self.caption_range(index)
        if not self._is_list[index]:
            return self.captions[positions.start]
        return self.captions[random.choice(positions)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return (self.images.nbytes + self.captions.nbytes + self._caption_ends.nbytes
                + self._is_list.nbytes)
