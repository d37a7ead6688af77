"""Read finished (and unfinished) training runs into tidy pandas frames.

A grid lives in ``RUNS_DIR/<grid>/`` and holds one directory per run, named
``<cell>__s<seed>__<config_hash>``, with ``meta.json``, ``metrics.jsonl``, ``result.json`` and a
``DONE`` or ``FAILED`` marker. :func:`collect_runs` turns that into one long table with a row per
(run, metric); cell/seed pairs that were expected but have no run directory appear with status
``missing``, so nothing downstream can average fewer seeds without noticing.

The compact raw summary of these frames (``results/raw/<grid>.jsonl``, written and read by
:mod:`results.raw_format`) holds the same information plus subsampled training curves, so
tables and plots can be rebuilt without access to the run directories.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.engine.run_io import CONFIG, METRICS, read_run

logger = logging.getLogger(__name__)

# Per-run columns of the tidy frame (each repeated on every metric row of the run).
RUN_COLUMNS = (
    "grid cell seed run_id config_hash recipe_hash fingerprint recipe preset status created split "
    "n_images n_texts steps note".split()
)
COLUMNS = [*RUN_COLUMNS, "metric", "value"]
CURVE_COLUMNS = ["grid", "cell", "seed", "run_id", "step", "epoch", "metric", "value"]
# Every logged ``loss/<term>`` becomes a curve, so a new loss term is plotted without edits here;
# the total comes first and ITM by pair type (model/losses.py itm_pair_stats) after the losses:
# does ITM match, or only know the prior?
LOSS_PREFIX = "loss/"
ITM_KEYS = ("itm/clean_loss", "itm/pos_acc", "itm/neg_img_acc", "itm/neg_txt_acc",
            "itm/masked_acc", "itm/shortcut")


def is_curve_key(key: str) -> bool:
    """A logged training scalar that is drawn as a curve."""
    return key.startswith(LOSS_PREFIX) or key in ITM_KEYS


def curve_order(keys: Sequence[str]) -> list[str]:
    """Curve keys in panel order: total loss, the other losses as first logged, ITM stats."""
    present = list(dict.fromkeys(keys))
    losses = [k for k in present if k.startswith(LOSS_PREFIX)]
    losses.sort(key=lambda k: k != f"{LOSS_PREFIX}total")  # stable: first-logged order kept
    return losses + [k for k in ITM_KEYS if k in present]


_RUN_DIR = re.compile(r"^(?P<cell>.+)__s(?P<seed>\d+)__(?P<hash>[^_]+)$")


def _recipe_hash(run_dir: Path, meta: dict[str, Any]) -> str:
    """The seed-independent config hash: from meta.json, else recomputed from config.yaml
    (runs written before meta.json recorded it); "" when neither is readable."""
    if meta.get("recipe_hash"):
        return str(meta["recipe_hash"])
    config = run_dir / CONFIG
    if not config.exists():
        return ""
    from model.config.experiment import load_experiment, recipe_hash
    from model.config.loader import ConfigError

    try:
        return recipe_hash(load_experiment([config]))
    except (ConfigError, OSError, ValueError) as exc:
        logger.warning("cannot read %s: %s", config, exc)
        return ""


def _created(meta: dict[str, Any], run_dir: Path) -> pd.Timestamp:
    """Creation time (naive UTC) from meta.json; the directory's mtime when meta has none."""
    stamp = meta.get("created")
    if stamp:
        try:
            created = pd.Timestamp(stamp)
        except ValueError:
            logger.warning("%s: unparseable created time %r", run_dir, stamp)
        else:
            # Mixed naive/aware stamps cannot be compared; normalise aware ones to naive UTC.
            return created.tz_convert("UTC").tz_localize(None) if created.tzinfo else created
    return pd.Timestamp(run_dir.stat().st_mtime, unit="s")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The float-valued entries of a metrics dict (booleans and text are not metrics)."""
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def recipe_json(settings: Any) -> str:
    """A recipe's settings as canonical JSON text (a hashable frame value); "" when unknown."""
    return json.dumps(settings, sort_keys=True) if isinstance(settings, dict) and settings \
        else ""


