"""Submit the benchmark as one job through the repository's executor factory.

``python -m benchmarks.bench_step --cluster {local,debug,slurm} [--tier T] [--wait] ...``
validates everything it can here (cases YAML, preset/variant/batch/precision selection, tier,
GPU request against the tier), so that bad input fails before a job is queued; then it submits
``benchmarks.bench_job.BenchmarkJob`` with the remaining arguments through
``slurm.executor.make_executor`` and records the submission in ``<out>/submissions.jsonl``.

The cluster is never auto-detected (``make_executor`` always names it). A ``local`` job (a
subprocess) is cancelled when this process exits and a ``debug`` job only runs, in this
process, when waited for, so both are always waited for; ``--wait`` matters for ``slurm`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_job import BenchmarkJob
from benchmarks.cases import Case, Suite, load_suite, select_cases
from model.config.loader import ConfigError
from slurm.executor import Cluster, make_executor
from slurm.resources import Tier, load_tier

JOB_NAME = "bench_step"
ENTRY = "benchmarks.bench_step:main"  # what the job runs (benchmarks.bench_job.resolve_entry)
SUBMITIT_DIR = ".submitit"  # the grid's name too: slurm.status.log_tail finds the logs
SUBMISSIONS = "submissions.jsonl"
# Options that say where the benchmark runs; never forwarded to the job.
SUBMISSION_DESTS = ("cluster", "tier", "wait")
# Paths made absolute for the job (its working directory need not be this one).
PATH_DESTS = ("out", "cases")


class SubmissionError(ValueError):
    """A request that cannot run, found before anything was submitted."""


@dataclass(frozen=True)
class Submission:
    """A validated request: what the job runs, where, with which resources."""

    cluster: Cluster
    tier_name: str
    tier: Tier
    argv: list[str]
    out: Path
    cases: list[Case]


def default_tier(device: str) -> str:
    """``1gpu`` for a CUDA device, else ``cpu`` (slurm/resources.yaml)."""
    return "1gpu" if device.startswith("cuda") else "cpu"


def add_submission_options(parser: argparse.ArgumentParser) -> None:
    """``--cluster``, ``--tier`` and ``--wait`` (named in ``SUBMISSION_DESTS``)."""
    group = parser.add_argument_group(
        "submission", "run as a job instead of in this process (never auto-detected)")
    group.add_argument("--cluster", choices=("local", "debug", "slurm"), default=None,
                       help="submit through submitit: slurm (sbatch), local (a subprocess) "
                       "or debug (in this process); default: run here, no job")
    group.add_argument("--tier", default=None, help="resource tier of slurm/resources.yaml "
                       "(default: 1gpu for --device cuda*, else cpu)")
    group.add_argument("--wait", action="store_true", help="slurm: block until the job ends, "
                       "print its cost table and exit with its status (local and debug jobs "
                       "are always waited for)")


def forwarded_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The job's arguments: every non-default option except the submission ones.

    Built from the parsed values (not the raw command line), so abbreviated or ``--opt=value``
    spellings of a submission option can never reach the job. ``--out`` and ``--cases`` are
    always passed, as absolute paths. Re-parsing checks that the job sees the same request.
    """
    argv: list[str] = []
    for dest, value in vars(args).items():
        if dest in PATH_DESTS:
            value = str(Path(value).resolve())
        elif dest in SUBMISSION_DESTS or value is None or value == parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    expected = {k: v for k, v in vars(args).items() if k not in SUBMISSION_DESTS}
    expected.update({k: str(Path(expected[k]).resolve()) for k in PATH_DESTS})
    reparsed = {k: v for k, v in vars(parser.parse_args(argv)).items()
                if k not in SUBMISSION_DESTS}
    if reparsed != expected:
        raise RuntimeError(f"forwarded arguments {argv} do not reproduce the request")
    return argv


def select_from_args(args: argparse.Namespace) -> tuple[Suite, list[Case]]:
    """The suite and the cases the command selects; ``bench_step.main`` runs exactly these,
    here or in the job. Raises ``SubmissionError`` naming the file or the bad selection."""
    try:
        suite = load_suite(args.cases)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise SubmissionError(f"cannot read the cases file {args.cases}: "
                              f"{type(exc).__name__}: {exc}") from exc
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    try:
        cases = select_cases(suite, kind, args.preset, args.batch, args.precision, args.variants)
    except (KeyError, ValueError) as exc:
        raise SubmissionError(f"invalid case selection: {exc}") from exc
    if not cases:
        raise SubmissionError(f"no cases selected for device kind {kind!r}")
    return suite, cases


