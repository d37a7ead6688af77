"""The benchmark as a submitit job: the benchmark CLI's ``main(ARGV)`` inside the job.

The callable lives in an importable module because submitit pickles it by reference; a class
defined in ``__main__`` could not be unpickled by the job process. It runs the very ``main`` a
local run uses (``benchmarks.bench_step:main``), with the submitted arguments minus the
submission options, so a job's tables are the same files a local run writes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import submitit

from slurm.resources import allocated_threads

log = logging.getLogger(__name__)


def allocation_threads(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` with ``--threads`` set to the job's allocation (``allocated_threads``) when it
    does not say; the benchmark records the count it ran with."""
    threads = allocated_threads(env)
    if "--threads" in argv or threads is None:
        return list(argv)
    return [*argv, "--threads", str(threads)]


class JobInterrupted(BaseException):
    """Raised into the running benchmark when the job is preempted or near its time limit.

    A ``BaseException`` on purpose: the benchmark records ``RuntimeError`` per variant (that is
    how an out-of-memory step becomes a table row), so a ``RuntimeError`` raised at an arbitrary
    point of a step would be taken for a failed variant and the run would go on.
    """


class VariantsFailed(RuntimeError):
    """Some variant ended ``oom`` or ``error``: the tables hold it as a row, and the job fails,
    so that ``sacct`` and ``job.result()`` say so as well as the tables."""


def resolve_entry(entry: str) -> Callable[[Sequence[str]], int]:
    """``"package.module:function"`` -> the function (imported in the job process)."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class BenchmarkJob:
    """Runs the benchmark CLI's ``main(argv)`` (named by ``entry``, ``module:function``) in the
    job and returns its exit status; under a scheduler a non-zero status (a variant failed) is
    raised as ``VariantsFailed`` instead. The entry is a name, not a reference, so that this
    module does not depend on the CLI that submits it.

    Deliberately not ``submitit.helpers.Checkpointable``: see ``checkpoint``.
    """

    def __init__(self, entry: str) -> None:
        self.entry = entry

    def __call__(self, argv: Sequence[str]) -> int:
        """The CLI's own path; a refusal (``SystemExit`` with a message) or an interruption
        becomes an error that ``job.result()`` raises on the submitting side."""
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        argv = allocation_threads(argv)
        log.info("benchmark job: python -m %s %s", self.entry.partition(":")[0], " ".join(argv))
        main = resolve_entry(self.entry)
        try:
            status = main(argv)
        except SystemExit as exc:
            if exc.code in (None, 0):
                return 0
            raise RuntimeError(f"the benchmark refused to run: {exc.code}") from None
        except JobInterrupted as exc:
            raise RuntimeError(str(exc)) from None
        # Not under the debug executor: it answers a job's exception with a pdb post-mortem,
        # and this one's traceback says nothing the table does not.
        if status != 0 and submitit.JobEnvironment().cluster != "debug":
            raise VariantsFailed("some variants did not run ok (status oom or error); their "
                                 "rows are in the tables with the reason")
        return status

    def checkpoint(self, argv: Sequence[str]) -> NoReturn:
        """Called by submitit on preemption or near the time limit: stop, never requeue.

        A timing run interrupted halfway cannot be resumed meaningfully (a resumed case would
        mix rounds measured on two allocations), and the tables are rewritten after every
        finished case anyway, so what was measured is already on disk. Raising here, inside
        submitit's signal handler, ends the run before submitit could requeue it.
        """
        raise JobInterrupted("benchmark job preempted or out of time: not requeued; the "
                             "tables hold the cases finished so far")
