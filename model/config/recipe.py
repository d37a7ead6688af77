"""A grid's recipe: what every run of a grid shares, and how a run may scale out.

Two numbers identify a run's numbers:

* its **run hash** (the run directory's name): everything the run computes, i.e. its resolved
  config (:func:`model.config.experiment.experiment_hash`) and, when it differs from one process
  at the configured learning rate, its world size and effective learning rate;
* its grid's **fingerprint**: everything that is *not* the cell's own switches — the
  grid-level layers (``base.yaml``, the preset, ``--set`` values, the data spec, steps and
  evaluation settings they hold), the launch shape (world size, per-GPU batch, global batch,
  effective learning rate) and the downstream protocols' recipes. Rows of an ablation table are
  comparable only when their fingerprints are equal (results/tables.py).

Scale-out: in ALBEF the per-GPU batch is part of the objective (ITC's in-batch negatives and
ITM's hard negatives are drawn inside a rank's batch), and the learning rate was set for a
global batch of ``batch_size x recipe_world_size`` (8 x 64 = 512). A launch whose world size
differs from ``train.recipe_world_size`` changes the recipe; it is refused unless
``train.lr_scaling`` names the rule: ``none`` (same learning rate, larger or smaller global
batch) or ``linear`` (every learning rate of the schedule times global / recipe global batch,
the rule ALBEF's authors give for 16 GPUs: 2e-4).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from model.config.experiment import HASH_EXCLUDE, experiment_hash
from model.config.loader import to_dict
from model.config.schema import ExperimentConfig, TrainConfig

# Keys of a grid's layers that describe where or how fast runs go (not what they compute), the
# scale-out rule (its effect is in the launch.* settings) and the per-run seed: none of them
# enters the fingerprint.
FINGERPRINT_EXCLUDE = (*HASH_EXCLUDE, "train.seed")
LAUNCH_KEYS = ("launch.world_size", "launch.per_gpu_batch", "launch.global_batch",
               "launch.lr_effective")
_SLUG_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


class ScaleOutError(ValueError):
    """A launch that would change the recipe's global batch without a stated rule."""


@dataclass(frozen=True)
class Launch:
    """The shape a run trains with: ranks, batch per rank, and the learning-rate rule."""

    world_size: int
    per_gpu_batch: int
    recipe_world_size: int
    lr_scaling: str
    lr: float

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * self.world_size

    @property
    def recipe_global_batch(self) -> int:
        return self.per_gpu_batch * self.recipe_world_size

    @property
    def lr_factor(self) -> float:
        """Factor on every learning rate of the schedule (1 unless ``linear`` scaling)."""
        if self.lr_scaling == "linear":
            return self.global_batch / self.recipe_global_batch
        return 1.0

    @property
    def lr_effective(self) -> float:
        return self.lr * self.lr_factor

    @property
    def changes_recipe(self) -> bool:
        return self.world_size != self.recipe_world_size

    def describe(self) -> str:
        """One line, e.g. ``16 x 64 = global batch 1024 (recipe 8 x 64 = 512), lr 0.0001 ->
        0.0002 (train.lr_scaling=linear)``."""
        text = f"{self.world_size} x {self.per_gpu_batch} = global batch {self.global_batch}"
        if self.changes_recipe:
            text += (f" (recipe {self.recipe_world_size} x {self.per_gpu_batch} = "
                     f"{self.recipe_global_batch})")
        lr = f"lr {self.lr:g}"
        if self.lr_effective != self.lr:
            lr += f" -> {self.lr_effective:g}"
        rule = f" (train.lr_scaling={self.lr_scaling})" if self.changes_recipe else ""
        return f"{text}, {lr}{rule}"


def launch_for(train: TrainConfig, world_size: int) -> Launch:
    """The launch shape of ``world_size`` ranks; refused (:class:`ScaleOutError`) when it
    changes the recipe's global batch and ``train.lr_scaling`` states no rule."""
    if world_size < 1:
        raise ScaleOutError(f"world size must be >= 1, got {world_size}")
    launch = Launch(world_size, train.batch_size, train.recipe_world_size, train.lr_scaling,
                    train.lr)
    if launch.changes_recipe and train.lr_scaling == "refuse":
        raise ScaleOutError(
            f"{world_size} rank(s) x train.batch_size={train.batch_size} = global batch "
            f"{launch.global_batch}, but the recipe is train.recipe_world_size="
            f"{train.recipe_world_size} x {train.batch_size} = {launch.recipe_global_batch} "
            f"(the learning rate {train.lr:g} was set for it). Choose a rule: "
            f"--set train.lr_scaling=linear (lr x {launch.global_batch}/"
            f"{launch.recipe_global_batch} = {train.lr * world_size / train.recipe_world_size:g}"
            f"), --set train.lr_scaling=none (same lr, another global batch: a different "
            f"recipe), or a resource tier with {train.recipe_world_size} rank(s)")
    return launch


