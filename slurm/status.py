"""Where every run of a grid stands: run directories, submissions, submitit logs and SLURM.

One row per run (cell, seed): ``finished``, ``running``, ``pending``, ``requeued``, ``failed``,
``cancelled`` or ``missing``, with its job id, last train step and loss, elapsed time and, for
failed runs, the tail of the error and of the job's log.

Sources, and what each one may decide:

* the run directory (``model.engine.run_io`` contract). Only ``DONE`` *with* a readable
  ``result.json`` makes a run finished, and a ``FAILED`` marker makes it failed whatever else
  is there: a failed cell is never reported as done;
* ``submissions.jsonl`` (written by ``slurm.launch``): the job id(s) of each run;
* ``sacct -D`` for SLURM job ids: a job that died without writing ``FAILED`` (killed, out of
  memory, timed out), was cancelled, is still queued or was requeued. When ``sacct`` fails the
  scheduler state is "unknown" (with a warning) and only the disk decides;
* submitit's logs in ``<grid>/.submitit/<job id>/``: the tail shown for failed runs.

Command line::

    python -m slurm.status RUNS_ROOT/GRID [--no-scheduler]
    python ablations/run_grid.py --status [--runs-root R --only ... --seeds N --preset P]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from model.engine.run_io import DONE, FAILED, METRICS, read_run

if TYPE_CHECKING:
    from slurm.spec import RunSpec

log = logging.getLogger(__name__)

STATES = ("finished", "running", "pending", "requeued", "failed", "diverged", "cancelled",
          "missing")
# The state of a planned run whose directory does not exist while other runs of its cell are on
# disk is still "missing"; those other runs are listed below it as not planned.
COLUMNS = ["cell", "seed", "run_id", "recipe", "state", "job_id", "scheduler", "last_step",
           "last_loss", "elapsed_s", "detail", "tail"]
SUBMISSIONS = "submissions.jsonl"
SUBMITIT_DIR = ".submitit"
TAIL_LINES = 15
SACCT_TIMEOUT_S = 30.0
# ``<cell>__s<seed>__<config hash>``, the run directory name made by ablations.grid.expand.
_RUN_ID = re.compile(r"^(?P<cell>.+)__s(?P<seed>\d+)__(?P<hash>[0-9a-zA-Z]+)$")
# SLURM job ids as submitit records them: "123" or array tasks "123_4".
_SLURM_ID = re.compile(r"^(?P<base>\d+)(?:_(?P<task>\d+))?$")
_FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
_REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED"}
_RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT",
                   "RESIZING", "SUSPENDED", "STOPPED"}


# --------------------------------------------------------------------------- scheduler


@dataclass(frozen=True)
class SchedulerView:
    """What ``sacct`` says about one job id, over all its attempts (requeues)."""

    state: str  # the current attempt's state, e.g. "COMPLETED", "CANCELLED by 0"
    exit_code: str  # "exit:signal" of the current attempt
    elapsed_s: float | None  # summed over attempts
    attempts: int
    requeued: bool  # an earlier attempt was requeued or preempted

    @property
    def base_state(self) -> str:
        return self.state.split()[0] if self.state else "UNKNOWN"

    @property
    def category(self) -> str:
        """finished / running / pending / requeued / failed / cancelled, or unknown."""
        state = self.base_state
        if state == "COMPLETED":
            return "finished" if self.exit_code.split(":")[0] in ("0", "") else "failed"
        if state in _FAILED_STATES:
            return "failed"
        if state == "CANCELLED":
            return "cancelled"
        if state in _REQUEUE_STATES:
            return "requeued"
        if state == "PENDING":
            return "requeued" if self.requeued or self.attempts > 1 else "pending"
        if state in _RUNNING_STATES:
            return "running"
        return "unknown"

    def describe(self) -> str:
        text = f"{self.state} {self.exit_code}".strip()
        return text + (f" (attempt {self.attempts})" if self.attempts > 1 else "")


def parse_elapsed(text: str) -> float | None:
    """sacct's ``[DD-[HH:]]MM:SS`` as seconds (None when unparsable)."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")]
        seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
        return seconds + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def _array_tasks(spec: str) -> set[str] | None:
    """Task ids of a pending array line's bracket, e.g. "0-3%2" -> {"0", "1", "2", "3"}."""
    tasks: set[str] = set()
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        tasks.update(str(t) for t in range(int(lo), int(hi or lo) + 1))
    return tasks


