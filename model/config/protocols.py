"""The paper's downstream protocols (``ablations/protocols.yaml``) and the stage configs they
produce: retrieval fine-tuning, zero-shot evaluation and task stages.

Each protocol names the stage it starts ``from``, whether it trains, its override files, the
data set and split it evaluates, and the paper's numbers. A stage's config is derived, never
written by hand:

    config of the ``from`` stage (the cell's config for ``pretrain``)
    + the protocol's override files (+ its ``synthetic`` layers when ``data.kind = synthetic``)
    + caller ``sets`` + ``train.init_from`` = the ``from`` stage's checkpoint, ``downstream = ()``

Evaluating a checkpoint under a protocol: model/evaluation/checkpoint.py (``model.cli.evaluate``
is its CLI). The stages of a cell are run by ``model.cell.stages.run_downstream``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from model.config.experiment import build_experiment
from model.config.loader import (
    ConfigError,
    from_dict,
    load_yaml_file,
    merge_layers,
    parse_dotlist,
    to_dict,
)
from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig

log = logging.getLogger(__name__)

PRETRAIN = "pretrain"
RECALL_KEYS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")
_ENTRY_KEYS = {"description", "from", "train", "overrides", "synthetic", "dataset", "split",
               "task", "task_synthetic"}
# Metric names of the task protocols' paper rows (model/downstream: SNLI-VE val/test, NLVR2
# dev/test-P, VQA test-dev/test-std).
TASK_METRIC_KEYS = ("val", "test", "dev", "test-P", "test-dev", "test-std")
_REQUIRED_KEYS = {"from", "train", "overrides", "dataset"}


# ---------------------------------------------------------------------------------------------
# The registry (ablations/protocols.yaml)


@dataclass(frozen=True)
class Protocol:
    """One entry of protocols.yaml (override paths resolved against the file's directory)."""

    name: str
    source: str  # "pretrain" or another protocol's name (the YAML key ``from``)
    train: bool
    overrides: tuple[Path, ...]
    synthetic: tuple[Path, ...]
    dataset: str
    description: str = ""
    split_name: str = ""
    split_images: int | None = None
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Downstream task stages (SNLI-VE, NLVR2, VQA): the ``task:`` block, and the layer merged
    # over it when data.kind = synthetic. None for retrieval protocols.
    task: Mapping[str, Any] | None = None
    task_synthetic: Mapping[str, Any] = field(default_factory=dict)

    def task_config(self, synthetic: bool) -> TaskConfig:
        """The typed task settings (with the synthetic layer when asked)."""
        if self.task is None:
            raise ConfigError(f"protocol {self.name!r} is not a task protocol")
        layers = [(f"protocols.{self.name}.task", self.task)]
        if synthetic:
            layers.append((f"protocols.{self.name}.task_synthetic", self.task_synthetic))
        merged, origins = merge_layers(layers)
        return from_dict(TaskConfig, merged, origins)


@dataclass(frozen=True)
class ProtocolRegistry:
    path: Path
    protocols: dict[str, Protocol]
    paper_source: str = ""

    def get(self, name: str) -> Protocol:
        if name not in self.protocols:
            raise ConfigError(f"unknown protocol {name!r}; protocols in {self.path}: "
                              f"{sorted(self.protocols)}")
        return self.protocols[name]

    def chain(self, name: str) -> list[str]:
        """``name`` and the protocols it starts from, the first stage first (no ``pretrain``)."""
        out: list[str] = []
        current = name
        while current != PRETRAIN:
            if current in out:
                raise ConfigError(f"{self.path}: protocols form a cycle: "
                                  f"{' <- '.join([*out, current])}")
            out.append(current)
            current = self.get(current).source
        return out[::-1]

    def resolve_order(self, names: Sequence[str]) -> list[str]:
        """The requested protocols with the ones they start from, dependencies first, each once.

        A protocol whose ``from`` stage was not requested gets it added (logged)."""
        order: list[str] = []
        for name in names:
            for dep in self.chain(name):
                if dep not in order:
                    if dep not in names:
                        log.info("protocol %s starts from %s: running %s first", name, dep, dep)
                    order.append(dep)
        return order

    def expected_model(self, name: str) -> tuple[str, str | None]:
        """What a protocol evaluates: ("pretrained", None) or ("fine-tuned", data set)."""
        p = self.get(name)
        if p.train:
            return "fine-tuned", p.dataset
        if p.source == PRETRAIN:
            return "pretrained", None
        return self.expected_model(p.source)

    def stage_label(self, name: str) -> str:
        """The training stage of the model a protocol reports, e.g. 'fine-tuned on coco'."""
        stage, data = self.expected_model(name)
        return stage if data is None else f"{stage} on {data}"


def _as_paths(root: Path, value: Any, where: str, errors: list[str]) -> tuple[Path, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{where}: expected a list of override file names, got {value!r}")
        return ()
    paths = tuple(root / v for v in value)
    errors += [f"{where}: file not found: {p}" for p in paths if not p.is_file()]
    return paths


def _paper_rows(value: Any, where: str, errors: list[str]) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(f"{where}: expected a mapping of model name -> recalls, got {value!r}")
        return {}
    rows: dict[str, dict[str, float]] = {}
    for model, recalls in value.items():
        keys = (*RECALL_KEYS, *TASK_METRIC_KEYS)
        if not isinstance(recalls, Mapping) or set(recalls) - set(keys) or not all(
                isinstance(v, int | float) for v in recalls.values()):
            errors.append(f"{where}.{model}: expected numbers for keys among {keys}, "
                          f"got {recalls!r}")
            continue
        rows[str(model)] = {k: float(recalls[k]) for k in keys if k in recalls}
    return rows


def _task_blocks(entry: Mapping[str, Any], where: str, errors: list[str]
                 ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any]]:
    """The ``task`` / ``task_synthetic`` blocks, validated as TaskConfig both ways now."""
    task, extra = entry.get("task"), entry.get("task_synthetic") or {}
    if task is None:
        if extra:
            errors.append(f"{where}.task_synthetic: only allowed with a task block")
        return None, {}
    if not isinstance(task, Mapping) or not isinstance(extra, Mapping):
        errors.append(f"{where}.task: expected a mapping (name: ve | nlvr | vqa, files, ...)")
        return None, {}
    for layers in ([(f"{where}.task", task)],
                   [(f"{where}.task", task), (f"{where}.task_synthetic", extra)]):
        merged, origins = merge_layers(layers)
        try:
            from_dict(TaskConfig, merged, origins)
        except ConfigError as err:
            errors.append(str(err))
            return None, {}
    if entry.get("from") != PRETRAIN or entry.get("train") is not True:
        errors.append(f"{where}: a task protocol fine-tunes the pre-trained model: it needs "
                      f"from: {PRETRAIN} and train: true")
    return task, extra


def _parse_entry(path: Path, name: str, entry: Any, errors: list[str]) -> Protocol | None:
    where = f"{path}: protocols.{name}"
    if name == PRETRAIN:
        errors.append(f"{where}: '{PRETRAIN}' is reserved for the pre-training stage")
        return None
    if not isinstance(entry, Mapping):
        errors.append(f"{where}: expected a mapping, got {entry!r}")
        return None
    unknown, missing = set(entry) - _ENTRY_KEYS, _REQUIRED_KEYS - set(entry)
    if unknown:
        errors.append(f"{where}: unknown keys {sorted(unknown)} (valid: {sorted(_ENTRY_KEYS)})")
    if missing:
        errors.append(f"{where}: missing keys {sorted(missing)}")
        return None
    if not isinstance(entry["train"], bool):
        errors.append(f"{where}.train: expected true or false, got {entry['train']!r}")
    split = entry.get("split") or {}
    if not isinstance(split, Mapping) or set(split) - {"name", "images"}:
        errors.append(f"{where}.split: expected {{name: ..., images: N}}, got {split!r}")
        split = {}
    task, task_synthetic = _task_blocks(entry, where, errors)
    return Protocol(
        name=name, source=str(entry["from"]), train=bool(entry["train"]),
        task=task, task_synthetic=task_synthetic,
        overrides=_as_paths(path.parent, entry["overrides"], f"{where}.overrides", errors),
        synthetic=_as_paths(path.parent, entry.get("synthetic"), f"{where}.synthetic", errors),
        dataset=str(entry["dataset"]), description=str(entry.get("description") or ""),
        split_name=str(split.get("name") or ""), split_images=split.get("images"))


def load_protocols(path: str | Path, paper_file: str | Path | None = None) -> ProtocolRegistry:
    """Read and strictly validate a protocols file (the grid's is ablations/protocols.yaml);
    every error names the file and protocol. ``paper_file``: the file of the paper's numbers
    (the project's is results/paper_numbers.yaml), whose ``protocols`` section gives each
    protocol's quoted rows and ``protocols_source`` their source; without it the rows are empty.
    """
    path = Path(path)
    data = load_yaml_file(path)
    errors: list[str] = []
    unknown_top = set(data) - {"protocols"}
    if unknown_top:
        errors.append(f"{path}: unknown top-level keys {sorted(unknown_top)} "
                      "(expected: protocols; the paper's numbers live in the paper file)")
    entries = data.get("protocols")
    if not isinstance(entries, Mapping) or not entries:
        raise ConfigError([*errors, f"{path}: 'protocols' must be a non-empty mapping"])
    protocols: dict[str, Protocol] = {}
    for name, entry in entries.items():
        parsed = _parse_entry(path, str(name), entry, errors)
        if parsed is not None:
            protocols[parsed.name] = parsed
    for p in protocols.values():
        if p.source != PRETRAIN and p.source not in protocols:
            errors.append(f"{path}: protocols.{p.name}.from: unknown stage {p.source!r} "
                          f"(expected '{PRETRAIN}' or one of {sorted(protocols)})")
    source = _add_paper_rows(protocols, paper_file, errors) if paper_file is not None else ""
    if errors:
        raise ConfigError(errors)
    registry = ProtocolRegistry(path, protocols, source)
    for name in protocols:
        registry.chain(name)  # raises on cycles
    return registry


def _add_paper_rows(protocols: dict[str, Protocol], paper_file: str | Path,
                    errors: list[str]) -> str:
    """Fill each protocol's ``paper`` rows from the paper file; returns their source."""
    paper_file = Path(paper_file)
    data = load_yaml_file(paper_file)
    section = data.get("protocols") or {}
    if not isinstance(section, Mapping):
        errors.append(f"{paper_file}: protocols: expected a mapping of protocol -> rows")
        return ""
    for name, rows in section.items():
        parsed = _paper_rows(rows, f"{paper_file}: protocols.{name}", errors)
        # Rows of a protocol this file does not define are skipped: a user's own protocols
        # file may hold a subset (tests/config/test_protocols.py checks the project's two files
        # agree).
        if name in protocols:
            protocols[name] = replace(protocols[name], paper=parsed)
    return " ".join(str(data.get("protocols_source") or "").split())


# ---------------------------------------------------------------------------------------------
# Stage configs


def _protocol_layers(registry: ProtocolRegistry, name: str, synthetic: bool
                     ) -> list[tuple[str, Mapping[str, Any]]]:
    layers: list[tuple[str, Mapping[str, Any]]] = []
    for stage in registry.chain(name):
        p = registry.get(stage)
        layers += [(str(f), load_yaml_file(f)) for f in p.overrides]
        if synthetic:
            layers += [(f"{f} (data.kind = synthetic)", load_yaml_file(f)) for f in p.synthetic]
    return layers


def protocol_digest(registry: ProtocolRegistry, name: str) -> str:
    """What protocol ``name``'s stage does to a cell, as 10 hex characters: the override
    layers (real and synthetic) and task blocks of every stage on its chain. Part of a grid's
    fingerprint (model/config/recipe.py); the cell's own config is not in it."""
    chain = []
    for stage in registry.chain(name):
        p = registry.get(stage)
        chain.append({"name": stage, "train": p.train,
                      "overrides": [load_yaml_file(f) for f in p.overrides],
                      "synthetic": [load_yaml_file(f) for f in p.synthetic],
                      "task": p.task, "task_synthetic": p.task_synthetic})
    text = json.dumps(chain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def stage_config(cfg: ExperimentConfig, name: str, init_from: str | Path | None,
                 registry: ProtocolRegistry, sets: Sequence[str] = (),
                 source: str = "cell config", synthetic: bool | None = None
                 ) -> ExperimentConfig:
    """The config of protocol ``name``'s stage derived from a cell's (pre-training) config.

    Layers: ``cfg``, then the override files of every protocol on the chain from ``pretrain`` to
    ``name`` (with their ``synthetic`` layers when the result has ``data.kind = synthetic``, or
    as ``synthetic`` forces), then ``sets`` (``key=value``), then
    ``train.init_from = init_from`` (when given) and ``downstream = ()``. The stage always
    reads ALBEF JSON files (``data.format = json``).
    """
    registry.get(name)
    user = [("--set", parse_dotlist(sets))] if sets else []
    cell = to_dict(cfg)
    # Stages read caption or task files: a cell pre-trained from shards hands on its weights,
    # not its data format.
    cell["data"].pop("shards", None)
    cell["data"]["format"] = "json"
    base = [(source, cell)]
    if synthetic is None:
        merged, _ = merge_layers([*base, *_protocol_layers(registry, name, False), *user])
        synthetic = (merged.get("data") or {}).get("kind") == "synthetic"
    last = {"downstream": []}
    if init_from is not None:
        last["train"] = {"init_from": str(init_from)}
    layers = [*base, *_protocol_layers(registry, name, synthetic), *user,
              (f"protocol '{name}'", last)]
    merged, origins = merge_layers(layers)
    return build_experiment(merged, origins)


def validate_downstream(cfg: ExperimentConfig, registry: ProtocolRegistry
                        ) -> dict[str, ExperimentConfig]:
    """Resolve every stage config of ``cfg.downstream`` now (before hours of pre-training):
    unknown protocols, missing override files and invalid stage configs raise ConfigError."""
    stages = {name: stage_config(cfg, name, f"<{registry.get(name).source} checkpoint>", registry)
              for name in registry.resolve_order(cfg.downstream)}
    for name, stage in stages.items():
        p = registry.get(name)
        if p.task is not None and stage.data.kind != "synthetic":
            _check_task_files(name, p.task_config(False))
    return stages


def _check_task_files(name: str, task: TaskConfig) -> None:
    """Real-data task protocols: every file they name must exist before anything is submitted."""
    named = [("train_files", f) for f in task.train_files] + [
        (key, getattr(task, key)) for key in ("val_file", "test_file", "image_root", "vg_root",
                                              "answer_list") if getattr(task, key)]
    missing = [f"protocols.{name}.task.{key}: {path} does not exist" for key, path in named
               if not Path(path).exists()]
    if missing:
        raise ConfigError([*missing, "convert the official annotations first (docs/DATA.md, "
                                     "python -m model.cli.prepare) or fix the paths"])


def eval_image_size(cfg: ExperimentConfig) -> int:
    return cfg.eval.image_size or cfg.model.vision.image_size
