"""The two ways a checkpoint can be refused: it does not fit the model, or it cannot be read."""

from __future__ import annotations

from typing import Any


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model; the message lists every offending key."""

    def __init__(self, message: str, report: Any = None) -> None:
        """``report``: the ``LoadReport`` of the refused load, when there is one."""
        super().__init__(message)
        self.report = report


class CheckpointReadError(ValueError):
    """A file is not a readable checkpoint of the expected layout (names the file and key)."""
