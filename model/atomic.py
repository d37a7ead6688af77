"""Atomic file writes: a temporary file beside the target, renamed into place on success.

A reader (or a later run) then sees the old file or the new one, never a truncated one, even
when the writer is killed mid-write (a preempted job, Ctrl-C). Standard library only, so that
torch-free modules (the config loader) can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """Open a temporary file next to ``path`` and move it into place only on success.

    A crash while writing (e.g. streaming a multi-GB annotation list) never leaves a partial
    file at ``path``; the temporary file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; outputs are data meant to be shared.
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file (JSON, YAML, CSV, Markdown) atomically."""
    with atomic_writer(path) as fh:
        fh.write(text)
