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

    python -m slurm.local_cluster start --dir D [--port-base P] [--cpus N]
    python -m slurm.local_cluster status --dir D
    python -m slurm.local_cluster stop --dir D
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
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

# Popen handles of daemons started by this process, kept so exited daemons get reaped
# (an unreaped child stays a zombie and would look alive).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


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


@dataclass
class LocalCluster:
    """Handle on a running local cluster.

    ``env`` holds the variables every Slurm client needs (at least ``SLURM_CONF``).
    """

    root: Path
    port_base: int
    conf: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel all jobs and stop every daemon (see ``stop_cluster``)."""
        stop_cluster(self.root, timeout_s=timeout_s)

    def is_up(self) -> bool:
        """Whether every daemon recorded under ``root`` is alive."""
        return all(pid is not None for pid in daemon_pids(self.root).values())

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for Slurm client subprocesses: ``base`` (default: os.environ)
        without inherited Slurm settings, plus ``env``."""
        return _client_env(os.environ if base is None else base, self.env)

    @contextlib.contextmanager
    def activate(self) -> Iterator[dict[str, str]]:
        """Point ``os.environ`` at this cluster inside the block, restoring it afterwards.

        Inherited Slurm client variables are removed for the duration, since they would
        redirect or alter submissions (submitit's sbatch calls read the process environment).
        """
        changes: dict[str, str | None] = {
            key: None for key in os.environ if key.startswith(_CLIENT_ENV_PREFIXES)
        }
        changes.update(self.env)
        previous = _apply_env(changes)
        try:
            yield dict(self.env)
        finally:
            _apply_env(previous)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Environment and small process helpers
# --------------------------------------------------------------------------------------------


