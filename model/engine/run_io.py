"""The run-directory contract read by results/ and the grid status view.

``<run_dir>/``: ``config.yaml`` (resolved config), ``meta.json`` (identity and environment),
``metrics.jsonl`` (append-only: one JSON object per logged train step or evaluation),
``checkpoint.pt`` (latest full checkpoint), ``result.json`` + ``DONE`` when finished,
``FAILED`` (error summary and traceback tail) when the run raised.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.atomic import write_text_atomic
from model.safe_paths import open_no_follow

DONE, FAILED, RESULT, METRICS, META, CONFIG = (
    "DONE", "FAILED", "result.json", "metrics.jsonl", "meta.json", "config.yaml")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# Files the harness writes or appends to in a run folder: none of them may be a symlink
# (checked on entry by run_cell and by the grid's plan; appends open them with O_NOFOLLOW).
WRITTEN = (META, CONFIG, METRICS, RESULT, DONE, FAILED, ".lock", "checkpoint.pt",
           "checkpoint.tmp", "tb")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per record; ``flush`` + ``fsync`` so a killed job leaves complete lines only.
    Never through a symlink (model/safe_paths.py)."""
    with open_no_follow(path) as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def keep_lines_until(path: Path, step: int, keep_step_line: bool = True) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) for a run resumed from its checkpoint at global
    ``step``: lines before ``step`` stay, and the training line at ``step`` when
    ``keep_step_line`` (an uninterrupted run logs that step too); what an interrupted attempt
    logged after the checkpoint, a line it logged only because it stopped there, and a torn
    last line go, so the resumed run logs exactly the lines an uninterrupted one does.
    Returns the number of lines dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if at < step or (at == step and keep_step_line and record.get("kind") == "train"):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(f"{x}\n" for x in kept))
    return dropped


def first_train_row(path: Path) -> dict[str, Any]:
    """The first logged training row of ``metrics.jsonl`` ({} if none)."""
    rows = train_rows(path) if path.exists() else []
    return rows[0] if rows else {}


def late_training_means(path: Path, prefix: str, total_steps: int,
                        share: float = 0.25) -> dict[str, float]:
    """Mean of every ``prefix``-named train scalar over the logged steps of the last ``share``
    of training (later duplicates of a step, written after a resume, replace earlier ones).

    Per-batch diagnostics are noisy at a small batch; a window mean is what a table can show.
    """
    first = total_steps - share * total_steps
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("kind") == "train" and record["step"] > first:
                by_step[record["step"]] = record
    keys = sorted({k for r in by_step.values() for k in r if k.startswith(prefix)})
    return {k: sum(r[k] for r in by_step.values() if k in r)
            / sum(k in r for r in by_step.values()) for k in keys}


def train_rows(path: Path) -> list[dict[str, Any]]:
    """The logged training rows of ``metrics.jsonl`` by step (after a resume, the later row of
    a step replaces the earlier one), in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("kind") == "train":
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def git_revision(repo: Path | None = None) -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty flag) of the code that runs."""
    cwd = repo or Path(__file__).resolve().parent  # git finds the checkout from any folder in it
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=cwd, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, dirty


def environment() -> dict[str, Any]:
    """Software and device facts recorded with every run and benchmark."""
    import torch  # here: readers of run directories (results/, the status view) need no torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    for pkg in ("transformers", "timm", "torchvision"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
            env[pkg] = None
    return env


def write_meta(run_dir: Path, identity: dict[str, Any]) -> None:
    """Write meta.json once, at the run's first start (kept across resumes)."""
    path = run_dir / META
    if path.exists():
        return
    sha, dirty = git_revision()
    write_json_atomic(path, {**identity, "git_sha": sha, "git_dirty": dirty,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "env": environment()})


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# The run verdicts, and the one precedence rule every reader uses (read_run).
STATUSES = ("done", "diverged", "failed", "running", "missing")
# The divergence guard's FAILED text starts with this (model/engine/guard.py Diverged).
DIVERGED_PREFIX = "Diverged:"


@dataclass(frozen=True)
class RunVerdict:
    """What a run directory says, read once by the grid, the status view, results collection
    and the downstream stages.

    ``status``: ``missing`` (no directory); ``failed`` or ``diverged`` when a ``FAILED`` marker
    exists (it wins over ``DONE``: a run marked failed is never counted; the divergence
    guard's marker is ``diverged``); ``done`` or ``diverged`` (a finite blow-up) when ``DONE``
    exists with a finished ``result.json`` (``DONE`` without one is ``failed``); else
    ``running`` (started, no terminal marker). ``finished``: the run needs no more work (a
    finite blow-up would only blow up again).
    """

    status: str
    detail: str = ""
    result: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_line(path: Path, default: str) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[0][:300] if lines else default


def read_run(run_dir: str | Path) -> RunVerdict:
    """The verdict on one run directory (see :class:`RunVerdict`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return RunVerdict("missing", "no run directory")
    meta = (_json_object(run_dir / META) if (run_dir / META).exists() else None) or {}
    if (run_dir / FAILED).exists():
        detail = _first_line(run_dir / FAILED, f"{FAILED} marker")
        return RunVerdict("diverged" if detail.startswith(DIVERGED_PREFIX) else "failed",
                          detail, meta=meta)
    if not (run_dir / DONE).exists():
        return RunVerdict("running", "no terminal marker", meta=meta)
    result = _json_object(run_dir / RESULT) if (run_dir / RESULT).exists() else None
    if result is None:
        why = f"{RESULT} is unreadable" if (run_dir / RESULT).exists() else f"no {RESULT}"
        return RunVerdict("failed", f"{DONE} marker but {why}", meta=meta)
    if result.get("status") == "diverged":
        reason = str((result.get("diverged") or {}).get("reason", "finite blow-up"))
        return RunVerdict("diverged", reason[:300], result, meta, finished=True)
    if result.get("status", "done") != "done":
        return RunVerdict("failed", f"{DONE} marker but {RESULT} is not a finished result",
                          meta=meta)
    return RunVerdict("done", "", result, meta, finished=True)


def run_status(run_dir: Path) -> str:
    """done / diverged / failed / running / missing (:func:`read_run`)."""
    return read_run(run_dir).status
