"""Resource tiers: the file's values, environment overrides with clear errors, and how a tier
becomes submitit's SLURM parameters (no cluster needed: the parameters are inspected)."""

from __future__ import annotations

import os
import re
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


def test_cluster_options_become_slurm_parameters(tmp_path: Path) -> None:
    env = {"SOFTMASK_SLURM_SETUP": "module load cuda/12.1 && source env/bin/activate",
           "SOFTMASK_SLURM_EXCLUDE": "node[01-02]", "SOFTMASK_SLURM_GRES": "gpu:a100:8",
           "SOFTMASK_SLURM_RESERVATION": "paper", "SOFTMASK_SLURM_SBATCH": "mail-type=END"}
    params = make_executor("slurm", tmp_path, load_tier("8gpu", env=env), "g")._executor.parameters
    assert params["setup"] == ["module load cuda/12.1 && source env/bin/activate"]
    assert params["exclude"] == "node[01-02]" and params["gres"] == "gpu:a100:8"
    assert "gpus_per_node" not in params  # the typed request replaces the untyped count
    assert params["additional_parameters"] == {"mail-type": "END", "reservation": "paper"}


@pytest.mark.parametrize(("env", "message"), [
    ({"SOFTMASK_SLURM_NODES": "-1"}, "environment SOFTMASK_SLURM_NODES: nodes must be >= 1"),
    ({"SOFTMASK_SLURM_BOGUS": "1"}, "SOFTMASK_SLURM_BOGUS: not a resource setting"),
    ({"SOFTMASK_SLURM_PARTITON": "a100"}, "did you mean SOFTMASK_SLURM_PARTITION"),
    ({"SOFTMASK_SLURM_SBATCH": "mail-type"}, "SOFTMASK_SLURM_SBATCH: expected option=value"),
])
def test_environment_overrides_are_validated_like_the_file(env: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_tier("cpu", env=env)


def _report_setup() -> str:
    return os.environ.get("SOFTMASK_TEST_SETUP", "not set")


@pytest.mark.slurm
def test_setup_lines_and_extra_sbatch_options_reach_the_batch_script(
        slurm_env, tmp_path: Path) -> None:
    """On the real local SLURM: the tier's setup line runs before the job and an extra sbatch
    option (here --comment through the tier's ``sbatch`` mapping) is in the batch script."""
    from devtools.local_slurm import PARTITION
    from tests.fixtures_slurm import job_python_path

    env = {"SOFTMASK_SLURM_SETUP": "export SOFTMASK_TEST_SETUP=from-setup",
           "SOFTMASK_SLURM_SBATCH": "comment=softmask-recipe-test",
           "SOFTMASK_SLURM_PARTITION": PARTITION}
    tier = load_tier("cpu", env=env)
    ex = make_executor("slurm", tmp_path / "submitit", tier, "setup-test")
    ex.update_parameters(slurm_setup=[*job_python_path(), *tier.setup])
    job = ex.submit(_report_setup)
    assert job.result() == "from-setup"
    script = (tmp_path / "submitit" / job.job_id / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --comment=softmask-recipe-test" in script
    assert "export SOFTMASK_TEST_SETUP=from-setup" in script