def _allocation_lines(text: str) -> list[tuple[str, str, str, str]]:
    """(JobID, State, ExitCode, Elapsed) of job allocations, in sacct's (attempt) order;
    step lines ("123.batch", "123.0", "123.extern") are dropped."""
    rows = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or "." in fields[0]:
            continue
        rows.append((fields[0], fields[1], fields[2], fields[3]))
    return rows


def _matches(line_id: str, job_id: str) -> bool:
    """Whether a sacct line is about ``job_id``: exactly, or as a still-pending array range
    ("12_[0-3%2]" covers "12_1")."""
    if line_id == job_id:
        return True
    base, _, task = job_id.partition("_")
    m = re.fullmatch(rf"{re.escape(base)}_\[(?P<spec>[^\]]+)\]", line_id)
    if not (m and task):
        return False
    tasks = _array_tasks(m.group("spec"))
    return tasks is not None and task in tasks


def parse_sacct(text: str, job_ids: Iterable[str]) -> dict[str, SchedulerView]:
    """Each job id's view from ``sacct -D -P -n --format=JobID,State,ExitCode,Elapsed``."""
    rows = _allocation_lines(text)
    views: dict[str, SchedulerView] = {}
    for job_id in job_ids:
        mine = [r for r in rows if _matches(r[0], job_id)]
        if not mine:
            continue
        states = [r[1] for r in mine]
        elapsed = [parse_elapsed(r[3]) for r in mine]
        views[job_id] = SchedulerView(
            state=states[-1], exit_code=mine[-1][2],
            elapsed_s=sum(e for e in elapsed if e is not None) if any(
                e is not None for e in elapsed) else None,
            attempts=len(mine),
            requeued=any(s.split()[0] in _REQUEUE_STATES for s in states[:-1] if s))
    return views


