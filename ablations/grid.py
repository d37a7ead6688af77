"""Expand the ablation matrix into validated runs, before anything is submitted.

A run is (cell, seed); its directory is ``<runs_root>/<grid>/<cell>__s<seed>__<config hash>`` —
keyed by what it computes, never by a scheduler job id, so re-running the grid skips finished
runs and resumes unfinished ones wherever they were started.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from model.config.experiment import experiment_layers, load_experiment
from model.config.loader import (
    ConfigError,
    FieldError,
    from_dict,
    load_yaml_file,
    merge_layers,
    replace_path,
    to_dict,
)
from model.config.recipe import (
    ScaleOutError,
    fingerprint,
    flatten,
    launch_for,
    recipe_settings,
    run_hash,
)
from model.config.schema import ExperimentConfig, TrainConfig
from model.engine.run_io import run_status
from model.safe_paths import UnsafePathError, check_inside, name_problem
from results.recipes import Plan
from slurm.spec import RunSpec

MATRIX_FILE = Path(__file__).with_name("matrix.yaml")
# A grid's downstream protocols live beside its matrix (protocols.yaml, protocols/).
PROTOCOLS_NAME = "protocols.yaml"
PROTOCOLS_FILE = MATRIX_FILE.with_name(PROTOCOLS_NAME)
# The resource tier a preset runs on unless --tier says otherwise (the matrix's tier is the
# paper-scale one; the tiny preset is one CPU process).
DEFAULT_TIERS = {"tiny": "cpu"}


@dataclass(frozen=True)
class CellEntry:
    """One matrix line: override files (relative to ``overrides/``) and inline dotted values."""

    overrides: tuple[str, ...] = ()
    set: dict[str, Any] = field(default_factory=dict)
    tier: str | None = None

    def __post_init__(self) -> None:
        twice = sorted({f for f in self.overrides if self.overrides.count(f) > 1})
        if twice:
            raise FieldError("overrides", f"lists {twice} more than once (each override file "
                             f"is one concern; applying it twice is a typo)")
        bad = [f for f in self.overrides if Path(f).is_absolute() or ".." in Path(f).parts]
        if bad:
            raise FieldError("overrides", f"{bad}: override files are named relative to "
                             f"overrides/ and stay inside it")


@dataclass(frozen=True)
class MatrixFile:
    grid: str
    cells: dict[str, CellEntry]
    base: str | None = None
    seeds: tuple[int, ...] = (0,)
    tier: str = "8gpu"

    def __post_init__(self) -> None:
        # Grid and cell names become directory and file names (runs/<grid>/<cell>__s..,
        # results/raw/<grid>.jsonl): nothing may climb out of its folder.
        if (why := name_problem(self.grid)) is not None:
            raise FieldError("grid", why)
        if not self.cells:
            raise FieldError("cells", "must name at least one cell, e.g. "
                             "'albef: {overrides: []}'")
        bad = [why for name in self.cells if (why := name_problem(name)) is not None]
        if bad:
            raise FieldError("cells", "; ".join(bad))
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise FieldError("seeds", f"must be a non-empty list of seeds >= 0, got "
                             f"{list(self.seeds)}")


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
        from model.config.protocols import load_protocols, validate_downstream

        validate_downstream(cfg, load_protocols(root / PROTOCOLS_NAME))
    return cfg


def grid_layers(matrix: MatrixFile, matrix_path: Path, preset: str,
                sets: Sequence[str]) -> dict[str, Any]:
    """The grid's own layers merged (base.yaml, preset, ``--set``): no cell's overrides."""
    base = matrix_path.parent / matrix.base if matrix.base else None
    merged, _ = merge_layers(experiment_layers(preset=preset, sets=sets, base=base))
    return merged


def _protocol_digests(layers: dict[str, Any], matrix_path: Path) -> dict[str, str]:
    """One digest per downstream protocol the grid's layers list (before any cell's)."""
    names = layers.get("downstream") or []
    if not names:
        return {}
    from model.config.protocols import load_protocols, protocol_digest

    registry = load_protocols(matrix_path.parent / PROTOCOLS_NAME)
    return {n: protocol_digest(registry, n) for n in registry.resolve_order(names)}


def _world_size(tier: str, cache: dict[str, int]) -> int:
    """The tier's ranks (nodes x tasks per node); 1 for a tier that does not load, which the
    plan's tier check reports (ablations/run_grid.py check_tiers) with every other problem."""
    if tier not in cache:
        from slurm.resources import load_tier

        try:
            cache[tier] = load_tier(tier).world_size
        except ConfigError:
            cache[tier] = 1
    return cache[tier]


