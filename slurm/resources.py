"""Resource tiers (slurm/resources.yaml) with environment-variable overrides."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from model.config.loader import ConfigError, FieldError, from_dict, load_yaml_file

RESOURCES_FILE = Path(__file__).with_name("resources.yaml")
ENV_PREFIX = "SOFTMASK_SLURM_"
THREADS_ENV = "SOFTMASK_THREADS"  # a local job's share of the cores


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
    # Shell lines the batch script runs before the job (module loads, environment
    # activation); submitit's slurm_setup.
    setup: tuple[str, ...] = ()
    exclude: str | None = None  # nodes to avoid (sbatch --exclude)
    comment: str | None = None  # sbatch --comment
    # A typed GPU request, e.g. "gpu:a100:8" (sbatch --gres); replaces gpus_per_node's
    # untyped request when set.
    gres: str | None = None
    reservation: str | None = None  # sbatch --reservation
    # Any other sbatch option, without the dashes (e.g. {mail-type: END}); submitit's
    # slurm_additional_parameters.
    sbatch: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "mem_gb", "signal_delay_s", "max_num_timeout"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node={self.tasks_per_node} must equal gpus_per_node="
                             f"{self.gpus_per_node} (one task per GPU)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _coerce(name: str, raw: str, current: object) -> object:
    if name == "setup":  # one shell line (it may chain commands with && or ;)
        return [raw] if raw.strip() else []
    if name == "sbatch":
        return _sbatch_pairs(raw)
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


def _sbatch_pairs(raw: str) -> dict[str, str]:
    """``SOFTMASK_SLURM_SBATCH="mail-type=END,licenses=scratch"`` as a mapping."""
    pairs = {}
    for item in (p.strip() for p in raw.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"environment {ENV_PREFIX}SBATCH: expected option=value pairs "
                              f"separated by commas, got {item!r}")
        pairs[key.strip().lstrip("-")] = value.strip()
    return pairs


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """The ``SOFTMASK_SLURM_*`` variables, each naming a tier field (an unknown name is an
    error with a suggestion: a typo must not be ignored silently)."""
    known = {ENV_PREFIX + f.name.upper(): f.name for f in fields(Tier)}
    errors = []
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
        errors.append(f"environment {key}: not a resource setting"
                      + (f" (did you mean {close[0]}?)" if close else "")
                      + f"; known: {', '.join(sorted(known))}")
    if errors:
        raise ConfigError(errors)
    return {known[k]: v for k, v in env.items() if k in known}


def load_tier(name: str, path: Path = RESOURCES_FILE, env: dict[str, str] | None = None) -> Tier:
    """The named tier merged over the file's defaults, then ``SOFTMASK_SLURM_*`` variables
    (validated like the file's values: the error names the variable)."""
    data = load_yaml_file(path)
    tiers = data.get("tiers", {})
    if name not in tiers:
        raise ConfigError(f"{path}: unknown resource tier {name!r}; known tiers: {sorted(tiers)}")
    merged = {**data.get("defaults", {}), **tiers[name]}
    origins = {}
    for field_name, raw in _env_overrides(dict(os.environ if env is None else env)).items():
        merged[field_name] = _coerce(field_name, raw, merged.get(field_name))
        origins[field_name] = f"environment {ENV_PREFIX}{field_name.upper()}"
    return from_dict(Tier, merged, origins, default_origin=f"{path} (tier {name})")


def allocated_threads(env: Mapping[str, str] | None = None) -> int | None:
    """torch intra-op threads for a job process, or None to keep torch's default.

    A local grid's per-job share of the cores (``SOFTMASK_THREADS``, set by
    :func:`local_thread_share`) comes first, then the task's SLURM allocation
    (``SLURM_CPUS_PER_TASK``). Without either, torch would start one thread per core of the
    whole node, which on a shared node contends with other jobs and makes a job's speed depend
    on their load.
    """
    env = os.environ if env is None else env
    for name in (THREADS_ENV, "SLURM_CPUS_PER_TASK"):
        value = env.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


@contextlib.contextmanager
def local_thread_share(max_parallel: int) -> Iterator[int]:
    """Split this machine's cores between ``max_parallel`` local jobs while they run: set
    ``SOFTMASK_THREADS`` (inherited by the local executor's subprocesses, read in-process by the
    debug executor) and restore the environment afterwards, so that a SLURM job submitted later
    from the same process keeps its own allocation."""
    before = os.environ.get(THREADS_ENV)
    share = max(1, (os.cpu_count() or 1) // max(1, max_parallel))
    os.environ[THREADS_ENV] = str(share)
    try:
        yield share
    finally:
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before
