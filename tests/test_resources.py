"""Resource tiers: the file's values, environment overrides with clear errors, and how a tier
becomes submitit's SLURM parameters (no cluster needed: the parameters are inspected)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config.loader import ConfigError
from slurm.executor import make_executor
from slurm.resources import load_tier


def test_tiers_merge_defaults_and_environment() -> None:
    cpu = load_tier("cpu", env={})
    assert (cpu.gpus_per_node, cpu.tasks_per_node, cpu.partition) == (0, 1, "debug")
    assert cpu.signal_delay_s == 120 and cpu.exclusive is False
    env = {"SOFTMASK_SLURM_PARTITION": "a100", "SOFTMASK_SLURM_TIMEOUT_MIN": "30",
           "SOFTMASK_SLURM_ACCOUNT": "none", "SOFTMASK_SLURM_EXCLUSIVE": "true"}
    tier = load_tier("1gpu", env=env)
    assert (tier.partition, tier.timeout_min, tier.account, tier.exclusive) == (
        "a100", 30, None, True)
    assert load_tier("8gpu", env={}).world_size == 8


@pytest.mark.parametrize(("env", "message"), [
    ({"SOFTMASK_SLURM_TIMEOUT_MIN": "an hour"}, "SOFTMASK_SLURM_TIMEOUT_MIN: expected an integer"),
    ({"SOFTMASK_SLURM_EXCLUSIVE": "yes please"}, "SOFTMASK_SLURM_EXCLUSIVE: expected true or"),
])
def test_bad_environment_override_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tier("cpu", env=env)


def test_unknown_tier_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown resource tier '3gpu'.*'1gpu'"):
        load_tier("3gpu", env={})


def test_one_task_per_gpu_is_enforced() -> None:
    with pytest.raises(ValueError, match="one task per GPU"):
        load_tier("8gpu", env={"SOFTMASK_SLURM_TASKS_PER_NODE": "1"})


def test_tier_becomes_slurm_parameters(tmp_path: Path) -> None:
    tier = load_tier("8gpu", env={"SOFTMASK_SLURM_EXCLUSIVE": "1",
                                  "SOFTMASK_SLURM_ACCOUNT": "proj"})
    params = make_executor("slurm", tmp_path, tier, "grid:8gpu", 4)._executor.parameters
    assert params["gpus_per_node"] == 8 and params["ntasks_per_node"] == 8
    assert params["exclusive"] is True and params["account"] == "proj"
    assert params["mem"] == 0 and params["array_parallelism"] == 4  # 0 = the whole node
    assert params["signal_delay_s"] == 120 and params["partition"] == "gpu"
    shared = make_executor("slurm", tmp_path, load_tier("cpu", env={}), "grid:cpu")
    assert "exclusive" not in shared._executor.parameters