def expand(matrix_path: str | Path = MATRIX_FILE, preset: str = "tiny",
           seeds: Sequence[int] | None = None, only: Sequence[str] = (),
           sets: Sequence[str] = (), runs_root: str | Path = "runs",
           tier: str | None = None) -> list[RunSpec]:
    """All (cell, seed) runs; every cell's config is resolved and validated first, and all
    errors are reported together (nothing is submitted if any cell is invalid).

    ``tier``: the resource tier of every run (default: the cell's, else the matrix's; ``cpu``
    for the tiny preset). Its world size enters the run hash and the grid's fingerprint, and
    a world size the recipe was not written for is refused unless ``train.lr_scaling`` says
    how (model/config/recipe.py).
    """
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
    tier = tier or DEFAULT_TIERS.get(preset)
    layers = grid_layers(matrix, matrix_path, preset, sets)
    grid_train = _grid_train(layers, matrix_path)
    digests = _protocol_digests(layers, matrix_path) if grid_train is not None else {}
    errors: list[str] = []
    specs: list[RunSpec] = []
    worlds: dict[str, int] = {}
    for name in names:
        cell_tier = tier or matrix.cells[name].tier or matrix.tier
        for seed in seed_list:
            try:
                cfg = _cell_config(matrix, matrix_path, name, preset, seed, sets)
                if grid_train is None:  # the cell's own errors name the bad grid-level key
                    raise ConfigError(f"{matrix_path}: invalid grid-level train settings")
                world = _world_size(cell_tier, worlds)
                launch_for(cfg.train, world)
                grid_launch = launch_for(grid_train, world)
            except ConfigError as exc:
                errors += [f"cell '{name}' seed {seed}: {e}" for e in exc.errors]
                continue
            except ScaleOutError as exc:  # the same for every cell of the tier: said once
                errors.append(f"tier {cell_tier}: {exc}")
                continue
            settings = recipe_settings(layers, preset, grid_launch, digests)
            chash = run_hash(cfg, world)
            run_dir = Path(runs_root) / matrix.grid / f"{name}__s{seed}__{chash}"
            try:  # names are checked above; a symlinked grid folder could still point away
                check_inside(runs_root, run_dir.parent)
            except UnsafePathError as exc:
                errors.append(f"cell '{name}': run directory {exc}")
                continue
            specs.append(RunSpec(matrix.grid, name, seed, cfg, chash, run_dir, cell_tier,
                                 preset, (matrix_path.parent / PROTOCOLS_NAME).resolve(),
                                 world_size=world, fingerprint=fingerprint(settings),
                                 recipe=settings))
    if errors:
        raise ConfigError(sorted(set(errors)))
    return specs


def _grid_train(layers: dict[str, Any], matrix_path: Path) -> TrainConfig | None:
    """The grid-level ``train`` section (what the launch shape of the fingerprint reads);
    None when it is invalid (every cell then reports the key with the layer that set it)."""
    try:
        return from_dict(TrainConfig, layers.get("train") or {},
                         default_origin=f"{matrix_path} (grid-level train settings)")
    except ConfigError:
        return None


def plan_table(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """One row per run with its status on disk (done / failed / running / new)."""
    rows = []
    for s in specs:
        status = run_status(s.run_dir)
        rows.append({"cell": s.cell, "seed": s.seed, "status": "new" if status == "missing"
                     else status, "tier": s.tier, "config_hash": s.config_hash,
                     "run_dir": str(s.run_dir)})
    return pd.DataFrame(rows)


def launch_table(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """Per tier and grid recipe: world size, per-GPU batch, global batch and learning rate
    (model/config/recipe.py), so a scale-out is seen before anything is submitted."""
    rows = {}
    for s in specs:
        launch = launch_for(s.config.train, s.world_size)
        rows.setdefault((s.tier, s.fingerprint, launch), {
            "tier": s.tier, "world size": launch.world_size,
            "per-GPU batch": launch.per_gpu_batch, "global batch": launch.global_batch,
            "lr": f"{launch.lr:g}", "effective lr": f"{launch.lr_effective:g}",
            "rule": (f"train.lr_scaling={launch.lr_scaling}" if launch.changes_recipe
                     else f"recipe ({launch.recipe_world_size} rank(s))"),
            "recipe": s.fingerprint, "runs": 0})["runs"] += 1
    return pd.DataFrame(list(rows.values()))


def grid_plan(specs: Sequence[RunSpec]) -> Plan:
    """The recipe most planned runs share and those runs (what the tables are built for)."""
    counts = Counter(s.fingerprint for s in specs)
    fp = max(counts, key=lambda f: (counts[f], f))
    mine = [s for s in specs if s.fingerprint == fp]
    return Plan(fp, dict(mine[0].recipe), frozenset(s.run_id for s in mine))


def show_configs(specs: Sequence[RunSpec], cell: str | None,
                 pair: Sequence[str] | None) -> int:
    """Print one cell's resolved config, or the keys two cells' configs differ in; 2 when a
    cell is not in the plan."""
    configs = {s.cell: s.config for s in specs}
    wanted = [c for c in ([cell] if cell else []) + list(pair or [])]
    unknown = [c for c in wanted if c not in configs]
    if unknown:
        print(f"error: cell(s) {unknown} not in the plan; cells: {sorted(configs)}",
              file=sys.stderr)
        return 2
    if cell:
        print(f"# {cell}: resolved config (schema defaults <- base <- preset <- overrides "
              f"<- set <- --set)")
        print(yaml.safe_dump(to_dict(configs[cell]), sort_keys=False), end="")
    if pair:
        a, b = (flatten(to_dict(configs[c])) for c in pair)
        diff = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        print(f"# {pair[0]} vs {pair[1]}: {len(diff)} key(s) differ")
        print("\n".join(diff))
    return 0
