"""Names and paths the harness writes: safe characters, inside their root, no symlinks followed.

A matrix, a shard index or a run folder may come from someone else. Cell and grid names become
directory and file names, so they are restricted to a safe character set before anything is
written; every run directory is checked to resolve inside its runs root; and the files the
harness appends to or overwrites inside a run folder are opened with ``O_NOFOLLOW``, so a
symlink planted there is an error instead of a write through it. Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A directory or file name component: starts with a letter or digit (never "." or ".."), then
# letters, digits, "_", "-", "."; at most 100 characters.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SAFE_NAME_TEXT = ("letters, digits, '_', '-' and '.', starting with a letter or digit, at most "
                  "100 characters")


class UnsafePathError(ValueError):
    """A name or path that would write outside its folder, or through a symlink."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a directory or file name here (None when it can)."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        return f"{name!r} is not a safe name (expected {SAFE_NAME_TEXT})"
    return None


def check_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved); else UnsafePathError."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if not path_r.is_relative_to(root_r):
        raise UnsafePathError(f"{path} resolves to {path_r}, outside {root_r}")
    return path_r


def _open_flags(append: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    return flags | (os.O_APPEND if append else os.O_TRUNC)


def open_no_follow(path: str | os.PathLike[str], append: bool = True):
    """A text file opened for appending (or truncated) that is never a symlink's target.

    Raises:
        UnsafePathError: ``path`` is a symlink (the error names it and where it points).
    """
    path = Path(path)
    try:
        fd = os.open(path, _open_flags(append), 0o644)
    except OSError:
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symlink (to {os.readlink(path)}); the harness "
                                  f"does not write through links in a run folder: remove it"
                                  ) from None
        raise
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8")


def write_text_no_follow(path: str | os.PathLike[str], text: str) -> None:
    """Write a small marker file (DONE, FAILED) without following a symlink at ``path``."""
    with open_no_follow(path, append=False) as fh:
        fh.write(text)


def symlinks_in(folder: str | os.PathLike[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` in ``folder`` are symlinks (files the harness writes there)."""
    return [n for n in names if (Path(folder) / n).is_symlink()]


def output_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be (or become) a writable directory, or None: it is a file, lies
    under a file, or its nearest existing folder is not writable. Checked before any training,
    so results are never computed only to fail at the end."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is an existing file, not a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"lies under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
