"""The local cluster as a whole: start, find again, stop, status; ``LocalCluster`` handle."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devtools.local_slurm.configs import _current_user, _node_memory_mb, _Settings, _write_configs
from devtools.local_slurm.daemons import (
    _check_can_start,
    _node_state,
    _start_mariadb,
    _start_munge,
    _start_slurm,
    _start_slurmdbd,
)
from devtools.local_slurm.layout import _CLIENT_ENV_PREFIXES, STOP_ORDER, ClusterError, _Layout
from devtools.local_slurm.processes import (
    _apply_env,
    _client_env,
    _cluster_env,
    _log_tails,
    _run,
    _search_path,
    _terminate,
    _wait_until,
    daemon_pids,
    find_free_port_base,
)


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
