"""The downstream tasks, one module each, registered by the name their protocols use
(``task.name``): ``ve`` (SNLI-VE), ``nlvr`` (NLVR2), ``vqa`` (VQA v2). Adding a task: a module
with a :class:`TaskSpec` subclass, its entry here, and its protocol in ablations/protocols.yaml
(docs/ARCHITECTURE.md "Adding a downstream task")."""

from __future__ import annotations

from typing import Any

from torch import nn

from model.albef import ALBEF
from model.downstream.tasks.base import ClassifyTask, TaskRun, TaskSpec
from model.downstream.tasks.nlvr import NLVR
from model.downstream.tasks.ve import VE
from model.downstream.tasks.vqa import VQA

TASKS: dict[str, TaskSpec] = {t.name: t for t in (VE, NLVR, VQA)}


def task_spec(name: str) -> TaskSpec:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None


# Networks by name, NLVR2's text-assignment network included (tests and tools build them bare).
_NETWORKS = {**{name: spec.model for name, spec in TASKS.items()}, "nlvr_ta": NLVR.ta_model}


def build_task_model(name: str, albef: ALBEF, bert_config: Any) -> nn.Module:
    """The network of task ``name`` (or ``nlvr_ta``) from an ALBEF's modules (deep-copied)."""
    if name not in _NETWORKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(_NETWORKS)}")
    return _NETWORKS[name](albef, bert_config)


__all__ = ["TASKS", "ClassifyTask", "TaskRun", "TaskSpec", "build_task_model", "task_spec"]