def scaled_train(train: TrainConfig, launch: Launch) -> TrainConfig:
    """``train`` with every learning rate of the schedule times the launch's factor (the
    warm-up start, the peak and the cosine floor, so the schedule keeps its shape)."""
    k = launch.lr_factor
    if k == 1.0:
        return train
    return replace(train, lr=train.lr * k, min_lr=train.min_lr * k,
                   warmup_lr=train.warmup_lr * k)


def run_hash(cfg: ExperimentConfig, world_size: int) -> str:
    """The run directory's hash: the config hash, with the world size and effective learning
    rate folded in unless the run is one process at the configured learning rate (every run
    made before scale-out was part of the identity, so their directories keep their names)."""
    chash = experiment_hash(cfg)
    launch = Launch(world_size, cfg.train.batch_size, cfg.train.recipe_world_size,
                    cfg.train.lr_scaling, cfg.train.lr)
    if world_size == 1 and launch.lr_effective == cfg.train.lr:
        return chash
    return _digest({"config": chash, "world_size": world_size,
                    "lr_effective": launch.lr_effective})


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = to_dict(value) if not isinstance(value, Mapping) else {}
    return flat


def schema_defaults() -> dict[str, Any]:
    """Every leaf of the schema with its default, dotted."""
    return flatten(to_dict(ExperimentConfig()))


def recipe_settings(grid_layers: Mapping[str, Any], preset: str | None, launch: Launch,
                    protocols: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings a fingerprint is made of, dotted: every grid-level value that differs from
    the schema default (what base.yaml, the preset and ``--set`` say), the preset's name, the
    launch shape, and one hash per downstream protocol stage."""
    defaults = schema_defaults()
    settings: dict[str, Any] = {"preset": preset}
    for key, value in sorted(flatten(grid_layers).items()):
        if key in FINGERPRINT_EXCLUDE or any(key.startswith(k + ".") for k in
                                             FINGERPRINT_EXCLUDE):
            continue
        if key in defaults and defaults[key] == value:
            continue
        settings[key] = value
    settings.update({"launch.world_size": launch.world_size,
                     "launch.per_gpu_batch": launch.per_gpu_batch,
                     "launch.global_batch": launch.global_batch,
                     "launch.lr_effective": launch.lr_effective})
    for name, digest in sorted((protocols or {}).items()):
        settings[f"protocol.{name}"] = digest
    return settings


def fingerprint(settings: Mapping[str, Any]) -> str:
    """10 hex characters naming a recipe (equal settings, equal fingerprint)."""
    return _digest(dict(settings))


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """What differs between two recipes, as ``key ours vs theirs`` (a key one side does not
    set holds the schema default there), sorted by key."""
    defaults = schema_defaults()
    missing = object()
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a = ours.get(key, defaults.get(key, missing))
        b = theirs.get(key, defaults.get(key, missing))
        if a != b:
            out.append(f"{key} {'?' if a is missing else _shown(a)} vs "
                       f"{'?' if b is missing else _shown(b)}")
    return out


def slug(ours: Mapping[str, Any], theirs: Mapping[str, Any], fp: str,
         max_len: int = 60) -> str:
    """A file-name-safe name for ``ours`` told apart from ``theirs``: the differing settings
    (``train.max_steps=40``), or the fingerprint when they do not fit."""
    defaults = schema_defaults()
    parts = []
    for key in sorted(set(ours) | set(theirs)):
        value = ours.get(key, defaults.get(key))
        if value != theirs.get(key, defaults.get(key)) and not key.startswith("launch.lr_eff") \
                and key != "launch.global_batch":
            parts.append(f"{key}={_shown(value)}")
    text = _SLUG_SAFE.sub("_", ",".join(parts))
    return text if text and len(text) <= max_len else f"recipe-{fp}"