def recipe_settings_of(text: Any) -> dict[str, Any]:
    """Inverse of :func:`recipe_json`."""
    return json.loads(text) if isinstance(text, str) and text else {}


def _read_run(run_dir: Path, grid: str) -> dict[str, Any] | None:
    """Summarise one run directory as a record with a ``metrics`` dict; None if unusable."""
    match = _RUN_DIR.match(run_dir.name)
    verdict = read_run(run_dir)
    if not verdict.meta and match is None:
        logger.warning("skipping %s: no meta.json and name is not <cell>__s<seed>__<hash>", run_dir)
        return None
    meta, result = verdict.meta, verdict.result
    # Only a finished run contributes numbers; a failed or diverged run's are dropped.
    status, note = verdict.status, ("" if verdict.status in ("done", "running")
                                    else verdict.detail[:200])
    provenance = (result or {}).get("provenance", {}) if status == "done" else {}
    return {
        "grid": grid,  # the directory name, so the run can be found again on disk
        "cell": str(meta.get("cell", match["cell"] if match else "")),
        "seed": int(meta.get("seed", match["seed"] if match else -1)),
        "run_id": run_dir.name,
        "config_hash": str(meta.get("config_hash", match["hash"] if match else "")),
        "recipe_hash": _recipe_hash(run_dir, meta),
        # The grid's recipe (model/config/recipe.py); "" for runs made before it was recorded.
        "fingerprint": str(meta.get("fingerprint") or ""),
        "recipe": recipe_json(meta.get("recipe")),
        "preset": meta.get("preset"),
        "status": status,
        "created": _created(meta, run_dir),
        "split": provenance.get("split"),
        "n_images": provenance.get("n_images"),
        "n_texts": provenance.get("n_texts"),
        "steps": (result or {}).get("train_steps") if status == "done" else None,
        "note": note,
        # Only a finished run contributes numbers; a failed run's partial metrics are dropped.
        "metrics": _numeric((result or {}).get("metrics", {})) if status == "done" else {},
    }


def _grid_dirs(runs_dir: Path, grid: str | None) -> list[Path]:
    """The grid directories to scan: one named grid, or every sub-directory."""
    if not runs_dir.is_dir():
        raise ValueError(f"runs directory {runs_dir} does not exist")
    if grid is not None:
        path = runs_dir / grid
        if not path.is_dir():
            known = sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
            raise ValueError(f"grid {grid!r} not found in {runs_dir}; grids there: {known}")
        return [path]
    return sorted(p for p in runs_dir.iterdir() if p.is_dir())


def scan_runs(runs_dir: Path, grid: str | None = None) -> list[dict[str, Any]]:
    """One record per existing run directory (no de-duplication, no missing rows)."""
    records = []
    for grid_dir in _grid_dirs(Path(runs_dir), grid):
        # Hidden folders (submitit's ``.submitit`` logs) are the launcher's, not runs.
        for run_dir in sorted(p for p in grid_dir.iterdir()
                              if p.is_dir() and not p.name.startswith(".")):
            record = _read_run(run_dir, grid_dir.name)
            if record is not None:
                records.append(record)
    return records


