"""Resumable, rank-aware sampling and per-sample seeded augmentation.

Exact resume needs the data stream to be a pure function of (seed, epoch, position): the sampler
yields the epoch's permutation from any start position, and every sample's augmentation RNG is
seeded from (seed, epoch, index), so it does not depend on which loader worker produced it or on
where a run was interrupted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """A shuffled, rank-sharded sampler (``drop_last`` semantics) that can start mid-epoch.

    Each epoch is a permutation drawn from ``seed + epoch``; rank r takes every world-th index,
    trimmed so that every rank has the same number of full batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start = 0, 0
        self.batches_per_epoch = size // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {size} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` local batches."""
        self.epoch, self.start = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.batches_per_epoch * self.batch_size
        return order[self.rank::self.world_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size


class SeededDataset(Dataset):
    """Wraps a map-style dataset so sample i of epoch e always gets the same random draws.

    torch's, NumPy's and Python's RNGs are re-seeded from (seed, epoch, i) around the item; in the
    main process the global states are restored afterwards, so training randomness (dropout) is
    untouched when ``num_workers = 0``.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> Any:
        with seeded_draws(sample_seed(self.seed, self.epoch, index)):
            return self.base[index]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random draws in ``epoch`` (JSON and shard paths alike)."""
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**31)


@contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """Seed torch's, NumPy's and Python's RNGs for a block and restore them afterwards (so the
    main process's training randomness is untouched when there are no loader workers)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
