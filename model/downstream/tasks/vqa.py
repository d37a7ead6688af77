"""VQA v2 (ALBEF's VQA.py): an answer decoder started from the pre-trained MLM head ranks a
fixed answer list; trained on train + val (+ VG-QA), so there is no validation split; the test
predictions go to ``vqa_result.json`` (EvalAI's format), scored locally where the answers are
known."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from model.data.synthetic import Scene, SyntheticSpec, opposite_relation
from model.data.synthetic_tasks import (
    SPLIT_SEEDS,
    Scenes,
    StandIn,
    object_name,
    relation,
)
from model.data.task_data import VQACollate, VQADataset, encode_answers, load_vqa
from model.downstream.finetune import gather_objects, train_epochs
from model.downstream.heads import AnswerDecoder
from model.downstream.losses import vqa_accuracy
from model.downstream.models import VQAModel
from model.downstream.objective import VQAObjective
from model.downstream.tasks.base import TaskRun, TaskSpec
from model.engine.run_io import append_jsonl, write_json_atomic
from model.engine.step import move_batch

VQA_SUBMISSION = "vqa_result.json"
ANSWER_LIST = "answer_list.json"  # the stand-in's, beside its question files
TEST_MAX_WORDS = 50  # ALBEF puts no limit on test questions (its loader's default, 50)


@torch.no_grad()
def predict_vqa(objective: VQAObjective, loader, answers: list[str], tokenizer, k: int,
                device: torch.device) -> list[dict[str, Any]]:
    """``[{question_id, answer}]`` for every question of ``loader`` (this rank's share)."""
    objective.eval()
    enc = encode_answers(tokenizer, answers)
    ids, mask = enc["answer_ids"].to(device), enc["answer_mask"].to(device)
    records = loader.dataset.records
    out = []
    for batch in loader:
        batch = move_batch(batch, device)
        top_ids, top_prob = objective.rank(batch, ids, mask, k)
        best = top_ids[torch.arange(top_ids.shape[0]), top_prob.argmax(dim=1)]
        for index, a in zip(batch["index"].tolist(), best.tolist(), strict=True):
            out.append({"question_id": records[index].question_id, "answer": answers[a]})
    objective.train()
    return out


# ------------------------------------------------------------------ the synthetic stand-in
# Colour / shape / size / count / yes-no relation / "what is <relation> the ..." questions; the
# answers come from a fixed list (colours, shapes, sizes, yes, no, one, two and every
# ``<colour> <shape>``); ten identical human answers per question.
QUESTIONS_PER_IMAGE = 3


def vqa_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """:data:`QUESTIONS_PER_IMAGE` (question, answer) pairs about one scene."""
    target = scene.objects[int(rng.integers(len(scene.objects)))]
    pool = [(f"what colour is the {target.shape}", target.colour),
            (f"what shape is the {target.colour} object", target.shape),
            (f"what size is the {object_name(target)}", target.size),
            ("how many objects are there", ["one", "two"][len(scene.objects) - 1])]
    if len(scene.objects) == 2:
        subject, rel, other = relation(scene, rng)
        asked = rel if rng.random() < 0.5 else opposite_relation(rel)
        pool += [(f"is the {subject.shape} {asked} the {other.shape}",
                  "yes" if asked == rel else "no"),
                 (f"what is {rel} the {object_name(other)}", object_name(subject))]
    picks = rng.choice(len(pool), size=QUESTIONS_PER_IMAGE, replace=False)
    return [pool[int(p)] for p in picks]


def _draw(scenes: Scenes, rng: np.random.Generator, split: str, n: int) -> list[dict]:
    first_id = 1_000_000 * SPLIT_SEEDS[split]  # question ids unique across the splits
    out: list[dict] = []
    for i in range(n):
        scene = scenes.draw(rng)
        image = scenes.save(scene, rng, f"images/vqa_{split}/{i:06d}.png")
        for question, answer in vqa_questions(scene, rng):
            out.append({"question_id": first_id + len(out), "question": question,
                        "image": image, "dataset": "vqa", "answer": [answer] * 10})
    return out


def answer_list(spec: SyntheticSpec) -> list[str]:
    """Every answer a stand-in question can have."""
    combos = [f"{c} {s}" for c in spec.colours for s in spec.shapes]
    return [*spec.colours, *spec.shapes, *spec.sizes, "yes", "no", "one", "two", *combos]


STAND_IN = StandIn("vqa", stream=13, draw=_draw, per_item=QUESTIONS_PER_IMAGE,
                   extra_files=lambda spec: {ANSWER_LIST: answer_list(spec)})


class VQATask(TaskSpec):
    name = "vqa"
    splits = ("test",)
    stand_in = STAND_IN
    text_and_label = ("question", "answer")
    with_mlm = True

    def stand_in_files(self, files):
        return (files.split("train"), files.split("val")), None, files.root / ANSWER_LIST

    def missing_files(self, task):
        return [] if task.answer_list else ["answer_list"]

    def records(self, files, max_words, answers):
        return {"train": [r for f in files.train
                          for r in load_vqa(f, max_words, answers, need_answers=True)],
                "test": load_vqa(files.test, TEST_MAX_WORDS, answers)}

    def dataset(self, records, files, transform, tokenizer, train, cfg):
        return (VQADataset(records, files.image_root, transform, files.vg_root),
                VQACollate(tokenizer, records, train, cfg.data.max_tokens if train else None))

    def model(self, albef, bert_cfg):
        visual = copy.deepcopy(albef.visual_encoder)
        text = copy.deepcopy(albef.text_encoder)
        if albef.mlm_head is None:
            raise ValueError("the VQA decoder's LM head starts from the MLM head; build the "
                             "ALBEF with its MLM head (with_mlm=True)")
        decoder = AnswerDecoder.from_pretrained(bert_cfg, albef.text_encoder,
                                                albef.fusion_encoder, albef.mlm_head)
        return VQAModel(visual, text, copy.deepcopy(albef.fusion_encoder), decoder)

    def objective(self, task, student, teacher, cfg, pad_id, rank):
        return VQAObjective(student, teacher, cfg.model.momentum, pad_id, cfg.train.seed + rank)

    def evaluate(self, run: TaskRun, objective) -> dict[str, Any]:
        """Rank the answer list for every test question; write the submission file; score the
        questions whose human answers are known (a local split)."""
        test = run.splits["test"]
        preds = gather_objects(predict_vqa(objective, test.loader, run.answers, run.tokenizer,
                                           run.task.k_test, run.dist_info.device))
        out: dict[str, Any] = {"questions": len(preds)}
        if run.dist_info.is_main:
            preds.sort(key=lambda p: p["question_id"])
            write_json_atomic(run.out_dir / VQA_SUBMISSION, preds)
            by_id = {r.question_id: r for r in test.records}
            scored = [vqa_accuracy(p["answer"], by_id[p["question_id"]].answers) for p in preds
                      if by_id[p["question_id"]].answers]
            if scored:
                out["test"] = 100.0 * sum(scored) / len(scored)
                out["scored_questions"] = len(scored)
            append_jsonl(run.metrics, {"kind": "eval", **out})
        return out

    def fit(self, run, objective, model, tracker):
        task = run.task
        steps = train_epochs(objective, model, run.splits["train"].loader, run.cfg.train,
                             task.alpha, task.alpha_warmup, run.dist_info, run.metrics, "vqa",
                             tracker=tracker)
        numbers = self.evaluate(run, objective)
        tracker.log(numbers, steps, prefix="vqa/eval/")
        return numbers, steps


VQA = VQATask()