def deduplicate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the newest run per (recipe fingerprint, cell, seed) and warn about the ones dropped.

    Two run dirs for one cell/seed of one recipe mean the cell's config changed (new hash) and
    was rerun; the older numbers belong to a config that no longer exists. Runs of another
    grid recipe are all kept: the tables show one recipe and list the others as excluded.
    """
    by_key: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for record in records:
        if record["status"] != "missing":  # placeholders are re-derived by complete_grid
            key = (str(record.get("fingerprint") or ""), record["cell"], record["seed"])
            by_key.setdefault(key, []).append(record)
    kept = []
    for (_, cell, seed), group in sorted(by_key.items()):
        group.sort(
            key=lambda r: (pd.Timestamp.min if pd.isna(r["created"]) else r["created"], r["run_id"])
        )
        newest = group[-1]
        if len(group) > 1:
            dropped = [f"{r['grid']}/{r['run_id']}" for r in group[:-1]]
            hashes = {r["config_hash"] for r in group}
            reason = "config changed" if len(hashes) > 1 else "duplicate run"
            kept_id = f"{newest['grid']}/{newest['run_id']}"
            logger.warning(
                "%s s%d: %s; keeping newest %s, ignoring %s",
                cell,
                seed,
                reason,
                kept_id,
                ", ".join(dropped),
            )
        kept.append(newest)
    return kept


def placeholder_record(grid: str | None, cell: str, seed: int, status: str = "missing",
                       note: str = "") -> dict[str, Any]:
    """Record for an expected cell/seed without a run of its own (``missing``; the tables use
    ``excluded`` for one whose runs are of another grid recipe)."""
    record = dict.fromkeys(RUN_COLUMNS)
    record.update(grid=grid, cell=cell, seed=seed, status=status, created=pd.NaT, note=note)
    return {**record, "metrics": {}}


def complete_grid(
    records: list[dict[str, Any]],
    cells: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """Add ``missing`` records for every expected cell x seed that has no run.

    Expected seeds default to every seed seen in ``records``, so a cell that ran fewer seeds
    than its neighbours shows the gap instead of silently averaging fewer. With explicit
    ``seeds``, runs of other seeds are dropped.
    """
    present = {(r["cell"], r["seed"]) for r in records if r["status"] != "missing"}
    all_cells = list(dict.fromkeys([*(r["cell"] for r in records), *(cells or [])]))
    all_seeds = sorted(set(seeds) if seeds is not None else {r["seed"] for r in records})
    grids = sorted({r["grid"] for r in records if r["grid"]})
    grid = grids[0] if len(grids) == 1 else "+".join(grids)
    # Seeds outside the requested set drop out, and stale missing rows give way to real runs.
    kept = [r for r in records if r["seed"] in all_seeds]
    kept = [r for r in kept if r["status"] != "missing" or (r["cell"], r["seed"]) not in present]
    have = {(r["cell"], r["seed"]) for r in kept}
    extra = [
        placeholder_record(grid, c, s) for c in all_cells for s in all_seeds if (c, s) not in have
    ]
    return kept + extra


def records_to_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Explode run records into the tidy long format (one row per run and metric).

    A run without metrics (failed, running, missing) keeps one row with metric None so its
    status stays visible.
    """
    rows = []
    for record in records:
        base = {k: record[k] for k in RUN_COLUMNS}
        metrics = record["metrics"] or {None: np.nan}
        rows.extend(
            {**base, "metric": m, "value": float(v)}
            for m, v in sorted(metrics.items(), key=lambda kv: "" if kv[0] is None else kv[0])
        )
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["seed"] = frame["seed"].astype(int)
    frame["created"] = pd.to_datetime(frame["created"])
    for column in ("n_images", "n_texts", "steps"):  # integers despite missing values
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    return frame.sort_values(
        ["cell", "seed", "metric"], na_position="first", kind="stable"
    ).reset_index(drop=True)


def frame_to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Inverse of :func:`records_to_frame`: one record per run with a ``metrics`` dict."""
    records = []
    # One record per run: a cell/seed may have runs of several recipes (fingerprints).
    for _, group in frame.groupby(["cell", "seed", "run_id"], sort=True, dropna=False):
        first = group.iloc[0]
        record = {k: (None if isna(first[k]) else first[k]) for k in RUN_COLUMNS}
        record["seed"] = int(record["seed"])
        record["created"] = first["created"]
        pairs = zip(group["metric"], group["value"], strict=True)
        record["metrics"] = {str(m): float(v) for m, v in pairs if not isna(m)}
        records.append(record)
    return records


def isna(value: Any) -> bool:
    """NA test that is False (not an array) for non-scalars such as dicts or lists."""
    result = pd.isna(value)
    return bool(result) if isinstance(result, bool | np.bool_) else False


def select_runs(
    frame: pd.DataFrame,
    *,
    preset: str | None = None,
    cells: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Filter a collected frame by preset and re-derive the missing cell/seed rows."""
    records = frame_to_records(frame)
    if preset is not None:
        # Runs of another preset drop out; their cell/seed then reappears as missing.
        records = [r for r in records if r["status"] == "missing" or r["preset"] == preset]
    return records_to_frame(complete_grid(records, cells, seeds))


