"""Starting each daemon of the local cluster: munged, MariaDB, slurmdbd, slurmctld and slurmd."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Mapping

from devtools.local_slurm.configs import _Settings
from devtools.local_slurm.layout import (
    _INNODB_LOG_SIZE,
    _MAX_SOCKET_PATH,
    CLUSTER_NAME,
    DAEMONS,
    DB_NAME,
    DB_USER,
    NODE_NAME,
    ClusterError,
    _Layout,
)
from devtools.local_slurm.processes import (
    _run,
    _spawn,
    _wait_started,
    _which,
    daemon_pids,
    missing_binaries,
)


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
