"""Reading and writing the JSON and text files of datasets: one home for the training-time
readers (model/data/datasets.py, the preflight) and the offline converters (model/data/prepare/).

Large caption lists are read one element at a time (:func:`iter_json_array`), outputs are
written atomically, and every error names the file and the element or line.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from model.atomic import atomic_writer

# One JSON array element larger than this is treated as a broken file rather than read into memory.
_MAX_ELEMENT_CHARS = 1 << 27
_CHUNK_CHARS = 1 << 20
_NON_WHITESPACE = re.compile(r"\S")


class DataFileError(ValueError):
    """A user-fixable problem with an input data file; the message names the file and entry."""


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing file, else raise a DataFileError naming ``what``."""
    if not path.is_file():
        raise DataFileError(f"{what} not found: {path} (expected an existing file)")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing directory, else raise DataFileError naming ``what``."""
    if not path.is_dir():
        raise DataFileError(f"{what} not found: {path} (expected an existing directory)")
    return path


def read_json(path: Path, what: str) -> Any:
    """Parse a whole JSON file, turning I/O and syntax errors into DataFileError.

    Use this for inputs that fit in memory (Karpathy splits, VG image metadata). Large lists
    should go through :func:`iter_json_array` instead.
    """
    require_file(path, what)
    try:
        with path.open(encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataFileError(
            f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataFileError(f"{what} {path} is not UTF-8 text: {err}") from err


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
                    raise DataFileError(
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
            raise DataFileError(f"{self._path}: expected a JSON list at top level, found {found}")
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            self._check_trailing()
            return
        index = 0
        while True:
            if not self._peek():
                raise DataFileError(f"{self._path}: file ends inside the list (element {index})")
            yield self._decode(index)
            sep = self._peek()
            self._pos += 1
            if sep == "]":
                self._check_trailing()
                return
            if sep != ",":
                found = repr(sep) if sep else "end of file"
                raise DataFileError(
                    f"{self._path}: expected ',' or ']' after list element {index}, found {found}"
                )
            index += 1

    def _check_trailing(self) -> None:
        """Reject text after the closing bracket (a concatenation of two files, for instance)."""
        extra = self._peek()
        if extra:
            raise DataFileError(f"{self._path}: unexpected {extra!r} after the closing ']'")


def read_json_items(path: Path, what: str) -> list[Any]:
    """A whole JSON file that must be a non-empty list (an evaluation's item file)."""
    items = read_json(path, what)
    if not isinstance(items, list) or not items:
        raise DataFileError(f"{path}: expected a non-empty JSON list of items")
    return items


def iter_json_array(path: Path, what: str = "JSON list") -> Iterator[Any]:
    """Yield the elements of a top-level JSON list one at a time (constant memory).

    Raises:
        DataFileError: If the file is missing, is not a list, or an element is malformed; the
            message names the file and the element index.
    """
    require_file(path, what)
    try:
        with path.open(encoding="utf-8-sig") as fh:
            yield from _ArrayStream(fh, path)
    except UnicodeDecodeError as err:
        offset, bad = first_invalid_utf8(path)
        raise DataFileError(f"{what} {path}: not UTF-8 text: invalid byte {bad} at byte offset "
                            f"{offset} ({err.reason}); caption and annotation files must be "
                            f"UTF-8 (re-encode it, e.g. iconv -f latin1 -t utf-8)") from err


def first_invalid_utf8(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(byte offset, the byte in hex) of the first byte of ``path`` that is not valid UTF-8;
    (-1, "") when the whole file decodes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while True:
            data = fh.read(chunk)
            pending = decoder.getstate()[0]  # an incomplete sequence from the previous chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                start = offset - len(pending) + err.start
                raw = (pending + data)[err.start:err.start + 1]
                return start, f"0x{raw.hex()}"
            if not data:
                return -1, ""
            offset += len(data)


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
