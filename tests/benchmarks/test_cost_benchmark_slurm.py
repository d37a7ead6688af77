"""The cost benchmark submitted as a job to the real SLURM cluster started for the test run:
a tiny two-variant run waited for end to end, and a preempted run that must not be requeued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import submitit
from submitit.core.utils import UncompletedJobError

from benchmarks import bench_step
from slurm.status import SchedulerView, query_sacct
from tests.benchmarks.test_cost_benchmark import (
    assert_output_files,
    assert_raw_rows,
    write_failing_cases,
    write_small_cases,
)
from tests.fixtures_slurm import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Generous bounds: the machine is small and shared; a tiny job takes well under a minute.
JOB_TIMEOUT_S = 300


def _tiny_argv(tmp_path: Path, out: Path, iters: int) -> list[str]:
    """A tiny-preset benchmark of albef + ours at one batch size, on the cpu tier."""
    return ["--cluster", "slurm", "--tier", "cpu", "--device", "cpu",
            "--cases", str(write_small_cases(tmp_path / "cases.yaml")), "--preset", "tiny",
            "--batch", "4", "--variants", "albef", "ours", "--iters", str(iters),
            "--warmup", "1", "--no-memory", "--out", str(out)]


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "submissions.jsonl").read_text().splitlines()]


def _final_view(job_id: str) -> SchedulerView:
    """sacct's view once the job has left the queue (accounting lags the job by a moment)."""
    def finished() -> SchedulerView | None:
        view = (query_sacct([job_id]) or {}).get(job_id)
        done = view is not None and view.category not in ("pending", "running", "requeued")
        return view if done else None

    return wait_until(finished, 60, f"sacct to report job {job_id} finished")


def test_benchmark_job_runs_under_slurm_and_writes_tables(
        slurm_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = _tiny_argv(tmp_path, out, iters=2) + ["--breakdown", "--wait"]
    assert bench_step.main(argv) == 0
    printed = capsys.readouterr().out
    (record,) = _records(out)
    job_id = record["job_id"]
    assert record["cluster"] == "slurm" and record["tier"] == "cpu" and job_id.isdigit()
    assert record["cases"] == ["tiny-b4-fp32"]
    assert not {"--cluster", "--tier", "--wait"} & set(record["argv"])
    assert f"job {job_id}" in printed and "| Ours " in printed  # the table, after waiting
    view = _final_view(job_id)
    assert view.base_state == "COMPLETED" and view.attempts == 1, view
    submission = next((out / ".submitit" / job_id).glob("*_submission.sh")).read_text()
    assert "#SBATCH --no-requeue" in submission and "#SBATCH --partition=debug" in submission
    log = Path(record["log"]).read_text()
    assert f"JobEnvironment(job_id={job_id}," in log  # submitit's SLURM environment
    assert "benchmark job: python -m benchmarks.bench_step" in log
    steps = pd.read_csv(out / "steps.csv", dtype={"git_sha": str})
    assert_raw_rows(steps, ["albef", "ours"], iters=2)
    assert (steps["threads"] == 1).all()  # the tier's one CPU, from SLURM_CPUS_PER_TASK
    assert_output_files(out, ["ALBEF", "Ours"], iterations=4)


def test_preempted_benchmark_job_is_not_requeued(
        slurm_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert bench_step.main(_tiny_argv(tmp_path, out, iters=10_000)) == 0  # returns at once
    (record,) = _records(out)
    assert f"squeue -j {record['job_id']}" in capsys.readouterr().out
    log = Path(record["log"])
    wait_until(lambda: log.exists() and "timed rounds" in log.read_text(), JOB_TIMEOUT_S,
          "the benchmark to start timing")
    job = submitit.SlurmJob(folder=out / ".submitit" / "%j", job_id=record["job_id"])
    job._interrupt()  # preemption: SIGTERM, then SIGUSR2 as the scheduler would send
    wait_until(job.done, 120, "the preempted job to end")
    with pytest.raises(UncompletedJobError, match="not requeued"):
        job.result()
    view = _final_view(record["job_id"])
    assert view.attempts == 1 and not view.requeued, view
    assert "not requeued" in log.read_text()


def test_benchmark_job_with_a_failed_variant_is_failed_in_sacct(
        slurm_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = _tiny_argv(tmp_path, out, iters=1)
    argv[argv.index("--cases") + 1] = str(write_failing_cases(tmp_path / "failing.yaml"))
    argv[argv.index("ours")] = "huge_queue"
    assert bench_step.main([*argv, "--no-flops", "--wait"]) == 1
    captured = capsys.readouterr()
    assert "had variants fail" in captured.err and "| oom" in captured.out
    view = _final_view(_records(out)[0]["job_id"])
    assert view.base_state == "FAILED" and view.attempts == 1, view
