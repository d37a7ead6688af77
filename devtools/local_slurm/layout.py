"""Names, constants and the directory layout of a local cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "softmask"


PARTITION = "debug"


NODE_NAME = "localhost"


DB_NAME = "slurm_acct_db"


DB_USER = "slurm"


#: Start order; stopping goes the other way round.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


STOP_ORDER = tuple(reversed(DAEMONS))


#: Everything ``start_cluster`` executes (daemons, tools and clients).
REQUIRED_BINARIES = (
    *DAEMONS,
    "munge",
    "unmunge",
    "mariadb-install-db",
    "mariadb",
    "mariadb-admin",
    "sacctmgr",
    "sinfo",
    "squeue",
    "scancel",
    "sbatch",
    "sacct",
)


#: Ports used from the base: slurmctld, slurmd, slurmdbd, mariadbd.
PORTS_PER_CLUSTER = 4


# Below the default Linux ephemeral range (32768-60999), so outgoing connections opened
# later by job steps cannot grab a port chosen here.
_PORT_RANGE = (20000, 32700)


# Daemons live in sbin, which is not on every user's PATH.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# Inherited client settings (e.g. SBATCH_PARTITION from a user's real cluster, or SLURM_JOB_ID
# when running inside an allocation) would leak into commands aimed at the local cluster.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SACCT_", "SINFO_")


# Unix socket paths are limited to 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 100


_LOG_TAIL_LINES = 25


# The default 96 MiB redo log would make each throwaway cluster directory ~180 MiB.
_INNODB_LOG_SIZE = "--innodb-log-file-size=8M"


class ClusterError(RuntimeError):
    """The local cluster could not be started, or is in an unexpected state."""


@dataclass(frozen=True)
class _Layout:
    """Paths of one cluster directory."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def munge(self) -> Path:
        return self.root / "munge"

    @property
    def mysql(self) -> Path:
        return self.root / "mysql"

    @property
    def conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def dbd_conf(self) -> Path:
        # slurmdbd looks for its config next to SLURM_CONF.
        return self.etc / "slurmdbd.conf"

    @property
    def munge_socket(self) -> Path:
        return self.munge / "munge.socket.2"

    @property
    def mysql_socket(self) -> Path:
        return self.run / "mysqld.sock"

    @property
    def meta(self) -> Path:
        return self.root / "cluster.json"

    def record(self, daemon: str) -> Path:
        """Our PID record of ``daemon`` (separate from the daemon's own pid file)."""
        return self.run / f"{daemon}.proc"

    def daemon_log(self, daemon: str) -> Path:
        return self.log / f"{daemon}.log"

    def daemon_output(self, daemon: str) -> Path:
        """Where a daemon's stdout/stderr go (early failures show up only there)."""
        return self.log / f"{daemon}.out"

    def make_dirs(self) -> None:
        for path in (self.etc, self.state, self.spool, self.log, self.run, self.munge):
            path.mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that is not world-readable.
        self.munge.chmod(0o755)
