"""Where a task stage's files come from and the loaders over them.

Real data: the ``task:`` block's files (the converters' outputs, docs/DATA.md). Synthetic data
(``data.kind = synthetic``): the stand-ins generated from the pre-training set's spec, read with
the pre-training tokenizer (the model's vocabulary is the pre-training one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.data.datasets import PretrainDataset
from model.data.sampling import SeededDataset
from model.data.synthetic_tasks import TaskSizes, generate_task
from model.data.task_data import (
    ClassifyCollate,
    NLVRDataset,
    VEDataset,
    VQACollate,
    VQADataset,
    load_answer_list,
    load_nlvr,
    load_ve,
    load_vqa,
)
from model.data.transforms import build_transform
from model.engine.data import DataSources, crop_scale, synthetic_spec
from model.engine.distributed import DistInfo


@dataclass(frozen=True)
class TaskFilesResolved:
    train: tuple[Path, ...]
    val: Path | None
    test: Path
    image_root: Path
    vg_root: Path | None
    answer_list: Path | None
    synthetic: bool


def resolve_task_files(cfg: ExperimentConfig, task: TaskConfig) -> TaskFilesResolved:
    """The task's files; for synthetic data the stand-ins are generated (cached) first."""
    if cfg.data.kind == "synthetic":
        s = task.synthetic
        files = generate_task(cfg.data.cache_dir, task.name, synthetic_spec(cfg),
                               TaskSizes(s.train, s.val, s.test, s.single_object_fraction),
                               seed=s.seed)
        by = {"ve": files.ve, "nlvr": files.nlvr, "vqa": files.vqa}[task.name]
        train = (by("train"), by("val")) if task.name == "vqa" else (by("train"),)
        return TaskFilesResolved(train, None if task.name == "vqa" else by("val"), by("test"),
                                 files.root, None,
                                 files.answer_list if task.name == "vqa" else None, True)
    missing = [k for k in ("test_file", "image_root") if not getattr(task, k)]
    if not task.train_files:
        missing.insert(0, "train_files")
    if task.name == "vqa" and not task.answer_list:
        missing.append("answer_list")
    if task.name != "vqa" and not task.val_file:
        missing.append("val_file")
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


def _loader(dataset: Dataset, batch: int, collate, train: bool, cfg: ExperimentConfig,
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


def _records(task: TaskConfig, files: TaskFilesResolved, max_words: int,
             answers: list[str] | None) -> dict[str, list[Any]]:
    if task.name == "ve":
        load = load_ve
    elif task.name == "nlvr":
        load = load_nlvr
    else:
        return {"train": [r for f in files.train
                          for r in load_vqa(f, max_words, answers, need_answers=True)],
                "test": load_vqa(files.test, 50, answers)}  # ALBEF: no limit at test (50)
    out = {"train": [r for f in files.train for r in load(f, max_words)],
           "test": load(files.test, max_words)}
    if files.val is not None:
        out["val"] = load(files.val, max_words)
    return out


def build_task_splits(cfg: ExperimentConfig, task: TaskConfig, files: TaskFilesResolved,
                      tokenizer, dist: DistInfo) -> tuple[dict[str, Split], list[str] | None]:
    """Train / (val) / test splits with ALBEF's fine-tuning and test transforms."""
    answers = load_answer_list(files.answer_list) if files.answer_list else None
    records = _records(task, files, cfg.data.max_words, answers)
    train_tf, test_tf = _transforms(cfg, cfg.model.vision.image_size)
    seed = cfg.train.seed
    splits: dict[str, Split] = {}
    for name, recs in records.items():
        train = name == "train"
        tf = train_tf if train else test_tf
        batch = cfg.train.batch_size if train else task.eval_batch_size
        if task.name == "vqa":
            ds: Dataset = VQADataset(recs, files.image_root, tf, files.vg_root)
            collate: Any = VQACollate(tokenizer, recs, train,
                                      cfg.data.max_tokens if train else None)
        else:
            cls = VEDataset if task.name == "ve" else NLVRDataset
            ds = cls(recs, files.image_root, tf)
            collate = ClassifyCollate(tokenizer)
        splits[name] = Split(ds, _loader(ds, batch, collate, train, cfg, dist, seed), recs)
    return splits, answers


def build_ta_loader(cfg: ExperimentConfig, task: TaskConfig, sources: DataSources, tokenizer,
                    dist: DistInfo, image_size: int) -> DataLoader:
    """Pre-training (image, caption) pairs for NLVR2's text-assignment step, at the pre-training
    resolution with the pre-training transform (ALBEF's Pretrain_nlvr.py)."""
    from model.data.collate import PretrainCollate

    files = tuple(Path(f) for f in task.ta.train_files) or sources.train_files
    if not files:
        raise ValueError("nlvr2's text-assignment step reads ALBEF caption files and the cell "
                         "has none (data.format = shards): set task.ta.train_files")
    tf = build_transform("pretrain", image_size, hflip=cfg.data.hflip,
                         crop_scale=crop_scale(cfg), randaugment=cfg.data.randaugment)
    ds = PretrainDataset(files, sources.image_root, tf, cfg.data.max_words)
    collate = PretrainCollate(tokenizer, cfg.data.max_tokens, truncation=True)
    return _loader(ds, task.ta.batch_size, collate, True, cfg, dist, cfg.train.seed)

