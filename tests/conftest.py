"""Shared test configuration: deterministic, single-threaded CPU runs."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Two cores are shared by the whole suite; one intra-op thread per test process keeps timings
# stable and avoids oversubscription when tests spawn worker processes.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# The real single-node SLURM cluster (started once per session, only by tests that ask for it).
from tests.fixtures_slurm import slurm_cluster, slurm_env  # noqa: E402,F401


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory):
    """One data cache directory per session: each synthetic spec is generated once."""
    return tmp_path_factory.mktemp("data_cache")
