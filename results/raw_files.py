"""Where the raw summary of one grid recipe goes, so that a merge can never mix two recipes.

``results/raw/<grid>.jsonl`` holds the grid's recipe (the fingerprint of its reference cell's
rows). Runs of another recipe (a ``--set train.max_steps=40`` partial grid, another preset's
data, another world size) go to ``<grid>--<what differs>.jsonl`` and their tables to
``<out>/<grid>--<what differs>/``, found again by fingerprint on the next run; ``replace``
(``--replace``) merges them into the grid's file instead, cell by cell, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config.recipe import differences, slug
from results.raw_format import read_raw_file
from results.recipes import UNKNOWN, Plan, adopt_plan, choose_fingerprint, recipes_in

logger = logging.getLogger("results")


@dataclass
class Destination:
    """A raw summary path, the variant folder name when it is not the grid's own file, and
    what to tell the user about the choice."""

    path: Path
    variant: str | None = None
    replaced: str | None = None  # the fingerprint of the rows an explicit replace overrides
    differs: list[str] = field(default_factory=list)

    def announce(self, fingerprint: str | None) -> None:
        """Say on stderr where a recipe's rows went and why."""
        name = fingerprint or "without a recorded recipe"
        what = "; ".join(self.differs) or "recipe not recorded"
        if self.variant is not None:
            logger.warning("recipe %s differs from the grid's raw summary (%s): wrote %s and "
                           "the tables in the folder %s; --replace merges it into the grid's "
                           "file instead", name, what, self.path, self.variant)
        elif self.replaced is not None:
            logger.warning("--replace: runs of recipe %s replace the rows of their cells and "
                           "seeds in %s, whose other rows are recipe %s (%s); its tables show "
                           "one recipe and list the others as excluded", name, self.path,
                           self.replaced or "without a recorded recipe", what)


def _file_recipe(path: Path, reference: str, plan: Plan | None,
                 skip_bad: bool) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The recipe a raw summary holds (its reference cell's) and every recipe in it."""
    frame, _ = read_raw_file(path, skip_bad)
    frame = adopt_plan(frame, plan)
    return choose_fingerprint(frame, reference), recipes_in(frame)


def raw_destination(raw_dir: Path, grid: str, fingerprint: str | None,
                    settings: dict[str, Any], reference: str, *, replace: bool = False,
                    plan: Plan | None = None, skip_bad: bool = False) -> Destination:
    """Where the rows of ``fingerprint`` merge: the grid's file if it does not exist yet,
    holds this recipe, or ``replace``; else the variant file that holds it; else a new
    variant named after the settings that differ from the grid file's recipe."""
    main = Path(raw_dir) / f"{grid}.jsonl"
    if not main.is_file():
        return Destination(main)
    held, recipes = _file_recipe(main, reference, plan, skip_bad)
    fp = fingerprint if fingerprint is not None else UNKNOWN
    if held is None or held == fp:
        return Destination(main)
    theirs = recipes.get(held, {})
    differs = differences(settings, theirs) if settings and theirs else []
    if replace:
        return Destination(main, replaced=held, differs=differs)
    for path in sorted(Path(raw_dir).glob(f"{grid}--*.jsonl")):
        if fp in _file_recipe(path, reference, None, skip_bad)[1]:
            return Destination(path, path.stem, differs=differs)
    name = f"{grid}--{slug(settings, theirs, fp or 'unrecorded')}"
    return Destination(Path(raw_dir) / f"{name}.jsonl", name, differs=differs)
