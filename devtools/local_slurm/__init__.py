"""A real single-node SLURM cluster with accounting, started under one throwaway directory.

Used by the test-suite and by users who want to try the ablation grid without a cluster.
Everything lives under ``root``: configuration, state, logs, sockets, the MariaDB datadir and
the PID records that let ``stop_cluster`` work from another process. Daemons started:

    munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd

Accounting (slurmdbd + MariaDB) is not optional: submitit polls ``sacct``; without it the job
state stays UNKNOWN and ``result()`` of a cancelled job blocks forever.

Client commands (``sbatch``, ``squeue``, ``sacct``...) need ``SLURM_CONF`` pointing at this
cluster's slurm.conf; without it they look for a cluster elsewhere. ``LocalCluster.env`` holds
those variables, and ``LocalCluster.activate()`` sets them in ``os.environ`` for a block only.

Command line::

    python -m devtools.local_slurm start --dir D [--port-base P] [--cpus N]
    python -m devtools.local_slurm status --dir D
    python -m devtools.local_slurm stop --dir D
"""

from __future__ import annotations

from devtools.local_slurm.cluster import (  # noqa: F401
    LocalCluster,
    cluster_status,
    load_cluster,
    start_cluster,
    stop_cluster,
)
from devtools.local_slurm.layout import (  # noqa: F401
    CLUSTER_NAME,
    DAEMONS,
    NODE_NAME,
    PARTITION,
    ClusterError,
)
from devtools.local_slurm.processes import daemon_pids, find_free_port_base, missing_binaries  # noqa: F401

__all__ = ["CLUSTER_NAME", "DAEMONS", "NODE_NAME", "PARTITION", "ClusterError", "LocalCluster",
           "cluster_status", "daemon_pids", "find_free_port_base", "load_cluster",
           "missing_binaries", "start_cluster", "stop_cluster"]
