"""Where a task stage's files come from and the loaders over them (generic: what differs per
task, its :class:`~model.downstream.tasks.base.TaskSpec` says).

Real data: the ``task:`` block's files (the converters' outputs, docs/DATA.md). Synthetic data
(``data.kind = synthetic``): the stand-ins generated from the pre-training set's spec, read with
the pre-training tokenizer (the model's vocabulary is the pre-training one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.data.sampling import SeededDataset
from model.data.synthetic_tasks import StandIn, TaskFiles, TaskSizes, generate_task
from model.data.task_data import load_answer_list
from model.data.transforms import build_transform
from model.engine.data import crop_scale, synthetic_spec
from model.engine.distributed import DistInfo


class TaskData(Protocol):
    """What the data side asks of a task (model/downstream/tasks/base.py TaskSpec has it)."""

    stand_in: StandIn

    def stand_in_files(self, files: TaskFiles) -> tuple[tuple[Path, ...], Path | None,
                                                        Path | None]: ...

    def missing_files(self, task: TaskConfig) -> list[str]: ...

    def records(self, files: TaskFilesResolved, max_words: int,
                answers: list[str] | None) -> dict[str, list[Any]]: ...

    def dataset(self, records: list[Any], files: TaskFilesResolved, transform: Any,
                tokenizer: Any, train: bool, cfg: ExperimentConfig) -> tuple[Dataset, Any]: ...


@dataclass(frozen=True)
class TaskFilesResolved:
    train: tuple[Path, ...]
    val: Path | None
    test: Path
    image_root: Path
    vg_root: Path | None
    answer_list: Path | None
    synthetic: bool


def resolve_task_files(cfg: ExperimentConfig, task: TaskConfig, spec: TaskData
                       ) -> TaskFilesResolved:
    """The task's files; for synthetic data the stand-ins are generated (cached) first."""
    if cfg.data.kind == "synthetic":
        s = task.synthetic
        files = generate_task(cfg.data.cache_dir, spec.stand_in, synthetic_spec(cfg),
                              TaskSizes(s.train, s.val, s.test, s.single_object_fraction),
                              seed=s.seed)
        train, val, answer_list = spec.stand_in_files(files)
        return TaskFilesResolved(train, val, files.split("test"), files.root,
                                 None, answer_list, True)
    missing = [k for k in ("test_file", "image_root") if not getattr(task, k)]
    if not task.train_files:
        missing.insert(0, "train_files")
    missing += spec.missing_files(task)
    if missing:
        raise ValueError(f"task {task.name}: set {', '.join('task.' + m for m in missing)} "
                         "(the converters' outputs, docs/DATA.md)")
    return TaskFilesResolved(tuple(Path(f) for f in task.train_files),
                             Path(task.val_file) if task.val_file else None, Path(task.test_file),
                             Path(task.image_root), Path(task.vg_root) if task.vg_root else None,
                             Path(task.answer_list) if task.answer_list else None, False)


@dataclass
class Split:
    dataset: Dataset
    loader: DataLoader
    records: list[Any]


def make_loader(dataset: Dataset, batch: int, collate, train: bool, cfg: ExperimentConfig,
            dist: DistInfo, seed: int) -> DataLoader:
    """Training loaders shuffle with a seeded generator over a :class:`SeededDataset` (the same
    augmentation draws for sample i of epoch e whatever the worker count)."""
    if train:
        dataset = SeededDataset(dataset, seed)
    sampler = None
    if dist.world_size > 1:
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=train,
                                     seed=seed, drop_last=train)
    return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None,
                      sampler=sampler, drop_last=train, collate_fn=collate,
                      num_workers=cfg.data.num_workers, pin_memory=dist.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def _transforms(cfg: ExperimentConfig, size: int):
    train = build_transform("finetune", size, hflip=cfg.data.hflip, crop_scale=crop_scale(cfg),
                            randaugment=cfg.data.randaugment)
    return train, build_transform("test", size)


def build_task_splits(cfg: ExperimentConfig, task: TaskConfig, spec: TaskData,
                      files: TaskFilesResolved, tokenizer, dist: DistInfo
                      ) -> tuple[dict[str, Split], list[str] | None]:
    """Train / (val) / test splits with ALBEF's fine-tuning and test transforms."""
    answers = load_answer_list(files.answer_list) if files.answer_list else None
    records = spec.records(files, cfg.data.max_words, answers)
    train_tf, test_tf = _transforms(cfg, cfg.model.vision.image_size)
    seed = cfg.train.seed
    splits: dict[str, Split] = {}
    for name, recs in records.items():
        train = name == "train"
        batch = cfg.train.batch_size if train else task.eval_batch_size
        ds, collate = spec.dataset(recs, files, train_tf if train else test_tf, tokenizer,
                                   train, cfg)
        splits[name] = Split(ds, make_loader(ds, batch, collate, train, cfg, dist, seed), recs)
    return splits, answers
