"""Which runs may share a table: one grid recipe (fingerprint) per table, the rest excluded.

Every run carries its grid's fingerprint and recipe settings (model/config/recipe.py): the
preset, base.yaml and ``--set`` values, data, launch shape and downstream protocols that all
cells of a grid share. Δ, significance and "best" are only meaningful between runs of one
recipe, so a table is built for one fingerprint (:func:`choose_fingerprint`) and the runs of
any other are listed under it with the settings that differ (:func:`split_by_recipe`). Runs
written before fingerprints were recorded have the fingerprint "" ("recipe not recorded").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd

from model.config.recipe import differences
from results.collect import recipe_json, recipe_settings_of

UNKNOWN = ""


@dataclass(frozen=True)
class Plan:
    """What a grid invocation planned: its recipe and the run ids it planned. A planned run's
    rows take this recipe even when another grid trained the same run first (same run id =
    same computation), and so do rows written before recipes were recorded."""

    fingerprint: str
    recipe: dict[str, Any]
    run_ids: frozenset[str]


def adopt_plan(frame: pd.DataFrame, plan: Plan | None) -> pd.DataFrame:
    """``frame`` with the plan's fingerprint and recipe on the rows of its planned runs."""
    if plan is None or frame.empty:
        return frame
    frame = frame.copy()
    mine = frame["run_id"].isin(plan.run_ids)
    frame.loc[mine, "fingerprint"] = plan.fingerprint
    frame.loc[mine, "recipe"] = recipe_json(plan.recipe)
    return frame


@dataclass(frozen=True)
class Excluded:
    """A run left out of a table because its grid recipe is another one."""

    cell: str
    seed: int
    run_id: str
    fingerprint: str
    why: tuple[str, ...]  # "train.max_steps 40 vs 750" (this run's value vs the table's)

    def describe(self) -> str:
        what = "; ".join(self.why) if self.why else "recipe not recorded"
        name = self.fingerprint or "no fingerprint"
        return f"{self.cell} s{self.seed} ({self.run_id}, recipe {name}): {what}"


def _runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per existing run (no missing placeholders)."""
    runs = frame[frame["status"] != "missing"]
    return runs.drop_duplicates("run_id")


def recipes_in(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Fingerprint -> recipe settings of every run in ``frame``."""
    out: dict[str, dict[str, Any]] = {}
    for fp, text in zip(_runs(frame)["fingerprint"].fillna(UNKNOWN),
                        _runs(frame)["recipe"].fillna(""), strict=True):
        if fp not in out or (not out[fp] and text):
            out[str(fp)] = recipe_settings_of(text)
    return out


def choose_fingerprint(frame: pd.DataFrame, reference: str | None,
                       preferred: str | None = None) -> str | None:
    """The recipe a table shows: ``preferred`` (a grid's own plan) when given, else the one of
    the reference cell's finished runs (the most frequent, ties to the newest), else the
    most frequent among all finished runs; None when nothing finished."""
    if preferred is not None:
        return preferred
    runs = _runs(frame)
    done = runs[runs["status"] == "done"]
    pool = done[done["cell"] == reference] if reference is not None else done
    if pool.empty:
        pool = done
    if pool.empty:
        pool = runs
    if pool.empty:
        return None
    counts = Counter(pool["fingerprint"].fillna(UNKNOWN))
    overall = Counter(runs["fingerprint"].fillna(UNKNOWN))
    # Most runs of the reference cell, then most runs in all, then the newest run.
    tied = pool.assign(fp=pool["fingerprint"].fillna(UNKNOWN))
    tied = tied.assign(rank_a=tied["fp"].map(counts), rank_b=tied["fp"].map(overall))
    best = tied.sort_values(["rank_a", "rank_b", "created"], na_position="first").iloc[-1]
    return str(best["fp"])


def split_by_recipe(frame: pd.DataFrame, fingerprint: str | None
                    ) -> tuple[pd.DataFrame, list[Excluded]]:
    """(the rows of ``fingerprint``'s runs plus missing placeholders, the other runs)."""
    if fingerprint is None:
        return frame, []
    fps = frame["fingerprint"].fillna(UNKNOWN)
    keep = (frame["status"] == "missing") | (fps == fingerprint)
    ours = recipes_in(frame).get(fingerprint, {})
    excluded = []
    for row in _runs(frame[~keep]).itertuples():
        theirs = recipe_settings_of(row.recipe)
        why = tuple(differences(theirs, ours)) if theirs and ours else ()
        excluded.append(Excluded(row.cell, int(row.seed), str(row.run_id),
                                 str(row.fingerprint or UNKNOWN), why))
    excluded.sort(key=lambda e: (e.cell, e.seed, e.run_id))
    return frame[keep], excluded


def describe_recipe(settings: dict[str, Any], fingerprint: str | None,
                    steps: list[int] | None = None, preset: str | None = None) -> str:
    """Preset, steps, data and launch shape of a recipe, for captions (``preset``: the runs'
    own, for runs whose recipe was not recorded)."""
    parts = [f"preset {settings.get('preset') or preset or 'unknown'}"]
    if steps:
        parts.append(f"{min(steps)} steps" if min(steps) == max(steps)
                     else f"{min(steps)}-{max(steps)} steps")
    if fingerprint is None:
        return ", ".join(parts + ["no finished run"])
    if not settings:
        return ", ".join(parts + ["recipe not recorded (runs written before recipe "
                                  "fingerprints)"])
    if not steps and settings.get("train.max_steps") is not None:
        parts.append(f"at most {settings['train.max_steps']} steps")
    parts.append(_data_text(settings))
    parts.append(f"{settings.get('launch.world_size', '?')} x "
                 f"{settings.get('launch.per_gpu_batch', '?')} = global batch "
                 f"{settings.get('launch.global_batch', '?')}")
    return ", ".join(parts) + f" (recipe {fingerprint})"


def _data_text(settings: dict[str, Any]) -> str:
    if settings.get("data.kind") == "synthetic":
        n_train = settings.get("data.synthetic.n_train_images", 4000)
        n_test = settings.get("data.synthetic.n_test_images", 500)
        return (f"data synthetic ({n_train} train / {n_test} test images, "
                f"generator seed {settings.get('data.synthetic.seed', 0)})")
    files = settings.get("data.train_files") or ["coco.json"]
    if settings.get("data.format") == "shards":
        return f"data shards {settings.get('data.shards.index', '')}"
    return "data " + ", ".join(str(f) for f in files)