def query_sacct(job_ids: Sequence[str], since: str | None = None,
                timeout_s: float = SACCT_TIMEOUT_S) -> dict[str, SchedulerView] | None:
    """Ask the real scheduler about SLURM job ids; None (and a warning) when sacct fails.

    Array tasks are queried through their array's id, because sacct lists a not yet started
    task only under the array's pending range line. ``-D`` lists every attempt of a requeued
    job; ``since`` (the first submission's time) keeps job ids reused after a reset of the
    controller's counter out of the answer.
    """
    bases = sorted({m.group("base") for j in job_ids
                    if isinstance(j, str) and (m := _SLURM_ID.match(j))}, key=int)
    if not bases:
        return {}
    cmd = ["sacct", "-D", "-j", ",".join(bases), "--format=JobID,State,ExitCode,Elapsed",
           "-P", "-n"] + (["-S", since] if since else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("sacct failed (%s): scheduler states are unknown", exc)
        return None
    if proc.returncode != 0:
        log.warning("sacct exited with %d (%s): scheduler states are unknown",
                    proc.returncode, proc.stderr.strip()[-300:])
        return None
    return parse_sacct(proc.stdout, job_ids)


def queued_jobs(job_ids: Sequence[str], timeout_s: float = SACCT_TIMEOUT_S) -> set[str]:
    """Which of these SLURM job ids the controller holds now (pending, running, ...), from
    ``squeue``: live, without the accounting delay sacct can have right after a submission."""
    bases = sorted({m.group("base") for j in job_ids
                    if isinstance(j, str) and (m := _SLURM_ID.match(j))}, key=int)
    if not bases:
        return set()
    cmd = ["squeue", "-h", "-j", ",".join(bases), "-o", "%i"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return set()
    listed = set(proc.stdout.split()) if proc.returncode == 0 else set()
    return {j for j in job_ids if j in listed or any(_matches(x, j) for x in listed)}


# --------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskView:
    """What the run directory says."""

    kind: str  # done / diverged / bad-done / failed / started / absent
    detail: str = ""
    last_step: int | None = None
    last_loss: float | None = None
    elapsed_s: float | None = None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path`` (a line being written when a job died is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _progress(run_dir: Path) -> tuple[int | None, float | None, float | None]:
    """Last logged train step, its total loss and its time since the attempt's start."""
    train = [r for r in _read_jsonl(run_dir / METRICS) if r.get("kind") == "train"]
    if not train:
        return None, None, None
    last = train[-1]
    return last.get("step"), last.get("loss/total"), last.get("time_s")


_DISK_KINDS = {"done": "done", "diverged": "diverged", "failed": "failed", "running": "started",
               "missing": "absent"}


def read_disk(run_dir: Path) -> DiskView:
    """The run directory's verdict (model.engine.run_io.read_run: FAILED wins over DONE,
    DONE needs a valid result) with its progress."""
    verdict = read_run(run_dir)
    if verdict.status == "missing":
        return DiskView("absent")
    step, loss, time_s = _progress(run_dir)
    kind = _DISK_KINDS[verdict.status]
    if verdict.status == "failed" and (run_dir / DONE).exists() and \
            not (run_dir / FAILED).exists():
        kind = "bad-done"
    detail = "" if kind in ("done", "started") else verdict.detail
    elapsed = (verdict.result or {}).get("wall_s", time_s)
    return DiskView(kind, detail, step, loss, elapsed)


def _tail_lines(path: Path, n: int) -> str:
    lines = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join(lines[-n:])


def log_tail(grid_dir: Path, job_id: str | None, n: int = TAIL_LINES) -> str:
    """The last lines of the job's submitit logs (task 0 first), "" when there are none."""
    if not job_id:
        return ""
    folder = grid_dir / SUBMITIT_DIR / job_id
    parts = []
    for path in sorted(folder.glob("*_log.out")) + sorted(folder.glob("*_log.err")):
        text = _tail_lines(path, n)
        if text:
            parts.append(f"--- {path.name}\n{text}")
    return "\n".join(parts)


def failure_tail(grid_dir: Path, run_dir: Path, job_id: str | None,
                 n: int = TAIL_LINES) -> str:
    """The FAILED marker's tail and the job log's tail, whichever exist."""
    parts = []
    if (run_dir / FAILED).exists():
        parts.append(f"--- {FAILED}\n{_tail_lines(run_dir / FAILED, n)}")
    logs = log_tail(grid_dir, job_id, n)
    if logs:
        parts.append(logs)
    return "\n".join(parts) or "(no FAILED marker and no job log found)"


# --------------------------------------------------------------------------- combining


def classify(disk: DiskView, sched: SchedulerView | None) -> tuple[str, str]:
    """(state, reason) from the run directory and the scheduler (None: not known)."""
    cat = sched.category if sched is not None else None
    if disk.kind in ("failed", "diverged") and cat in ("pending", "requeued", "running") \
            and sched is not None and (sched.requeued or sched.attempts > 1 or
                                       cat == "requeued"):
        # The marker is an earlier attempt's; the job was requeued and runs again (its first
        # step clears the marker).
        return ("requeued" if cat != "running" else "running"), \
            f"requeued after: {disk.detail}"
    if disk.kind == "failed":
        return "failed", disk.detail
    if disk.kind == "bad-done":
        return "failed", disk.detail
    if disk.kind == "diverged":  # finished with a finite blow-up (model/engine/guard.py)
        return "diverged", disk.detail
    if disk.kind == "done":
        if cat == "failed":  # wrote its result, then died: the scheduler has the last word
            return "failed", f"{DONE} written but the job ended {sched.describe()}"
        return "finished", ""
    if cat in (None, "unknown"):
        if disk.kind == "absent":
            return "missing", "no run directory" + ("" if sched is None else
                                                    "; scheduler state unknown")
        return "running", "no terminal marker" + ("" if sched is None else
                                                   "; scheduler state unknown")
    if cat == "finished":
        return "failed", ("the job completed without writing " + DONE if disk.kind == "started"
                          else "the job completed but the run directory does not exist")
    if cat == "failed":
        return "failed", f"the job ended {sched.describe()}"
    return cat, ""


def read_submissions(grid_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``submissions.jsonl`` grouped by run id, oldest first (a resubmission appends)."""
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in _read_jsonl(grid_dir / SUBMISSIONS):
        if "run_id" in row:
            by_run.setdefault(str(row["run_id"]), []).append(row)
    return by_run


def _planned(grid_dir: Path, specs: Sequence[RunSpec] | None,
             subs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, int | None, str]]:
    """(cell, seed, run_id) of every planned run (the specs), then every other run submitted
    or with a directory in the grid (another ``--set``, seed count or recipe: what is on disk
    is listed without repeating the flags that made it)."""
    planned = [(s.cell, s.seed, s.run_id) for s in specs or []]
    names = set(subs)
    if grid_dir.is_dir():
        names |= {p.name for p in grid_dir.iterdir() if p.is_dir() and _RUN_ID.match(p.name)}
    runs = []
    for run_id in sorted(names - {r for _, _, r in planned}):
        m = _RUN_ID.match(run_id)
        rec = subs.get(run_id, [{}])[-1]
        cell = rec.get("cell") or (m.group("cell") if m else run_id)
        seed = rec.get("seed", int(m.group("seed")) if m else None)
        runs.append((cell, seed, run_id))
    return planned + runs


def _slurm_job(records: list[dict[str, Any]]) -> str | None:
    """The latest job id of a run when it was submitted to SLURM (local pids are not)."""
    rec = records[-1]
    job_id = str(rec.get("job_id", ""))
    return job_id if rec.get("cluster") == "slurm" and _SLURM_ID.match(job_id) else None


def _scheduler_views(subs: dict[str, list[dict[str, Any]]], run_ids: Iterable[str]
                     ) -> dict[str, SchedulerView]:
    """sacct views of the latest SLURM job of each run; "unknown" views if sacct failed."""
    runs = [r for r in run_ids if r in subs and _slurm_job(subs[r])]
    if not runs:
        return {}
    jobs = [_slurm_job(subs[r]) or "" for r in runs]
    times = sorted(str(subs[r][-1]["time"]) for r in runs if subs[r][-1].get("time"))
    views = query_sacct(jobs, since=times[0] if times else None)
    if views is None:  # known to be unknown: never read as finished
        return {j: SchedulerView("unknown", "", None, 0, False) for j in jobs}
    return views


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _local_views(subs: dict[str, list[dict[str, Any]]], run_ids: Iterable[str],
                 grid_dir: Path) -> dict[str, SchedulerView]:
    """Views of local-executor jobs (their job id is a process id) submitted from this host.

    A local job dies with the grid process that started it (e.g. Ctrl-C): without this, its
    run directory, which has no terminal marker, would read as running forever. A job whose
    process is gone after its run wrote DONE exited normally (COMPLETED), not cancelled.
    Records from another host, or without one (older grids), are left unknown.
    """
    host, views = socket.gethostname(), {}
    for run_id in run_ids:
        rec = subs.get(run_id, [{}])[-1]
        job_id = str(rec.get("job_id", ""))
        if rec.get("cluster") != "local" or rec.get("host") != host or not job_id.isdigit():
            continue
        if _pid_alive(int(job_id)):
            state = "RUNNING"
        elif (grid_dir / run_id / DONE).exists():
            state = "COMPLETED (local process exited)"
        else:
            state = "CANCELLED (local process gone)"
        views[job_id] = SchedulerView(state, "", None, 1, False)
    return views


def _row(grid_dir: Path, cell: str, seed: int | None, run_id: str, job_id: str | None,
         sched: SchedulerView | None, recipe: str) -> dict[str, Any]:
    disk = read_disk(grid_dir / run_id)
    state, detail = classify(disk, sched)
    elapsed = (sched.elapsed_s if sched is not None and sched.elapsed_s is not None
               else disk.elapsed_s)
    scheduler = sched.describe() if sched is not None else ""
    if state in ("finished", "diverged", "failed") and sched is not None and \
            sched.category in ("running", "pending", "requeued"):
        # The run directory already has its verdict; the job is only exiting (accounting
        # lags): a live state next to it would contradict the row.
        scheduler = f"exiting (last seen {sched.base_state})"
    return {
        "cell": cell, "seed": seed, "run_id": run_id, "recipe": recipe, "state": state,
        "job_id": job_id, "scheduler": scheduler,
        "last_step": disk.last_step, "last_loss": disk.last_loss, "elapsed_s": elapsed,
        "detail": detail,
        "tail": (failure_tail(grid_dir, grid_dir / run_id, job_id)
                 if state in ("failed", "diverged") else ""),
    }


def grid_status(grid_dir: Path, query_scheduler: bool = True,
                specs: Sequence[RunSpec] | None = None) -> pd.DataFrame:
    """One row per planned run of the grid in ``grid_dir`` (see the module docstring).

    ``specs`` (from ``ablations.grid.expand``) are the planned runs; without them, every run
    submitted or with a directory in ``grid_dir``. ``query_scheduler=False`` skips sacct (a
    SLURM job that died without a marker then shows as running); local-executor jobs are always
    checked by process id.
    """
    grid_dir = Path(grid_dir)
    subs = read_submissions(grid_dir)
    planned = _planned(grid_dir, specs, subs)
    run_ids = [r for _, _, r in planned]
    views = {**_local_views(subs, run_ids, grid_dir),
             **(_scheduler_views(subs, run_ids) if query_scheduler else {})}
    recipes = {s.run_id: s.fingerprint for s in specs or []}
    rows = []
    for cell, seed, run_id in planned:
        job_id = str(subs[run_id][-1].get("job_id")) if run_id in subs else None
        recipe = recipes.get(run_id) or str(read_run(grid_dir / run_id).meta.get("fingerprint")
                                            or "")
        row = _row(grid_dir, cell, seed, run_id, job_id, views.get(job_id or ""), recipe)
        row["planned"] = specs is None or run_id in recipes
        rows.append(row)
    return pd.DataFrame(rows, columns=[*COLUMNS, "planned"])


# --------------------------------------------------------------------------- output


def _clock(seconds: Any) -> str:
    if seconds is None or pd.isna(seconds):
        return ""
    s = int(round(float(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_status(df: pd.DataFrame) -> str:
    """A Markdown table, a count per state, and the tail of every failed run."""
    if df.empty:
        return "(no runs planned or found)"
    planned = df[df["planned"]] if "planned" in df else df
    others = df[~df["planned"]] if "planned" in df else df.iloc[:0]
    lines = [_status_table(planned)]
    if not others.empty:
        lines += ["", f"Not in this plan ({len(others)} run(s) on disk: other --set values, "
                  "seeds or recipes):", "", _status_table(others)]
    lines += ["", _recipe_summary(df)]
    for row in df[df["state"].isin(["failed", "diverged"])].itertuples():
        lines += ["", f"## {row.state}: {row.run_id} (job {row.job_id or '-'})", "```",
                  str(row.tail), "```"]
    return "\n".join(lines)


def _recipe_summary(df: pd.DataFrame) -> str:
    """One line per grid recipe found: how many runs, and whether this plan's."""
    parts = []
    for recipe, group in df.groupby(df["recipe"].fillna("").replace("", "unrecorded"),
                                    sort=False):
        mine = bool(group["planned"].all()) if "planned" in group else True
        parts.append(f"{recipe} ({len(group)} run(s){', this plan' if mine else ''})")
    return "recipes: " + ", ".join(parts)


def _status_table(df: pd.DataFrame) -> str:
    """The Markdown table and the count per state of some rows."""
    table = df.drop(columns=[c for c in ("tail", "planned") if c in df]).copy()
    table["elapsed_s"] = table["elapsed_s"].map(_clock)
    table = table.rename(columns={"elapsed_s": "elapsed"})
    table["last_step"] = table["last_step"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    table["last_loss"] = table["last_loss"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    table = table.fillna("")
    counts = df["state"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
    return "\n".join([table.to_markdown(index=False), "", f"{len(df)} run(s): {summary}"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid_dir", type=Path, help="RUNS_ROOT/GRID (holds submissions.jsonl)")
    p.add_argument("--no-scheduler", action="store_true",
                   help="read the run directories and logs only; do not call sacct")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.grid_dir.is_dir():
        print(f"error: {args.grid_dir} is not a directory", file=sys.stderr)
        return 2
    print(format_status(grid_status(args.grid_dir, query_scheduler=not args.no_scheduler)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
