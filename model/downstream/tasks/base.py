"""What a downstream task declares, and the behaviour its kind shares.

A task is one object (:class:`TaskSpec`) that the generic stage runner (model/downstream/run.py)
and the generic fine-tuning loop (model/downstream/finetune.py) dispatch through: its name and
the paper's split names, where its files come from, how its records are read and batched, its
network, its objective, how it is trained and evaluated. The classification tasks (SNLI-VE,
NLVR2) share :class:`ClassifyTask`: per-epoch evaluation of val and test, the epoch chosen by
``task.select``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from model.albef import ALBEF
from model.build import resolve_vocab_size
from model.config.schema import ExperimentConfig
from model.config.task import TaskConfig
from model.data.synthetic_tasks import StandIn, TaskFiles
from model.data.task_data import ClassifyCollate
from model.downstream.backbone import Backbones, bert_config, load_backbones
from model.downstream.data import Split, TaskFilesResolved
from model.downstream.finetune import reduce_sum, train_epochs
from model.downstream.objective import ClassifyObjective, TaskObjective
from model.engine.distributed import DistInfo
from model.engine.run_io import append_jsonl
from model.engine.step import move_batch
from model.engine.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TaskRun:
    """One task stage as the runner prepared it: config, task block, process group, tokenizer,
    splits (and VQA's answer list), where rows are logged and files written."""

    cfg: ExperimentConfig
    task: TaskConfig
    dist_info: DistInfo
    tokenizer: Any
    splits: dict[str, Split]
    answers: list[str] | None
    metrics: Path
    out_dir: Path


class TaskSpec:
    """A downstream task. Subclasses set the class attributes and the methods marked so."""

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]  # the paper's split names, in table order
    with_mlm: ClassVar[bool] = False  # the task network starts from the pre-trained MLM head
    stand_in: ClassVar[StandIn]  # its generated stand-in (data.kind = synthetic)
    text_and_label: ClassVar[tuple[str, str]]  # the fields of its files' records

    # ------------------------------------------------------------------ files and data
    def stand_in_files(self, files: TaskFiles) -> tuple[tuple[Path, ...], Path | None,
                                                        Path | None]:
        """(train files, val file, answer list) of the generated stand-in."""
        return (files.split("train"),), files.split("val"), None

    def missing_files(self, task: TaskConfig) -> list[str]:
        """The ``task.`` keys a real-data stage needs beyond train/test files and images."""
        return [] if task.val_file else ["val_file"]

    def records(self, files: TaskFilesResolved, max_words: int,
                answers: list[str] | None) -> dict[str, list[Any]]:
        raise NotImplementedError

    def dataset(self, records: list[Any], files: TaskFilesResolved, transform: Any,
                tokenizer: Any, train: bool, cfg: ExperimentConfig) -> tuple[Dataset, Any]:
        """The split's dataset and its collate function."""
        raise NotImplementedError

    # ------------------------------------------------------------------ model and objective
    def model(self, albef: ALBEF, bert_cfg: Any) -> nn.Module:
        """The task network from a (pre-trained) ALBEF's modules (deep-copied)."""
        raise NotImplementedError

    def objective(self, task: TaskConfig, student: nn.Module, teacher: nn.Module | None,
                  cfg: ExperimentConfig, pad_id: int, rank: int) -> TaskObjective:
        raise NotImplementedError

    def backbones(self, run: TaskRun, state: Mapping[str, Tensor], source: str,
                  init_size: int) -> Backbones:
        """ALBEF (and its momentum twin) loaded from a pre-training file at the stage's
        resolution."""
        cfg, tok = run.cfg, run.tokenizer
        return load_backbones(cfg, state, source, tok.vocab_size, tok.pad_id,
                              cfg.model.vision.image_size, with_mlm=self.with_mlm,
                              want_teacher=run.task.distill)

    def fine_tuned_objective(self, run: TaskRun, state: Mapping[str, Tensor], source: str,
                             init_size: int) -> tuple[TaskObjective, dict[str, Any]]:
        """Student and momentum teacher from a pre-training checkpoint, ready to fine-tune."""
        backbones = self.backbones(run, state, source, init_size)
        bert_cfg = task_bert_config(run)
        student = self.model(backbones.student, bert_cfg)
        teacher = None
        if run.task.distill and backbones.teacher is not None:
            teacher = self.model(backbones.teacher, bert_cfg)
            if hasattr(student, "cls_head"):  # ALBEF copies the fresh head into its twin
                teacher.cls_head.load_state_dict(student.cls_head.state_dict())
        info = {"teacher_init": backbones.teacher_source if teacher is not None else "none",
                "load_reports": [r.to_text() for r in backbones.reports]}
        objective = self.objective(run.task, student, teacher, run.cfg, run.tokenizer.pad_id,
                                   run.dist_info.rank)
        return objective.to(run.dist_info.device), info

    # ------------------------------------------------------------------ train and evaluate
    def fit(self, run: TaskRun, objective: TaskObjective, model: nn.Module,
            tracker: Tracker) -> tuple[dict[str, Any], int]:
        """Fine-tune and evaluate: (numbers, optimizer steps)."""
        raise NotImplementedError

    def evaluate(self, run: TaskRun, objective: TaskObjective) -> dict[str, Any]:
        """Evaluate a fine-tuned model as it is."""
        raise NotImplementedError