def _tier(args: argparse.Namespace) -> tuple[str, Tier]:
    """The named tier, refused when it cannot serve the requested device."""
    name = args.tier or default_tier(args.device)
    try:
        tier = load_tier(name)
    except (ConfigError, ValueError) as exc:
        raise SubmissionError(str(exc)) from exc
    if args.device.startswith("cuda") and tier.gpus_per_node < 1:
        raise SubmissionError(
            f"--device {args.device} needs a GPU, but resource tier '{name}' has "
            f"gpus_per_node={tier.gpus_per_node} (slurm/resources.yaml, "
            f"SOFTMASK_SLURM_GPUS_PER_NODE); choose a GPU tier (e.g. --tier 1gpu) or --device cpu")
    return name, tier


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Submission:
    """Everything checkable without running anything; raises ``SubmissionError``."""
    if args.report_only:
        raise SubmissionError("--report-only measures nothing; run it without --cluster")
    _, cases = select_from_args(args)
    tier_name, tier = _tier(args)
    return Submission(args.cluster, tier_name, tier, forwarded_argv(args, parser),
                      Path(args.out).resolve(), cases)


def submit(sub: Submission) -> Any:
    """Queue ``BenchmarkJob`` with the tier's resources; returns the submitit job."""
    # Never requeued on preemption or timeout: a timing run interrupted halfway is not
    # meaningfully resumable, and it rewrites its tables after every case anyway. Three
    # guards: no timeout requeues, SLURM's --no-requeue (also covers node failures), and
    # BenchmarkJob.checkpoint, which stops the run instead of handing submitit a resubmission.
    tier = dataclasses.replace(sub.tier, max_num_timeout=0)
    executor = make_executor(sub.cluster, sub.out / SUBMITIT_DIR, tier, JOB_NAME)
    if sub.cluster == "slurm":
        executor.update_parameters(slurm_additional_parameters={"no_requeue": True})
    return executor.submit(BenchmarkJob(ENTRY), sub.argv)


def record(sub: Submission, job: Any) -> dict[str, Any]:
    """Append the submission to ``<out>/submissions.jsonl`` (as the grid does for cells)."""
    from model.engine.run_io import git_revision

    sha, dirty = git_revision()
    entry = {"job_id": str(job.job_id), "cluster": sub.cluster, "tier": sub.tier_name,
             "argv": sub.argv, "cases": [c.name for c in sub.cases], "log": str(log_path(job)),
             "git_sha": sha, "git_dirty": dirty, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(sub.out / SUBMISSIONS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def log_path(job: Any) -> Path:
    """The job's log (stdout; stderr goes to the same file, see make_executor)."""
    return Path(job.paths.stdout)


def wait_for(job: Any, out: Path, print_table: bool = True) -> int:
    """Block until the job ends; print its cost table; return its exit status (1 if it died
    or a variant failed; the table, with the failed rows, is printed either way).

    ``print_table=False`` for a debug job: it ran in this process and printed the table itself.
    """
    from submitit.core.utils import UncompletedJobError

    try:
        status, finished = int(job.result()), True
    except UncompletedJobError as exc:  # failed, cancelled, killed, preempted
        # A job that ran every case but had a variant fail raises VariantsFailed (so that
        # sacct says FAILED); its table is complete and worth printing. Otherwise the table
        # on disk may be an earlier run's.
        status, finished = 1, "VariantsFailed" in str(exc)
        reason = "had variants fail; see their rows" if finished else f"did not finish: {exc}"
        print(f"error: benchmark job {job.job_id} {reason}\nlog: {log_path(job)}",
              file=sys.stderr)
    table = out / "cost_table.md"
    if print_table and finished and table.exists():
        sys.stdout.write(table.read_text(encoding="utf-8"))
    return status


def run_submission(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate, submit, record; then wait (``--wait``, local, debug) or say where to look.

    Exit status: 2 for a request refused before submission (nothing queued), 1 when the
    scheduler refused the job, else the job's status (with waiting) or 0.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        sub = validate(args, parser)
    except SubmissionError as exc:
        print(f"error: nothing submitted: {exc}", file=sys.stderr)
        return 2
    sub.out.mkdir(parents=True, exist_ok=True)
    try:
        job = submit(sub)
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        print(f"error: the {sub.cluster} submission failed: {exc}", file=sys.stderr)
        return 1
    record(sub, job)
    print(f"submitted benchmark ({len(sub.cases)} case(s)) as job {job.job_id} on "
          f"{sub.cluster}, tier {sub.tier_name}\nlog: {log_path(job)}\n"
          f"tables: {sub.out}/cost_table.{{md,tex,csv}}, raw rows: {sub.out}/steps.csv "
          f"(rewritten after every case)", flush=True)
    if sub.cluster == "slurm" and not args.wait:
        print(f"the job is queued; follow it with: squeue -j {job.job_id}  or  "
              f"sacct -j {job.job_id}")
        return 0
    return wait_for(job, sub.out, print_table=sub.cluster != "debug")
