"""The configuration files of the local cluster (slurm.conf, slurmdbd.conf)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from devtools.local_slurm.layout import (
    CLUSTER_NAME,
    DB_NAME,
    DB_USER,
    NODE_NAME,
    PARTITION,
    _Layout,
)


def _node_memory_mb() -> int:
    """RealMemory for the node: half of the memory available now (slurmd drains a node that
    claims more than it has, and the machine is shared)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(256, int(line.split()[1]) // 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    return 1024


def _current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass(frozen=True)
class _Settings:
    """Everything the configuration files depend on."""

    layout: _Layout
    port_base: int
    cpus: int
    memory_mb: int
    user: str
    db_password: str

    @property
    def ctld_port(self) -> int:
        return self.port_base

    @property
    def slurmd_port(self) -> int:
        return self.port_base + 1

    @property
    def dbd_port(self) -> int:
        return self.port_base + 2

    @property
    def mysql_port(self) -> int:
        return self.port_base + 3


def _slurm_conf(s: _Settings) -> str:
    lay = s.layout
    lines = {
        "ClusterName": CLUSTER_NAME,
        # Pinned to loopback and independent of the machine's hostname.
        "SlurmctldHost": f"{NODE_NAME}(127.0.0.1)",
        "SlurmctldPort": str(s.ctld_port),
        "SlurmdPort": str(s.slurmd_port),
        "SlurmUser": s.user,
        "SlurmdUser": s.user,
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        # Short credential lifetime: the default 120 s delays the start of requeued jobs.
        "AuthInfo": f"socket={lay.munge_socket},cred_expire=10",
        "StateSaveLocation": str(lay.state),
        "SlurmdSpoolDir": str(lay.spool),
        "SlurmctldPidFile": str(lay.run / "slurmctld.pid"),
        "SlurmdPidFile": str(lay.run / "slurmd.pid"),
        "SlurmctldLogFile": str(lay.daemon_log("slurmctld")),
        "SlurmdLogFile": str(lay.daemon_log("slurmd")),
        # An empty plugin stack: the system one may load SPANK plugins we do not want.
        "PlugStackConfig": str(lay.etc / "plugstack.conf"),
        # cgroup plugins fail without a mounted freezer namespace and drain the node.
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/slurmdbd",
        "AccountingStorageHost": "127.0.0.1",
        "AccountingStoragePort": str(s.dbd_port),
        # The munge socket for slurmdbd traffic; without it slurmctld fails to register.
        "AccountingStoragePass": str(lay.munge_socket),
        "JobCompType": "jobcomp/none",
        "MpiDefault": "none",
        # Reject oversized requests at submit instead of leaving them pending forever.
        "EnforcePartLimits": "ALL",
        "MailProg": shutil.which("true") or "true",
        "SchedulerType": "sched/backfill",
        # Fast scheduling passes, else requeued jobs wait about a minute.
        "SchedulerParameters": "bf_interval=1,sched_interval=2",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        # Trust the configured CPUs/memory instead of draining on a hardware mismatch.
        "SlurmdParameters": "config_overrides",
        "ReturnToService": "2",
        "KillWait": "5",
        # Finished jobs stay visible to squeue/scontrol for 5 minutes.
        "MinJobAge": "300",
    }
    body = "\n".join(f"{key}={value}" for key, value in lines.items())
    # No GresTypes and no Gres on the node: GPU requests are rejected at submit.
    node = (
        f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={s.cpus} "
        f"RealMemory={s.memory_mb} State=UNKNOWN"
    )
    partition = f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP"
    return f"{body}\n{node}\n{partition}\n"


def _slurmdbd_conf(s: _Settings) -> str:
    lay = s.layout
    lines = {
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={lay.munge_socket}",
        "DbdHost": NODE_NAME,
        "DbdAddr": "127.0.0.1",
        "DbdPort": str(s.dbd_port),
        "SlurmUser": s.user,
        "LogFile": str(lay.daemon_log("slurmdbd")),
        "PidFile": str(lay.run / "slurmdbd.pid"),
        "StorageType": "accounting_storage/mysql",
        "StorageHost": "127.0.0.1",
        "StoragePort": str(s.mysql_port),
        "StorageUser": DB_USER,
        "StoragePass": s.db_password,
        "StorageLoc": DB_NAME,
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def _write_configs(s: _Settings) -> None:
    lay = s.layout
    lay.conf.write_text(_slurm_conf(s))
    (lay.etc / "plugstack.conf").write_text("")
    # slurmdbd refuses a config readable by others (it holds the DB password).
    lay.dbd_conf.touch(mode=0o600)
    lay.dbd_conf.chmod(0o600)
    lay.dbd_conf.write_text(_slurmdbd_conf(s))
    meta = {"port_base": s.port_base, "cpus": s.cpus, "memory_mb": s.memory_mb, "user": s.user}
    lay.meta.write_text(json.dumps(meta, indent=2) + "\n")