def task_bert_config(run: TaskRun) -> Any:
    """The text side's BERT config at the model's vocabulary (for heads and the decoder)."""
    vocab = resolve_vocab_size(run.cfg.model, run.tokenizer.vocab_size)
    return bert_config(run.cfg, vocab, run.tokenizer.pad_id)


@torch.no_grad()
def evaluate_accuracy(objective: ClassifyObjective, loader: DataLoader, device: torch.device
                      ) -> float:
    """Accuracy (%) of the student over every sample of ``loader`` (summed over ranks)."""
    objective.eval()
    correct = total = 0.0
    for batch in loader:
        batch = move_batch(batch, device)
        correct += float((objective.predict(batch) == batch["labels"]).sum())
        total += batch["labels"].numel()
    correct, total = reduce_sum([correct, total], device)
    objective.train()
    return 100.0 * correct / max(total, 1.0)


class ClassifyTask(TaskSpec):
    """A classification task (SNLI-VE, NLVR2): accuracy on val and test after every epoch."""

    loader_fn: ClassVar[Any]  # file -> records
    dataset_cls: ClassVar[type]

    def records(self, files, max_words, answers):
        load = type(self).loader_fn
        out = {"train": [r for f in files.train for r in load(f, max_words)],
               "test": load(files.test, max_words)}
        if files.val is not None:
            out["val"] = load(files.val, max_words)
        return out

    def dataset(self, records, files, transform, tokenizer, train, cfg):
        return self.dataset_cls(records, files.image_root, transform), ClassifyCollate(tokenizer)

    def objective(self, task, student, teacher, cfg, pad_id, rank):
        return ClassifyObjective(student, teacher, cfg.model.momentum, cfg.train.seed + rank)

    def evaluate(self, run, objective):
        device = run.dist_info.device
        return {self.splits[0]: evaluate_accuracy(objective, run.splits["val"].loader, device),
                self.splits[1]: evaluate_accuracy(objective, run.splits["test"].loader, device)}

    def fit(self, run, objective, model, tracker):
        """Train; evaluate val and test after every epoch; keep the epoch ``task.select``
        picks."""
        task, history = run.task, []

        def on_epoch(epoch: int) -> None:
            row = self.evaluate(run, objective)
            history.append(row)
            if run.dist_info.is_main:
                append_jsonl(run.metrics, {"kind": "eval", "epoch": epoch, **row})
            tracker.log(row, epoch, prefix=f"{task.name}/eval_epoch/")
            log.info("%s epoch %d: %s", task.name, epoch, row)

        steps = train_epochs(objective, model, run.splits["train"].loader, run.cfg.train,
                             task.alpha, task.alpha_warmup, run.dist_info, run.metrics,
                             task.name, on_epoch, tracker)
        best = (max(range(len(history)), key=lambda e: history[e][self.splits[0]])
                if task.select == "best_val" else len(history) - 1)
        return {**history[best], "selected_epoch": best, "epochs_run": len(history)}, steps
