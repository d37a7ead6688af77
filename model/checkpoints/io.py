"""Reading checkpoint files safely (weights only unless trusted) and finding the state dict in
them, whatever container the file uses (ALBEF's ``{'model': ...}``, ours, a bare state)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.checkpoints.errors import CheckpointReadError

log = logging.getLogger(__name__)


def _numpy_safe_globals() -> list[Any]:
    """NumPy arrays/scalars (e.g. saved RNG states) are plain data; allow them under
    ``weights_only`` so such files need no full unpickling."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"}
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def _torch_load(path: Path, weights_only: bool) -> Any:
    # mmap avoids reading what we then discard (optimizer state); legacy non-zip files
    # cannot be mapped, so they are read normally.
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError) as exc:  # torch's zip reader does not name the file
        raise CheckpointReadError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {exc}); if a job was "
            "killed while writing it, the run directory's previous checkpoint is the last good "
            "one") from exc


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only`` (tensors, containers, NumPy data).

    Files holding other Python objects need ``trust_pickle=True``, which runs the full unpickler
    (arbitrary code): only for files from a trusted source.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            raise CheckpointReadError(
                f"{path}: holds Python objects that safe (weights_only) loading refuses "
                f"({', '.join(unsafe) or exc}). If the file comes from a trusted source, pass "
                "trust_pickle=True (CLI: --trust-pickle)"
            ) from exc
    log.warning("%s: loading with full unpickling (trust_pickle=True)", path)
    return _torch_load(path, weights_only=False)


def extract_state(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside a loaded file: ``obj['model']`` (ALBEF, releases),
    ``obj['objective']`` (our training checkpoints) or ``obj`` itself. Other entries
    (optimizer, config, epoch, ...) are ignored. A DDP ``module.`` prefix is removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{source}: expected a dict (a state dict or {{'model': state}}),"
                                  f" got {type(obj).__name__}")
    inner = obj
    for key in ("model", "objective"):
        if isinstance(obj.get(key), Mapping):
            inner = obj[key]
            break
    bad = [k for k, v in inner.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointReadError(
            f"{source}: entries {bad[:5]} are not tensors; expected a state dict, or a dict "
            f"holding one under 'model' (ALBEF) or 'objective' (our training checkpoints); "
            f"top-level keys: {sorted(map(str, obj))[:10]}")
    state = dict(inner)
    if state and all(k.startswith("module.") for k in state):
        log.info("%s: removing the DistributedDataParallel 'module.' prefix", source)
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state(path_or_state: str | Path | Mapping[str, Any], *, trust_pickle: bool = False
               ) -> tuple[dict[str, Tensor], str]:
    """(state dict, source description) from a file path or an in-memory (wrapped) state."""
    if isinstance(path_or_state, Mapping):
        return extract_state(path_or_state, "<in-memory state>"), "<in-memory state>"
    obj = read_checkpoint(path_or_state, trust_pickle=trust_pickle)
    return extract_state(obj, str(path_or_state)), str(path_or_state)
