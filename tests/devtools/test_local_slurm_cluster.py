"""submitit against the real local SLURM cluster: results, arrays, failures, cancellation,
preemption with checkpoint/requeue, and GPU requests on a GPU-less node."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from devtools.local_slurm import PARTITION, LocalCluster

# slurm_cluster and slurm_env come from conftest.py.
from tests.fixtures_slurm import ResumableSquares, job_python_path, read_progress

pytestmark = pytest.mark.slurm

# Generous bounds: the machine is small and shared; typical times are in the comments.
RESULT_TIMEOUT_S = 30  # a short job: 1-3 s
CANCEL_TIMEOUT_S = 45  # submitit waits 15 s for a result file before giving up
PREEMPT_TIMEOUT_S = 60  # requeue and resume: about 12 s


def add(a: int, b: int) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def fail_loudly(message: str) -> None:
    raise ValueError(message)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture
def executor(
    slurm_env: dict[str, str],
    tmp_path: Path,
) -> submitit.AutoExecutor:
    """An executor on the local cluster; the cluster is named explicitly because AutoExecutor
    would otherwise guess from the installed binaries."""
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(
        timeout_min=5,
        cpus_per_task=1,
        slurm_partition=PARTITION,
        slurm_setup=job_python_path(),
    )
    return ex


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` once a second; fail the test after ``timeout_s``. Returns elapsed s."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - start


def wait_done(job: submitit.Job, timeout_s: float) -> None:
    """Bounded version of job.wait(), so a stuck job fails the test instead of hanging it."""
    wait_until(job.done, timeout_s, f"job {job.job_id} to finish (state {job.state})")


def test_cluster_env_is_active(
    slurm_cluster: LocalCluster,
    slurm_env: dict[str, str],
) -> None:
    assert slurm_cluster.is_up()
    assert slurm_env["SLURM_CONF"] == str(slurm_cluster.conf)


def test_simple_job_returns_result_and_completes(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(add, 2, 3)
    wait_done(job, RESULT_TIMEOUT_S)
    assert job.result() == 5
    # Right after the result file appears sacct may not know the final state yet.
    wait_until(lambda: job.get_info().get("State") == "COMPLETED", RESULT_TIMEOUT_S, "COMPLETED")
    assert job.state == "COMPLETED"


def test_map_array_respects_parallelism(executor: submitit.AutoExecutor) -> None:
    executor.update_parameters(slurm_array_parallelism=2)
    jobs = executor.map_array(square, [1, 2, 3])
    assert len(jobs) == 3
    # The throttle reached the scheduler (with 2 CPUs, timing alone could not show it).
    array_id = jobs[0].job_id.split("_")[0]
    details = subprocess.run(
        ["scontrol", "-o", "show", "job", array_id],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    assert "ArrayTaskThrottle=2" in details
    for job in jobs:
        wait_done(job, RESULT_TIMEOUT_S)
    assert [job.result() for job in jobs] == [1, 4, 9]


def test_failing_job_raises_with_remote_traceback(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(fail_loudly, "boom from the job")
    wait_done(job, RESULT_TIMEOUT_S)
    with pytest.raises(FailedJobError) as excinfo:
        job.result()
    text = str(excinfo.value)
    assert "ValueError: boom from the job" in text
    assert "fail_loudly" in text  # the remote traceback, not just the message


def test_cancelled_job_raises_uncompleted(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(sleep_for, 300)
    wait_until(lambda: job.get_info().get("State") == "RUNNING", RESULT_TIMEOUT_S, "RUNNING")
    start = time.monotonic()
    job.cancel()
    # Only accounting (sacct) reports CANCELLED; without it result() would block forever.
    wait_done(job, CANCEL_TIMEOUT_S)
    with pytest.raises(UncompletedJobError):
        job.result()
    assert time.monotonic() - start < CANCEL_TIMEOUT_S
    assert job.state.startswith("CANCELLED")


def test_preempted_checkpointable_job_resumes(
    executor: submitit.AutoExecutor, tmp_path: Path
) -> None:
    progress = tmp_path / "progress.txt"
    steps = 8
    job = executor.submit(ResumableSquares(), str(progress), steps, 0.5)

    def made_progress() -> bool:
        return sum(1 for event in read_progress(progress) if event[0] == "step") >= 2

    wait_until(made_progress, RESULT_TIMEOUT_S, "the first attempt to make progress")
    job._interrupt()  # preemption signal (SIGTERM then USR2), as the scheduler would send
    wait_done(job, PREEMPT_TIMEOUT_S)

    assert job.result() == sum(k * k for k in range(steps))
    events = read_progress(progress)
    starts = [event for event in events if event[0] == "start"]
    assert [event[1] for event in starts] == ["1", "2"], events
    assert ["checkpoint"] in events, events
    assert int(starts[1][2]) >= 2, "the requeued run restarted from scratch"
    assert [int(event[1]) for event in events if event[0] == "step"] == list(range(steps))


def test_gpu_request_fails_at_submit(executor: submitit.AutoExecutor) -> None:
    executor.update_parameters(gpus_per_node=1)
    with pytest.raises(FailedJobError):
        executor.submit(add, 1, 1)
