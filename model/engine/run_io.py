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
from pathlib import Path
from typing import Any

import torch

from model.atomic import write_text_atomic

DONE, FAILED, RESULT, METRICS, META, CONFIG = (
    "DONE", "FAILED", "result.json", "metrics.jsonl", "meta.json", "config.yaml")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per record; ``flush`` + ``fsync`` so a killed job leaves complete lines only."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


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


def run_status(run_dir: Path) -> str:
    """done / failed / running (a run dir without a terminal marker) / missing."""
    if not run_dir.exists():
        return "missing"
    if (run_dir / DONE).exists():
        return "done"
    if (run_dir / FAILED).exists():
        return "failed"
    return "running"
