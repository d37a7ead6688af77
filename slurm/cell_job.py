"""The grid's job: one (cell, seed) run, requeued on preemption and resumed from disk."""

from __future__ import annotations

import logging
import signal
from typing import Any

import submitit

from slurm.resources import allocated_threads
from slurm.spec import RunSpec

log = logging.getLogger(__name__)


class CellJob(submitit.helpers.Checkpointable):
    """Train + evaluate one run directory; lives in an importable module (submitit pickles it).

    ``checkpoint`` saves nothing: it runs in task 0's signal handler, where a collective save
    would deadlock and a mid-step save could be torn. The training loop writes atomic
    checkpoints on its own cadence; a requeued job calls the same run directory again and
    resumes from the last one (the run directory is keyed by config, not by job id).
    """

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from SLURM's variables.
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True)
        threads = allocated_threads()
        if threads:
            import torch

            torch.set_num_threads(threads)
        log.info("cell %s seed %d -> %s (task %d/%d)", spec.cell, spec.seed, spec.run_dir,
                 env.global_rank, env.num_tasks)
        from model.cell.pipeline import run_cell

        return run_cell(spec.config, spec.run_dir, identity=spec.identity(), progress=False,
                        protocols=spec.protocols_file)

    def checkpoint(self, spec: RunSpec) -> submitit.helpers.DelayedSubmission:
        log.info("preempted or timed out: requeueing %s", spec.run_id)
        shield_requeue_from_sigterm()
        return submitit.helpers.DelayedSubmission(CellJob(), spec)


def shield_requeue_from_sigterm() -> None:
    """Ignore SIGTERM from here on, in this task and in the children it starts next.

    Right after ``checkpoint`` returns, submitit runs ``scontrol requeue`` as a child of this
    task. The requeue makes SLURM send SIGTERM to every process of the job, and that includes
    the ``scontrol`` itself: when it is slow to exit (a loaded node), it dies by the signal and
    submitit writes a failure result for a job that was in fact requeued, so a waiting caller
    reads "failed" while the job runs again. An ignored signal stays ignored across fork and
    exec, so the child finishes. This task loses nothing: submitit already bypasses SIGTERM,
    exits it right after the requeue, and SLURM's SIGKILL still follows after KillWait.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
