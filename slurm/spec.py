"""The unit the launchers run: one (cell, seed) of a grid with its validated config.

Its home is here, below everything that uses it: the matrix expansion (ablations/grid.py)
creates it, the launcher, the job and the status view (slurm/) consume it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config.schema import ExperimentConfig


@dataclass(frozen=True)
class RunSpec:
    """Everything a job needs; small and picklable (submitit pickles one per array task)."""

    grid: str
    cell: str
    seed: int
    config: ExperimentConfig
    config_hash: str
    run_dir: Path
    tier: str
    preset: str
    # The protocols file naming config.downstream's stages (the grid's, beside its matrix).
    protocols_file: Path | None = None
    # Ranks the run trains with (the tier's nodes x tasks per node); part of the run hash.
    world_size: int = 1
    # The grid's recipe (model/config/recipe.py): what every run of the grid shares.
    fingerprint: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def identity(self) -> dict[str, Any]:
        return {"grid": self.grid, "cell": self.cell, "seed": self.seed, "tier": self.tier,
                "run_id": self.run_id, "preset": self.preset, "world_size": self.world_size,
                "fingerprint": self.fingerprint, "recipe": self.recipe}
