"""One trainer per run directory: an exclusive lock held while a run trains.

``<run_dir>/.lock`` is locked with ``fcntl.flock`` for the lifetime of the training process and
holds who has it (host, pid, SLURM job id) for the error message. The kernel releases the lock
when the process ends, however it ends (a crash, ``kill -9``, a preempted job), so a lock file
left behind by a dead process is stale by construction and is simply taken over. On NFS, flock
is emulated with byte-range locks and needs the lock daemon (the usual cluster setup).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, TextIO

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is training this run directory."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process (its lock file is unreadable)"
    job = f", SLURM job {info['job_id']}" if info.get("job_id") else ""
    return (f"pid {info.get('pid')} on {info.get('host')}{job} (since "
            f"{info.get('since', '?')})")


def _identity() -> dict[str, Any]:
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job_id": job or os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class RunLock:
    """``with RunLock(run_dir):`` - raises :class:`RunLocked` naming the holder if another
    process trains ``run_dir``; released on exit (and by the kernel if the process dies)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh: TextIO | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink planted at .lock (model/safe_paths.py).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        fh = os.fdopen(fd, "a+", encoding="utf-8")  # held until __exit__
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunLocked(f"{self.path.parent} is being trained by {_holder_text(self.path)}; "
                            "not starting a second trainer on it (wait for it, or stop it: "
                            "`python ablations/run_grid.py --status` shows the job)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_identity()))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def lock_holder(run_dir: str | Path) -> str | None:
    """Who trains ``run_dir`` now (None if nobody): probes the lock without keeping it."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(path)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None
