"""The one place that builds submitit executors and sets ``slurm_*`` parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from slurm.resources import Tier

Cluster = Literal["local", "debug", "slurm"]


def make_executor(cluster: Cluster, folder: str | Path, tier: Tier, name: str,
                  array_parallelism: int | None = None):
    """A configured ``submitit.AutoExecutor``; the cluster is always explicit.

    ``AutoExecutor`` without ``cluster=`` picks SLURM as soon as ``srun`` exists, so the
    embedded default and the tests never rely on auto-detection. ``folder`` holds submitit's
    pickles and logs (``%j`` = job id) and must be on a filesystem shared with the nodes.
    """
    import submitit  # lazily: model/ and most tests never need it

    executor = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=cluster,
                                     slurm_max_num_timeout=tier.max_num_timeout)
    params: dict[str, object] = {
        "name": name,
        "timeout_min": tier.timeout_min,
        "nodes": tier.nodes,
        "tasks_per_node": tier.tasks_per_node,
        "cpus_per_task": tier.cpus_per_task,
        "stderr_to_stdout": True,
    }
    if cluster == "slurm":
        params.update({
            "gpus_per_node": tier.gpus_per_node,
            "mem_gb": tier.mem_gb,
            "slurm_signal_delay_s": tier.signal_delay_s,
        })
        if tier.mem_gb == 0:  # the whole node's memory
            params.pop("mem_gb")
            params["slurm_mem"] = 0
        for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
            value = getattr(tier, key)
            if value:
                params[f"slurm_{key}"] = value
        if tier.gres:  # a typed request (gpu:a100:8) instead of the untyped GPU count
            params.pop("gpus_per_node")
            params["slurm_gres"] = tier.gres
        if tier.setup:
            params["slurm_setup"] = list(tier.setup)
        extra = dict(tier.sbatch)
        if tier.reservation:
            extra["reservation"] = tier.reservation
        if extra:
            params["slurm_additional_parameters"] = extra
        if tier.exclusive:
            params["slurm_exclusive"] = True
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    return executor
