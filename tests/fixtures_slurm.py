"""Pytest fixtures for a real local SLURM cluster, and job callables that run on it.

Import the fixtures into a conftest or test module::

    from tests.fixtures_slurm import slurm_cluster, slurm_env  # noqa: F401

The cluster is started once per session (a few seconds) and stopped at the end. Without the
Slurm/munge/MariaDB binaries the slurm tests are skipped, unless ``REQUIRE_SLURM=1`` (CI), where
a missing binary is an error: a CI machine that silently skips them would prove nothing.

The job callables live here, at module level, because submitit pickles them by reference: the
job process must be able to import this module (see ``job_python_path``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import submitit

from devtools.local_slurm import LocalCluster, missing_binaries, start_cluster

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def _require_binaries() -> None:
    """Skip (or, with REQUIRE_SLURM=1, fail) when the cluster cannot be started here."""
    missing = missing_binaries()
    if not missing:
        return
    reason = f"SLURM not installed (missing: {', '.join(missing)}); run .ci/install_system_deps.sh"
    if os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


class _SharedCluster:
    """The one cluster of a test session, however many modules import ``slurm_cluster``.

    pytest makes a separate session-scoped fixture for every module (conftest or test file)
    that imports the fixture function; without sharing, each would start its own cluster and
    the last one started would own os.environ.
    """

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self._users = 0
        self._cleanup = contextlib.ExitStack()

    def acquire(self, tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
        if self.cluster is None:
            _require_binaries()
            cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
            self._cleanup.callback(cluster.stop)
            # Exits first on release: os.environ is restored before the daemons stop.
            self._cleanup.enter_context(cluster.activate())
            self.cluster = cluster
        self._users += 1
        return self.cluster

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self.cluster = None
            self._cleanup.close()


_SHARED = _SharedCluster()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A running single-node cluster with accounting, for the whole session.

    ``os.environ`` points at it (SLURM_CONF, ...) while the session runs, because submitit
    calls sbatch/sacct with the process environment.
    """
    cluster = _SHARED.acquire(tmp_path_factory)
    try:
        # Without SLURM_CONF the clients would go looking for a cluster off this machine.
        assert os.environ.get("SLURM_CONF") == str(cluster.conf)
        yield cluster
    finally:
        _SHARED.release()


@pytest.fixture
def slurm_env(slurm_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The cluster's client variables, re-applied for one test (in case a test changed them)."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    assert os.environ.get("SLURM_CONF") == str(slurm_cluster.conf)
    return dict(slurm_cluster.env)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` every 0.5 s until it returns something truthy, and return that; fail
    with ``what`` after ``timeout_s`` (jobs on a small shared machine start at their own pace)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job_python_path() -> list[str]:
    """sbatch setup lines that let a job import this module, the test modules (``tests.*``) and
    the repo's packages, whatever directory pytest was started from."""
    paths = os.pathsep.join(str(p) for p in (REPO_ROOT,))
    return [f"export PYTHONPATH={shlex.quote(paths)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def read_progress(path: Path) -> list[list[str]]:
    """The progress file of a ResumableSquares run, one split line per event."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


class ResumableSquares(submitit.helpers.Checkpointable):
    """Sums k*k for k < steps, one slow step at a time, saving progress after each step.

    Progress file events: ``start <attempt> <first step>``, ``step <k> <running sum>`` and
    ``checkpoint``. A run picks up after the last saved step, so a preempted-and-requeued job
    finishes with the same result as an uninterrupted one.
    """

    def __call__(self, progress_file: str, steps: int, step_s: float) -> int:
        path = Path(progress_file)
        events = read_progress(path)
        attempt = 1 + sum(1 for event in events if event[0] == "start")
        done = [event for event in events if event[0] == "step"]
        first, total = (int(done[-1][1]) + 1, int(done[-1][2])) if done else (0, 0)
        self._append(path, f"start {attempt} {first}")
        for k in range(first, steps):
            time.sleep(step_s)
            total += k * k
            self._append(path, f"step {k} {total}")
        return total

    def checkpoint(
        self, progress_file: str, steps: int, step_s: float
    ) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption: resubmit a fresh instance with the same arguments
        (the state that matters is in the progress file)."""
        self._append(Path(progress_file), "checkpoint")
        return submitit.helpers.DelayedSubmission(type(self)(), progress_file, steps, step_s)

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
