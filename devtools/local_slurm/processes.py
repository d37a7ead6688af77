"""Process helpers of the local cluster: environment, daemon spawning and reaping, PID
records, log tails, free ports."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from devtools.local_slurm.layout import (
    _CLIENT_ENV_PREFIXES,
    _LOG_TAIL_LINES,
    _PORT_RANGE,
    _SBIN_DIRS,
    DAEMONS,
    PORTS_PER_CLUSTER,
    REQUIRED_BINARIES,
    ClusterError,
    _Layout,
)

# Popen handles of daemons started by this process, kept so exited daemons get reaped
# (an unreaped child stays a zombie and would look alive).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


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
