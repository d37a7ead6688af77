"""The raw summary of a grid: ``results/raw/<grid>.jsonl``, one JSON object per line.

A ``run`` line per run (the tidy frame's run columns of :mod:`results.collect` and its metrics)
and a ``curve`` line per run and logged curve (subsampled steps and values): enough to rebuild
every table and plot without the run directories. Reading validates every line and names the
file and line of each problem; merging a fresh collection into an existing file never drops a
row the collection did not cover. Where a recipe's file is: :mod:`results.raw_files`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.engine.run_io import STATUSES
from results.collect import (
    CURVE_COLUMNS,
    RUN_COLUMNS,
    frame_to_records,
    isna,
    recipe_json,
    recipe_settings_of,
    records_to_frame,
    subsample_curves,
)

logger = logging.getLogger(__name__)


def _json_value(value: Any) -> Any:
    """Make a frame scalar JSON-serialisable (timestamps as ISO text, NA as null)."""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isna(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def write_raw(
    frame: pd.DataFrame, path: Path, curves: pd.DataFrame | None = None, max_points: int = 200
) -> Path:
    """Write the compact raw summary: one ``run`` line per run, one ``curve`` line per run.

    Enough to rebuild every table and plot without the run directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in frame_to_records(frame):
        line = {"record": "run", **{k: _json_value(record[k]) for k in RUN_COLUMNS}}
        line["recipe"] = recipe_settings_of(line["recipe"])
        lines.append({**line, "metrics": record["metrics"]})
    if curves is not None and not curves.empty:
        small = subsample_curves(curves, max_points)
        for (run_id, metric), group in small.groupby(["run_id", "metric"], sort=True):
            first = group.iloc[0]
            steps, values = [int(s) for s in group["step"]], [float(v) for v in group["value"]]
            lines.append(
                dict(
                    record="curve",
                    grid=first["grid"],
                    cell=first["cell"],
                    seed=int(first["seed"]),
                    run_id=run_id,
                    metric=metric,
                    step=steps,
                    value=values,
                )
            )
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    logger.info("wrote %d raw line(s) to %s", len(lines), path)
    return path


class RawFileError(ValueError):
    """Malformed lines in a raw summary; every problem names the file and the line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _run_line_problem(line: dict[str, Any]) -> str | None:
    """What is wrong with a ``run`` line, or None."""
    for key, kind in (("cell", str), ("status", str)):
        if not isinstance(line.get(key), kind):
            return f"{key!r} missing or not a {kind.__name__}"
    if line["status"] != "missing" and not isinstance(line.get("run_id"), str):
        return "'run_id' missing or not a str"
    if not isinstance(line.get("seed"), int) or isinstance(line.get("seed"), bool):
        return "'seed' missing or not an integer"
    if not isinstance(line.get("fingerprint", ""), str | None):
        return "'fingerprint' is not a string"
    if not isinstance(line.get("recipe", {}), dict | None):
        return "'recipe' is not an object"
    if line["status"] not in STATUSES:
        return f"status {line['status']!r} is not one of {list(STATUSES)}"
    metrics = line.get("metrics")
    if not isinstance(metrics, dict):
        return "'metrics' missing or not an object"
    if line["status"] == "done" and not metrics:
        return "a finished run without metrics"
    bad = [k for k, v in metrics.items() if not _finite_number(v)]
    return f"metric(s) {bad} are not finite numbers" if bad else None


def _curve_line_problem(line: dict[str, Any]) -> str | None:
    step, value = line.get("step"), line.get("value")
    if not isinstance(step, list) or not isinstance(value, list) or len(step) != len(value):
        return "'step' and 'value' must be lists of one length"
    if not all(_finite_number(v) for v in value):
        return "curve values are not finite numbers"
    missing = [k for k in ("cell", "seed", "run_id", "metric") if k not in line]
    return f"missing keys {missing}" if missing else None


def _parse_raw_line(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg})"
    if not isinstance(line, dict):
        return None, f"expected a JSON object, got {type(line).__name__}"
    kind = line.get("record")
    if kind not in ("run", "curve"):
        return None, f"'record' must be 'run' or 'curve', got {kind!r}"
    return line, (_run_line_problem if kind == "run" else _curve_line_problem)(line)


def read_raw_lines(path: Path, skip_bad: bool = False
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(run lines, curve lines, number of skipped lines) of a raw summary, validated.

    Every malformed line (not JSON, unknown record, missing or non-finite metrics, a finished
    run without metrics) and every conflicting duplicate (one run id twice with different
    content) is a problem naming the file and line; they raise :class:`RawFileError` together,
    unless ``skip_bad``, which drops them (a conflicting duplicate drops both lines) and counts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raw summary {path} does not exist")
    runs: dict[str, tuple[int, dict[str, Any]]] = {}  # by run id (missing rows: cell/seed)
    curves, problems, skipped = [], [], 0
    conflicted: set[str] = set()
    for n, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        line, problem = _parse_raw_line(text)
        key = _line_key(line) if problem is None and line["record"] == "run" else None
        if key is not None and key in runs:
            first_n, first = runs[key]
            if first != line:
                problem = (f"run {key!r} also on line {first_n} with different content "
                           "(conflicting duplicate)")
                conflicted.add(key)
            else:
                continue  # an exact repeat changes nothing
        if problem is not None:
            problems.append(f"{path}:{n}: {problem}")
            skipped += 1
            continue
        if key is not None:
            runs[key] = (n, line)
        else:
            curves.append(line)
    if problems and not skip_bad:
        raise RawFileError(problems)
    for problem in problems:
        logger.warning("skipped %s", problem)
    skipped += len(conflicted)
    kept = [line for run_id, (_, line) in runs.items() if run_id not in conflicted]
    return kept, [c for c in curves if c["run_id"] not in conflicted], skipped


def _line_key(line: dict[str, Any]) -> str:
    return line.get("run_id") or f"<missing {line['cell']} s{line['seed']}>"


def _runs_frame(path: Path, lines: list[dict[str, Any]], skipped: int) -> pd.DataFrame:
    records = []
    for line in lines:
        record = {k: line.get(k) for k in RUN_COLUMNS}
        record["fingerprint"] = str(line.get("fingerprint") or "")
        record["recipe"] = recipe_json(line.get("recipe"))
        record["created"] = pd.Timestamp(line["created"]) if line.get("created") else pd.NaT
        record["metrics"] = line.get("metrics") or {}
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no run records")
    frame = records_to_frame(records)
    frame.attrs["skipped_lines"] = skipped
    return frame


def _curves_frame(lines: list[dict[str, Any]]) -> pd.DataFrame:
    # Epochs are not kept in the raw file; plots only need steps.
    rows = [
        {
            **{k: line[k] for k in ("grid", "cell", "seed", "run_id", "metric")},
            "step": step,
            "epoch": None,
            "value": value,
        }
        for line in lines
        for step, value in zip(line["step"], line["value"], strict=True)
    ]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def read_raw_file(path: Path, skip_bad: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs (:func:`read_raw`) and curves (:func:`read_raw_curves`) of a raw summary,
    reading and validating the file once."""
    runs, curves, skipped = read_raw_lines(path, skip_bad)
    return _runs_frame(Path(path), runs, skipped), _curves_frame(curves)


