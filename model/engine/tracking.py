"""Experiment tracking: TensorBoard event files for every run, Weights & Biases on request.

``train.log_to`` lists the backends (default ``["tensorboard"]``). TensorBoard writes to
``<run_dir>/tb``, so ``tensorboard --logdir runs/<grid>`` shows every cell and seed of a grid
side by side. W&B is opt-in (``"wandb"``): one W&B run per run directory, in the mode that
``WANDB_MODE`` selects (``offline`` writes locally and syncs later); nothing calls the network
unless it is listed. Trackers only receive numbers the trainer already read back for its logs,
so they never add a device sync or change a result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TB_DIR = "tb"
# metrics.jsonl bookkeeping that is not a curve.
_SKIP = frozenset({"kind", "step", "epoch", "split"})


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in _SKIP and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class Tracker:
    """Fan-out to the configured backends; a no-op without any."""

    def __init__(self, run_dir: Path, backends: Sequence[str],
                 identity: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None,
                 purge_step: int | None = None) -> None:
        self.writers: list[Any] = []
        self._wandb = None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events an interrupted attempt wrote after its checkpoint,
            # as metrics.jsonl drops those lines (run_io.keep_lines_until).
            self.writers.append(SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR),
                                              purge_step=purge_step))
        if "wandb" in backends:
            self._wandb = _init_wandb(Path(run_dir), identity or {}, config or {})

    def log(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Every finite numeric entry of ``record`` (a metrics.jsonl row) at ``step``."""
        values = {f"{prefix}{k}": v for k, v in _scalars(record).items()}
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(key, value, global_step=step)
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.flush()
            writer.close()
        self.writers = []
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(run_dir: Path, identity: Mapping[str, Any], config: Mapping[str, Any]):
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError("train.log_to lists 'wandb' but the wandb package is not "
                           "installed (pip install wandb), or remove it from train.log_to"
                           ) from exc
    name = str(identity.get("run_id") or run_dir.name)
    return wandb.init(project=str(identity.get("grid") or "softmask"), name=name, id=name,
                      group=str(identity.get("cell") or ""), dir=str(run_dir), resume="allow",
                      config=dict(config), reinit=True)


def make_tracker(run_dir: Path, backends: Sequence[str], is_main: bool,
                 identity: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None,
                 purge_step: int | None = None) -> Tracker:
    """The run's tracker on rank 0; every other rank gets a silent one. ``purge_step``: a
    resumed run's first step (TensorBoard events from there on are dropped)."""
    return Tracker(run_dir, backends if is_main else (), identity, config, purge_step)
