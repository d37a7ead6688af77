"""Resource tiers (slurm/resources.yaml) with environment-variable overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from model.config.loader import ConfigError, from_dict, load_yaml_file

RESOURCES_FILE = Path(__file__).with_name("resources.yaml")
ENV_PREFIX = "SOFTMASK_SLURM_"


@dataclass(frozen=True)
class Tier:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: int = 4
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # The whole node for the job (sbatch --exclusive): for timing runs, which other jobs'
    # load would distort.
    exclusive: bool = False
    signal_delay_s: int = 120
    max_num_timeout: int = 30

    def __post_init__(self) -> None:
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node={self.tasks_per_node} must equal gpus_per_node="
                             f"{self.gpus_per_node} (one task per GPU)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _coerce(name: str, raw: str, current: object) -> object:
    if raw.lower() in ("", "none", "null"):
        return None
    if name == "exclusive":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"environment {ENV_PREFIX}EXCLUSIVE: expected true or false, "
                              f"got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, int) or name in {"nodes", "gpus_per_node", "tasks_per_node",
                                            "cpus_per_task", "mem_gb", "timeout_min",
                                            "signal_delay_s", "max_num_timeout"}:
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"environment {ENV_PREFIX}{name.upper()}: expected an integer, "
                              f"got {raw!r}") from exc
    return raw


def load_tier(name: str, path: Path = RESOURCES_FILE, env: dict[str, str] | None = None) -> Tier:
    """The named tier merged over the file's defaults, then ``SOFTMASK_SLURM_*`` variables."""
    data = load_yaml_file(path)
    tiers = data.get("tiers", {})
    if name not in tiers:
        raise ConfigError(f"{path}: unknown resource tier {name!r}; known tiers: {sorted(tiers)}")
    merged = {**data.get("defaults", {}), **tiers[name]}
    env = dict(os.environ if env is None else env)
    for f in fields(Tier):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            merged[f.name] = _coerce(f.name, env[key], merged.get(f.name))
    return from_dict(Tier, merged, default_origin=f"{path} (tier {name})")


def allocated_threads(env: Mapping[str, str] | None = None) -> int | None:
    """torch intra-op threads for a job process, or None to keep torch's default.

    A local grid's per-job share of the cores (``SOFTMASK_THREADS``, set by run_grid) comes
    first, then the task's SLURM allocation (``SLURM_CPUS_PER_TASK``). Without either, torch
    would start one thread per core of the whole node, which on a shared node contends with
    other jobs and makes a job's speed depend on their load.
    """
    env = os.environ if env is None else env
    for name in ("SOFTMASK_THREADS", "SLURM_CPUS_PER_TASK"):
        value = env.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None