def collect_runs(
    runs_dir: Path,
    grid: str | None = None,
    *,
    cells: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    preset: str | None = None,
) -> pd.DataFrame:
    """Collect every run of ``grid`` (all grids if None) into a tidy long DataFrame.

    Columns: grid, cell, seed, run_id, config_hash, preset, status (done/failed/running/missing),
    created, split, n_images, n_texts, note, metric, value. ``cells`` and ``seeds`` name what is
    expected, so absent runs appear as ``missing``; ``preset`` keeps only runs of that preset.
    """
    records = scan_runs(Path(runs_dir), grid)
    if not records:
        raise ValueError(f"no run directories found under {runs_dir}" + (f"/{grid}" * bool(grid)))
    frame = records_to_frame(deduplicate(records))
    return select_runs(frame, preset=preset, cells=cells, seeds=seeds)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping (and counting) unparseable lines.

    A running job may be killed mid-write, leaving a truncated last line; that must not make
    the whole run unreadable.
    """
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad:
        logger.warning("%s: skipped %d unparseable line(s)", path, bad)
    return rows


def _curve_rows(
    record: dict[str, Any], lines: list[dict[str, Any]], keys: Sequence[str] | None, kind: str
) -> list[dict[str, Any]]:
    """Long-format curve rows of one run for the requested metric keys (None: every curve
    key the run logged)."""
    base = {k: record[k] for k in ("grid", "cell", "seed", "run_id")}
    return [
        dict(
            base,
            step=int(line["step"]),
            epoch=line.get("epoch"),
            metric=key,
            value=float(line[key]),
        )
        for line in lines
        if line.get("kind") == kind and "step" in line
        for key in (keys if keys is not None else [k for k in line if is_curve_key(k)])
        if isinstance(line.get(key), int | float)
    ]


def load_curves(
    runs_dir: Path,
    grid: str | None = None,
    *,
    runs: pd.DataFrame | None = None,
    keys: Sequence[str] | None = None,
    kind: str = "train",
) -> pd.DataFrame:
    """Training curves from every run's ``metrics.jsonl`` in long format.

    Columns: grid, cell, seed, run_id, step, epoch, metric, value. If ``runs`` (a frame from
    :func:`collect_runs`) is given, only its done or running runs are read, so curves match the
    runs the tables use (newest config per cell/seed, no failed runs).
    """
    if runs is not None:
        # Reuse the collected runs instead of rescanning (and re-warning about) every dir.
        live = runs[runs["status"].isin(["done", "running"])]
        targets = live.drop_duplicates("run_id")[["grid", "cell", "seed", "run_id"]]
        records = targets.to_dict("records")
    else:
        records = scan_runs(Path(runs_dir), grid)
    rows: list[dict[str, Any]] = []
    for record in records:
        path = Path(runs_dir) / record["grid"] / record["run_id"] / METRICS
        if path.exists():
            rows.extend(_curve_rows(record, _read_jsonl(path), keys, kind))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def subsample_curves(curves: pd.DataFrame, max_points: int = 200) -> pd.DataFrame:
    """Keep at most ``max_points`` evenly spaced steps per run and metric (first and last kept).

    Seeds of one cell log the same steps, so the same positions are kept and the mean over
    seeds stays aligned.
    """

    def pick(group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values("step")
        idx = np.unique(np.linspace(0, len(group) - 1, min(len(group), max_points)).round())
        return group.iloc[idx.astype(int)]

    if curves.empty:
        return curves
    parts = [pick(g) for _, g in curves.groupby(["run_id", "metric"], sort=True)]
    return pd.concat(parts, ignore_index=True)