def _apply_env(changes: Mapping[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) variables in os.environ; return their previous values."""
    previous = {key: os.environ.get(key) for key in changes}
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return previous


def _client_env(base: Mapping[str, str], cluster_env: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
    env.update(cluster_env)
    return env


def _cluster_env(layout: _Layout) -> dict[str, str]:
    return {"SLURM_CONF": str(layout.conf)}


def _search_path() -> str:
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(parts + [d for d in _SBIN_DIRS if d not in parts])


def _which(name: str) -> str:
    path = shutil.which(name, path=_search_path())
    if path is None:
        raise ClusterError(
            f"{name} not found; install the system packages (.ci/install_system_deps.sh)"
        )
    return path


def missing_binaries() -> list[str]:
    """Names from REQUIRED_BINARIES that are not installed."""
    search = _search_path()
    return [name for name in REQUIRED_BINARIES if shutil.which(name, path=search) is None]


def _run(argv: list[str], env: Mapping[str, str], timeout_s: float = 10.0) -> tuple[int, str]:
    """Run a short command; return (exit status, stdout+stderr). A timeout reads as status -1,
    so polling loops treat a hung client like a failed one."""
    argv = [_which(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else ""
        return -1, f"{out}\n(timed out after {timeout_s:.0f} s: {shlex.join(argv)})"
    return proc.returncode, proc.stdout


def _wait_until(
    check: Callable[[], bool], deadline: float, what: str, interval: float = 0.25
) -> None:
    """Poll ``check`` until it is true; raise ClusterError at ``deadline`` (time.monotonic)."""
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(interval)


def _wait_started(lay: _Layout, check: Callable[[], bool], deadline: float, what: str) -> None:
    """``_wait_until`` that gives up as soon as a daemon started so far has exited, instead
    of waiting for the deadline."""

    def ready() -> bool:
        dead = _dead_daemons(lay)
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}")
        return check()

    _wait_until(ready, deadline, what)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a process, or None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Alive and not a zombie; with ``start_time``, also not a recycled PID."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[1] == start_time


def _read_record(layout: _Layout, daemon: str) -> tuple[int, str] | None:
    try:
        pid_text, start_time = layout.record(daemon).read_text().split()
        return int(pid_text), start_time
    except (OSError, ValueError):
        return None


def _dead_daemons(lay: _Layout) -> list[str]:
    """Daemons with a PID record whose process is gone."""
    dead = []
    for daemon in DAEMONS:
        record = _read_record(lay, daemon)
        if lay.record(daemon).exists() and (record is None or not _pid_alive(*record)):
            dead.append(daemon)
    return dead


def daemon_pids(root: Path) -> dict[str, int | None]:
    """PID of each daemon recorded under ``root`` that is still alive (None otherwise)."""
    layout = _Layout(Path(root).resolve())
    pids: dict[str, int | None] = {}
    for daemon in DAEMONS:
        record = _read_record(layout, daemon)
        pids[daemon] = record[0] if record and _pid_alive(*record) else None
    return pids


def _spawn(layout: _Layout, daemon: str, argv: list[str], env: Mapping[str, str]) -> int:
    """Start a daemon in the foreground of its own session and record its PID."""
    argv = [_which(argv[0]), *argv[1:]]
    with open(layout.daemon_output(daemon), "ab") as out:
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=layout.root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the starting terminal must not reach the daemons.
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid)
    start_time = stat[1] if stat else "0"
    layout.record(daemon).write_text(f"{proc.pid} {start_time}\n")
    return proc.pid


def _terminate(layout: _Layout, daemon: str, timeout_s: float) -> None:
    """TERM the recorded daemon, KILL it after ``timeout_s``; drop the record."""
    record = _read_record(layout, daemon)
    if record is not None and _pid_alive(*record):
        pid = record[0]
        _signal(pid, signal.SIGTERM)
        if not _wait_dead(pid, timeout_s):
            _signal(pid, signal.SIGKILL)
            _wait_dead(pid, 5.0)
    layout.record(daemon).unlink(missing_ok=True)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(content[-lines:])


def _log_tails(layout: _Layout) -> str:
    """Tails of every non-empty log under root, for error messages."""
    if not layout.log.is_dir():
        return ""
    parts = []
    # Newest first: the daemon that just failed is usually the one that wrote last.
    for path in sorted(layout.log.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        # Daemons in the foreground repeat their log on stderr: show the .out copy only when
        # the daemon died before opening its log file.
        log_twin = path.with_suffix(".log")
        if path.suffix == ".out" and log_twin.exists() and log_twin.stat().st_size > 0:
            continue
        tail = _tail(path)
        if tail.strip():
            parts.append(f"--- {path.name} (last {_LOG_TAIL_LINES} lines) ---\n{tail}")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Choosing resources
# --------------------------------------------------------------------------------------------


def _ports_free(base: int, count: int = PORTS_PER_CLUSTER) -> bool:
    """Whether base..base+count-1 can be bound on loopback (also fails if bound on 0.0.0.0)."""
    for port in range(base, base + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def find_free_port_base(attempts: int = 200) -> int:
    """A random base with PORTS_PER_CLUSTER consecutive free ports.

    Random rather than sequential so that two clusters started at the same moment are
    unlikely to pick the same ports.
    """
    low, high = _PORT_RANGE
    rng = random.SystemRandom()
    for _ in range(attempts):
        base = rng.randrange(low, high - PORTS_PER_CLUSTER)
        if _ports_free(base):
            return base
    raise ClusterError(f"no {PORTS_PER_CLUSTER} consecutive free ports found in {_PORT_RANGE}")


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


# --------------------------------------------------------------------------------------------
# Configuration files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Starting the daemons
# --------------------------------------------------------------------------------------------


def _start_munge(lay: _Layout, env: Mapping[str, str], deadline: float) -> None:
    key = lay.munge / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
    # munged refuses a key readable by group or others.
    key.chmod(0o400)
    # A socket left behind by a killed munged would make the new one refuse to start.
    lay.munge_socket.unlink(missing_ok=True)
    _spawn(
        lay,
        "munged",
        [
            "munged",
            "--foreground",
            # Downgrades the "socket is inaccessible" refusal to a warning: pytest's (and
            # often users') temporary directories are 0700, but every client runs as the
            # same user as munged, so the socket is reachable for all of them.
            "--force",
            # In the foreground munged logs to stderr, i.e. to log/munged.out.
            f"--socket={lay.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={lay.run / 'munged.pid'}",
            f"--seed-file={lay.munge / 'munged.seed'}",
        ],
        env,
    )
    _wait_started(lay, lambda: _munge_works(lay, env), deadline, "munged to answer")


def _munge_works(lay: _Layout, env: Mapping[str, str]) -> bool:
    sock = str(lay.munge_socket)
    status, cred = _run(["munge", "-S", sock, "-n"], env, timeout_s=5)
    if status != 0:
        return False
    unmunge = [_which("unmunge"), "-S", sock]
    try:
        proc = subprocess.run(
            unmunge,
            input=cred,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and "Success" in proc.stdout


def _start_mariadb(s: _Settings, env: Mapping[str, str], deadline: float) -> None:
    lay = s.layout
    if not (lay.mysql / "mysql").is_dir():
        # A restart in the same directory reuses the initialised datadir (3-4 s saved).
        status, out = _run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--user={s.user}",
                f"--datadir={lay.mysql}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                _INNODB_LOG_SIZE,
            ],
            env,
            timeout_s=max(5.0, deadline - time.monotonic()),
        )
        if status != 0:
            (lay.log / "mariadb-install-db.log").write_text(out)
            raise ClusterError("mariadb-install-db failed")
    lay.mysql_socket.unlink(missing_ok=True)
    _spawn(
        lay,
        "mariadbd",
        [
            "mariadbd",
            "--no-defaults",
            f"--user={s.user}",
            f"--datadir={lay.mysql}",
            f"--socket={lay.mysql_socket}",
            f"--pid-file={lay.run / 'mariadbd.pid'}",
            f"--log-error={lay.daemon_log('mariadbd')}",
            "--bind-address=127.0.0.1",
            f"--port={s.mysql_port}",
            # No DNS lookups of client addresses; grants below name 127.0.0.1 explicitly.
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M",
            _INNODB_LOG_SIZE,
        ],
        env,
    )
    admin = ["mariadb-admin", "--no-defaults", f"--socket={lay.mysql_socket}", f"--user={s.user}"]
    pinged = lambda: _run([*admin, "ping"], env, 5)[0] == 0
    _wait_started(lay, pinged, deadline, "mariadbd to answer")
    _create_db_user(s, env)


def _create_db_user(s: _Settings, env: Mapping[str, str]) -> None:
    """(Re)create the accounting DB user; the password is new on every start."""
    statements = []
    for host in ("127.0.0.1", "localhost"):
        account = f"'{DB_USER}'@'{host}'"
        statements += [
            f"CREATE OR REPLACE USER {account} IDENTIFIED BY '{s.db_password}';",
            f"GRANT ALL ON {DB_NAME}.* TO {account};",
        ]
    client = ["mariadb", "--no-defaults", f"--socket={s.layout.mysql_socket}", f"--user={s.user}"]
    status, out = _run([*client, "-e", " ".join(statements)], env)
    if status != 0:
        raise ClusterError(f"creating the accounting database user failed: {out.strip()}")


def _start_slurmdbd(lay: _Layout, env: Mapping[str, str], deadline: float) -> None:
    _spawn(lay, "slurmdbd", ["slurmdbd", "-D"], env)
    probe = ["sacctmgr", "-n", "list", "cluster"]
    _wait_started(lay, lambda: _run(probe, env, 5)[0] == 0, deadline, "slurmdbd to answer")


def _start_slurm(lay: _Layout, env: Mapping[str, str], deadline: float) -> None:
    conf = str(lay.conf)
    ctld = ["slurmctld", "-D", "-f", conf]
    if not any(lay.state.iterdir()):
        # Clean start on a fresh directory; a restart keeps the job-id counter instead.
        ctld.insert(2, "-c")
    _spawn(lay, "slurmctld", ctld, env)
    _spawn(lay, "slurmd", ["slurmd", "-D", "-N", NODE_NAME, "-f", conf], env)
    _wait_started(lay, lambda: _node_state(env) == "idle", deadline, "the node to become idle")
    # Accounting must know the cluster before jobs run, or their states never reach sacct.
    registered = lambda: _cluster_registered(env)
    _wait_started(lay, registered, deadline, "the cluster to register with slurmdbd")


def _node_state(env: Mapping[str, str]) -> str:
    status, out = _run(["sinfo", "-h", "-o", "%T"], env, 5)
    return out.strip() if status == 0 else ""


def _cluster_registered(env: Mapping[str, str]) -> bool:
    status, out = _run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], env, 5)
    return status == 0 and CLUSTER_NAME in out.split()


def _check_can_start(lay: _Layout) -> None:
    """Refuse to start without binaries, over a running cluster, or with too long paths;
    forget PID records of daemons that are gone (e.g. after a reboot)."""
    missing = missing_binaries()
    if missing:
        raise ClusterError(
            f"missing binaries: {', '.join(missing)}; install them with .ci/install_system_deps.sh"
        )
    running = [name for name, pid in daemon_pids(lay.root).items() if pid is not None]
    if running:
        raise ClusterError(f"{', '.join(running)} already running under {lay.root}; stop it first")
    if len(str(lay.munge_socket).encode()) > _MAX_SOCKET_PATH:
        raise ClusterError(f"{lay.root} is too deep for unix socket paths; use a shorter directory")
    for daemon in DAEMONS:
        lay.record(daemon).unlink(missing_ok=True)


def start_cluster(
    root: Path, port_base: int | None = None, cpus: int | None = None, timeout_s: float = 60
) -> LocalCluster:
    """Start munged, MariaDB, slurmdbd, slurmctld and slurmd under ``root``.

    Returns once ``sinfo`` reports the node idle and the cluster is known to accounting.
    ``port_base`` (4 consecutive ports) is picked automatically when None, so several
    clusters can coexist; ``cpus`` defaults to os.cpu_count(). On failure everything started
    is stopped again and a ClusterError with the tails of the logs is raised.
    """
    lay = _Layout(Path(root).resolve())
    lay.make_dirs()
    _check_can_start(lay)
    deadline = time.monotonic() + timeout_s
    settings = _Settings(
        layout=lay,
        port_base=find_free_port_base() if port_base is None else port_base,
        cpus=cpus or os.cpu_count() or 1,
        memory_mb=_node_memory_mb(),
        user=_current_user(),
        db_password=secrets.token_hex(16),
    )
    cluster_env = _cluster_env(lay)
    env = _client_env(os.environ, cluster_env)
    env["PATH"] = _search_path()
    try:
        _write_configs(settings)
        _start_munge(lay, env, deadline)
        _start_mariadb(settings, env, deadline)
        _start_slurmdbd(lay, env, deadline)
        _start_slurm(lay, env, deadline)
    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
        tails = _log_tails(lay)
        stop_cluster(lay.root, timeout_s=10)
        raise ClusterError(
            f"starting the local cluster under {lay.root} failed: {exc}\n{tails}"
        ) from exc
    return LocalCluster(root=lay.root, port_base=settings.port_base, conf=lay.conf, env=cluster_env)


# --------------------------------------------------------------------------------------------
# Stopping and inspecting
# --------------------------------------------------------------------------------------------


def load_cluster(root: Path) -> LocalCluster:
    """The handle of a cluster started (possibly by another process) under ``root``."""
    lay = _Layout(Path(root).resolve())
    try:
        meta = json.loads(lay.meta.read_text())
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no local cluster configured under {lay.root}") from exc
    return LocalCluster(
        root=lay.root, port_base=int(meta["port_base"]), conf=lay.conf, env=_cluster_env(lay)
    )


def _cancel_all_jobs(env: Mapping[str, str], timeout_s: float) -> None:
    """scancel every job and wait (bounded) for the queue to drain."""
    status, out = _run(["squeue", "-h", "-o", "%F"], env, 5)
    job_ids = sorted(set(out.split())) if status == 0 else []
    if not job_ids:
        return
    _run(["scancel", *job_ids], env, 10)
    deadline = time.monotonic() + timeout_s

    def queue_empty() -> bool:
        code, listing = _run(["squeue", "-h", "-o", "%i"], env, 5)
        return code != 0 or not listing.strip()

    with contextlib.suppress(ClusterError):
        # Leftover jobs die with slurmd anyway; this only gives them a clean end.
        _wait_until(queue_empty, deadline, "an empty queue", interval=0.5)


def stop_cluster(root: Path, timeout_s: float = 30.0) -> None:
    """Cancel all jobs, then TERM slurmd, slurmctld, slurmdbd, mariadbd, munged in that order,
    each KILLed if still alive after ``timeout_s`` / 3. Safe to call repeatedly, from any
    process, and on a partly started or already stopped cluster."""
    lay = _Layout(Path(root).resolve())
    if not lay.run.is_dir():
        return
    pids = daemon_pids(lay.root)
    env = _client_env(os.environ, _cluster_env(lay))
    if pids["slurmctld"] is not None and lay.conf.exists():
        _cancel_all_jobs(env, timeout_s / 2)
    for daemon in STOP_ORDER:
        _terminate(lay, daemon, timeout_s / 3)


def cluster_status(root: Path) -> dict[str, object]:
    """PIDs of the daemons and, when the controller is up, the node state."""
    lay = _Layout(Path(root).resolve())
    pids = daemon_pids(lay.root)
    node = ""
    if pids["slurmctld"] is not None:
        node = _node_state(_client_env(os.environ, _cluster_env(lay)))
    return {"root": str(lay.root), "daemons": pids, "node_state": node}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.local_cluster", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster; prints the exports for the clients")
    start.add_argument("--dir", required=True, type=Path, help="cluster directory (created)")
    start.add_argument(
        "--port-base", type=int, default=None, help="first of 4 ports (default: free)"
    )
    start.add_argument("--cpus", type=int, default=None, help="node CPUs (default: os.cpu_count())")
    start.add_argument("--timeout", type=float, default=60.0, help="start timeout in seconds")
    for name, text in (("stop", "stop the cluster"), ("status", "show daemons and node state")):
        sub.add_parser(name, help=text).add_argument("--dir", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m slurm.local_cluster``."""
    args = _parse_args(argv)
    try:
        if args.command == "start":
            cluster = start_cluster(args.dir, args.port_base, args.cpus, args.timeout)
            for key, value in cluster.env.items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        if args.command == "stop":
            stop_cluster(args.dir)
            return 0
        status = cluster_status(args.dir)
        print(json.dumps(status, indent=2))
        daemons = status["daemons"]
        return 0 if isinstance(daemons, dict) and all(daemons.values()) else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
