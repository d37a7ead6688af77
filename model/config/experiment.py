"""Load an ``ExperimentConfig`` from layers: schema defaults -> base file -> preset -> override
files -> inline ``set`` mappings -> ``--set`` items (each later layer wins)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model.config.loader import (
    ConfigError,
    config_hash,
    from_dict,
    load_yaml_file,
    merge_layers,
    parse_dotlist,
    unflatten,
)
from model.config.presets import preset_layer
from model.config.schema import ExperimentConfig, ShardDataConfig

# Settings that change where or how fast a run goes, not what it computes; and the scale-out
# rule, whose effect (world size, effective learning rate) enters the run hash itself
# (model/config/recipe.py run_hash).
HASH_EXCLUDE = ("data.num_workers", "data.cache_dir", "train.log_every", "train.checkpoint_every",
                "train.dist_timeout_min", "train.blowup_factor", "model.allow_download",
                "train.log_to", "train.recipe_world_size", "train.lr_scaling",
                "data.shards.allow_pipe", "train.activation_checkpointing", "train.zero")


def load_experiment(
    files: Sequence[str | Path] = (),
    preset: str | None = None,
    sets: Sequence[str] = (),
    inline: Sequence[tuple[str, Mapping[str, Any]]] = (),
    base: str | Path | None = None,
) -> ExperimentConfig:
    """Resolve and validate a config; every error names the file (or layer) that set the key.

    Args:
        files: override YAML files, applied in order after the preset.
        preset: ``tiny`` or ``base`` (see model/config/presets.py).
        sets: ``key=value`` items (CLI ``--set``), applied last.
        inline: (source name, mapping with dotted or nested keys), e.g. a matrix cell's ``set:``.
        base: a base YAML applied before the preset.
    """
    merged, origins = merge_layers(experiment_layers(files, preset, sets, inline, base))
    return build_experiment(merged, origins)


def build_experiment(merged: Mapping[str, Any], origins: Mapping[str, str]) -> ExperimentConfig:
    """The typed config of merged layers; a retired key at the value every run had is dropped
    (old run folders and checkpoints still load), any other value of it is an error."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in merged.items()}
    errors = []
    for dotted, value in RETIRED.items():
        section, leaf = dotted.split(".")
        node = merged.get(section)
        if isinstance(node, dict) and leaf in node:
            if node.pop(leaf) != value:
                errors.append(f"{origins.get(dotted, 'config')}: '{dotted}' is retired (only "
                              f"{value!r} was ever implemented); remove it")
    if errors:
        raise ConfigError(errors)
    return from_dict(ExperimentConfig, merged, origins)


def experiment_layers(
    files: Sequence[str | Path] = (),
    preset: str | None = None,
    sets: Sequence[str] = (),
    inline: Sequence[tuple[str, Mapping[str, Any]]] = (),
    base: str | Path | None = None,
) -> list[tuple[str, Mapping[str, Any]]]:
    """The ``(source, mapping)`` layers :func:`load_experiment` merges, in order (without the
    override files and inline values: a grid's own layers, model/config/recipe.py)."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if base is not None:
        layers.append((str(base), load_yaml_file(base)))
    if preset is not None:
        try:
            layers.append((f"preset '{preset}'", preset_layer(preset)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    layers += [(str(f), load_yaml_file(f)) for f in files]
    layers += [(name, unflatten(dict(m), name)) for name, m in inline]
    if sets:
        layers.append(("--set", parse_dotlist(sets)))
    return layers


# Keys removed from the schema, with the only value runs ever had: hashed as before, so that
# removing dead config renames no run directory (build_experiment drops them when read).
RETIRED: dict[str, object] = {"softmask.normalize": "minmax"}

# Knobs added after runs existed, left out of the identity while they hold the value every
# earlier run computed with, so that adding a knob does not rename every run directory.
OMIT_IF_DEFAULT: dict[str, object] = {"train.grad_clip": None, "eval.rerank": "batched",
                                      "data.format": "json", "data.shards": ShardDataConfig(),
                                      # not bit-exact (fused kernels round differently;
                                      # inductor draws its own dropout masks): part of the
                                      # identity when on
                                      "train.optimizer_impl": "default", "train.compile": False,
                                      "loss.itm_label_smoothing": 0.0}


def _identity_exclude(cfg: ExperimentConfig) -> tuple[str, ...]:
    omitted = []
    for dotted, default in OMIT_IF_DEFAULT.items():
        node: object = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if node == default:
            omitted.append(dotted)
    return (*HASH_EXCLUDE, *omitted)


def experiment_hash(cfg: ExperimentConfig) -> str:
    """Identity of what a run computes (10 hex chars); excludes speed/logging knobs."""
    return config_hash(cfg, exclude=_identity_exclude(cfg), retired=RETIRED)


def recipe_hash(cfg: ExperimentConfig) -> str:
    """:func:`experiment_hash` without the seed: equal for the seeds of one table row, so that
    averaging seeds of different recipes (a partial rerun after a config change) is caught."""
    return config_hash(cfg, exclude=(*_identity_exclude(cfg), "train.seed"), retired=RETIRED)