def fill_steps(frame: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each finished run's missing ``steps`` (runs recorded before result
    summaries kept them) taken from its last logged training step."""
    gaps = (frame["status"] == "done") & frame["steps"].isna()
    if not gaps.any() or curves.empty:
        return frame
    last = curves.groupby("run_id")["step"].max()
    frame = frame.copy()
    frame.loc[gaps, "steps"] = frame.loc[gaps, "run_id"].map(last).astype("Int64")
    return frame


def read_raw(path: Path, skip_bad: bool = False) -> pd.DataFrame:
    """Read the run lines of a raw summary back into the tidy long frame (validated, see
    :func:`read_raw_lines`; ``frame.attrs["skipped_lines"]`` counts the lines dropped)."""
    runs, _, skipped = read_raw_lines(path, skip_bad)
    return _runs_frame(Path(path), runs, skipped)


def read_raw_curves(path: Path, skip_bad: bool = False) -> pd.DataFrame:
    """Read the (subsampled) training curves of a raw summary in :func:`load_curves` format."""
    return _curves_frame(read_raw_lines(path, skip_bad)[1])


def _key(record: dict[str, Any]) -> tuple[str, str, int]:
    return (str(record.get("grid") or ""), str(record["cell"]), int(record["seed"]))


def merge_with_raw(frame: pd.DataFrame, curves: pd.DataFrame, path: Path,
                   skip_bad: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Freshly collected runs merged into an existing raw summary, never overwriting it.

    Each (grid, cell, seed) is one row: a collected run (finished, failed or running) replaces
    the raw file's row for it; a cell/seed the collection found no run directory for (status
    ``missing``, e.g. the other cells of a partial grid) keeps the raw file's row and curves.
    """
    if not Path(path).is_file():
        return frame, curves
    old_frame, old_curves = read_raw_file(path, skip_bad)
    old, new = frame_to_records(old_frame), frame_to_records(frame)
    covered = {_key(r) for r in new if r["status"] != "missing"}
    kept_old = [r for r in old if _key(r) not in covered]
    old_keys = {_key(r) for r in kept_old}
    merged = [r for r in new if r["status"] != "missing" or _key(r) not in old_keys] + kept_old
    kept_ids = {r["run_id"] for r in kept_old}
    curves = pd.concat([curves, old_curves[old_curves["run_id"].isin(kept_ids)]],
                       ignore_index=True)
    if kept_old:
        logger.info("%s: kept %d row(s) of runs not collected now", path, len(kept_old))
    out = records_to_frame(merged)
    out.attrs["skipped_lines"] = old_frame.attrs.get("skipped_lines", 0)
    return out, curves
