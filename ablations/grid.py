"""Expand the ablation matrix into validated runs, before anything is submitted.

A run is (cell, seed); its directory is ``<runs_root>/<grid>/<cell>__s<seed>__<config hash>`` —
keyed by what it computes, never by a scheduler job id, so re-running the grid skips finished
runs and resumes unfinished ones wherever they were started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from model.config.experiment import experiment_hash, load_experiment
from model.config.loader import ConfigError, from_dict, load_yaml_file, replace_path
from model.config.schema import ExperimentConfig
from model.engine.run_io import run_status
from slurm.spec import RunSpec

MATRIX_FILE = Path(__file__).with_name("matrix.yaml")
# A grid's downstream protocols live beside its matrix (protocols.yaml, protocols/).
PROTOCOLS_NAME = "protocols.yaml"
PROTOCOLS_FILE = MATRIX_FILE.with_name(PROTOCOLS_NAME)


@dataclass(frozen=True)
class CellEntry:
    """One matrix line: override files (relative to ``overrides/``) and inline dotted values."""

    overrides: tuple[str, ...] = ()
    set: dict[str, Any] = field(default_factory=dict)
    tier: str | None = None


@dataclass(frozen=True)
class MatrixFile:
    grid: str
    cells: dict[str, CellEntry]
    base: str | None = None
    seeds: tuple[int, ...] = (0,)
    tier: str = "8gpu"


def load_matrix(path: str | Path = MATRIX_FILE) -> MatrixFile:
    """Read and strictly validate the matrix file (unknown keys name the file and key)."""
    path = Path(path)
    data = load_yaml_file(path)
    return from_dict(MatrixFile, data, default_origin=str(path))


def _cell_config(matrix: MatrixFile, matrix_path: Path, name: str, preset: str,
                 seed: int, sets: Sequence[str]) -> ExperimentConfig:
    entry = matrix.cells[name]
    root = matrix_path.parent
    files = [root / "overrides" / f for f in entry.overrides]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError([f"{matrix_path}: cells.{name}.overrides: file not found: {m}"
                           for m in missing])
    cfg = load_experiment(files=files, preset=preset, sets=sets,
                          inline=[(f"{matrix_path} cells.{name}.set", entry.set)],
                          base=root / matrix.base if matrix.base else None)
    cfg = replace_path(cfg, "data.cache_dir", str(Path(cfg.data.cache_dir).resolve()))
    cfg = replace_path(cfg, "train.seed", seed, source=f"{matrix_path} seeds")
    if cfg.downstream:  # each fine-tuning / zero-shot stage's config must be valid too
        from model.engine.protocol import load_protocols, validate_downstream

        validate_downstream(cfg, load_protocols(root / PROTOCOLS_NAME))
    return cfg


def expand(matrix_path: str | Path = MATRIX_FILE, preset: str = "tiny",
           seeds: Sequence[int] | None = None, only: Sequence[str] = (),
           sets: Sequence[str] = (), runs_root: str | Path = "runs") -> list[RunSpec]:
    """All (cell, seed) runs; every cell's config is resolved and validated first, and all
    errors are reported together (nothing is submitted if any cell is invalid)."""
    matrix_path = Path(matrix_path)
    matrix = load_matrix(matrix_path)
    # Jobs may start in another working directory (a batch node, a requeue): absolute paths.
    runs_root = Path(runs_root).resolve()
    unknown = [c for c in only if c not in matrix.cells]
    if unknown:
        raise ConfigError([f"--only: unknown cell {c!r}; cells in {matrix_path}: "
                           f"{sorted(matrix.cells)}" for c in unknown])
    names = list(only) or list(matrix.cells)
    seed_list = list(seeds) if seeds is not None else list(matrix.seeds)
    errors: list[str] = []
    specs: list[RunSpec] = []
    for name in names:
        for seed in seed_list:
            try:
                cfg = _cell_config(matrix, matrix_path, name, preset, seed, sets)
            except ConfigError as exc:
                errors += [f"cell '{name}' seed {seed}: {e}" for e in exc.errors]
                continue
            chash = experiment_hash(cfg)
            run_dir = Path(runs_root) / matrix.grid / f"{name}__s{seed}__{chash}"
            specs.append(RunSpec(matrix.grid, name, seed, cfg, chash, run_dir,
                                 matrix.cells[name].tier or matrix.tier, preset,
                                 (matrix_path.parent / PROTOCOLS_NAME).resolve()))
    if errors:
        raise ConfigError(sorted(set(errors)))
    return specs


def plan_table(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """One row per run with its status on disk (done / failed / running / new)."""
    rows = []
    for s in specs:
        status = run_status(s.run_dir)
        rows.append({"cell": s.cell, "seed": s.seed, "status": "new" if status == "missing"
                     else status, "tier": s.tier, "config_hash": s.config_hash,
                     "run_dir": str(s.run_dir)})
    return pd.DataFrame(rows)
