"""Downstream data: readers and their errors, answer encoding, the synthetic stand-ins, the
converters from the official annotation files, and the official key maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.build import build_albef
from model.data.datasets import AnnotationError
from model.data.jsonio import DataFileError
from model.data.prepare.tasks import prepare_nlvr2, prepare_snli_ve, prepare_vqa
from model.data.synthetic import SyntheticSpec, enumerate_scenes
from model.data.synthetic_tasks import Scenes, TaskSizes, generate_task, has_object
from model.data.task_data import encode_answers, load_nlvr, load_ve, load_vqa
from model.data.tokenizer import TextTokenizer
from model.downstream.backbone import bert_config
from model.downstream.keymap import (
    map_official_task_state,
    official_task_key_to_ours,
    ours_task_key_to_official,
)
from model.downstream.tasks import build_task_model, task_spec
from model.downstream.tasks.nlvr import nlvr_example
from model.downstream.tasks.ve import ve_statements
from model.downstream.tasks.vqa import answer_list, vqa_questions
from tests.tiny import SPECIAL, VOCAB, tiny_config


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- readers


def test_readers_accept_albef_formats(tmp_path: Path) -> None:
    ve = load_ve(_write(tmp_path / "ve.json", [
        {"image": "1.jpg", "sentence": "A dog runs.", "label": "entailment"},
        {"image": "2.jpg", "sentence": "x", "label": "contradiction"}]))
    assert [r.label for r in ve] == [2, 0] and ve[0].sentence == "a dog runs"
    nlvr = load_nlvr(_write(tmp_path / "n.json", [
        {"images": ["a.png", "b.png"], "sentence": "Both", "label": "True"},
        {"images": ["a.png", "b.png"], "sentence": "Both", "label": False}]))
    assert [r.label for r in nlvr] == [1, 0]
    vqa = load_vqa(_write(tmp_path / "q.json", [
        {"question_id": 7, "question": "What colour?", "image": "i.jpg", "dataset": "vqa",
         "answer": ["red"] * 7 + ["blue"] * 3},
        {"question_id": 8, "question": "How many?", "image": "v.jpg", "dataset": "vg",
         "answer": "two"}]), need_answers=True)
    assert dict(zip(vqa[0].distinct, vqa[0].weights, strict=True)) == {"red": 0.7, "blue": 0.3}
    assert vqa[1].weights == (0.5,) and vqa[0].question == "what colour"


@pytest.mark.parametrize("entry, message", [
    ({"image": "1.jpg", "sentence": "x", "label": "maybe"}, "label 'maybe'"),
    ({"image": "1.jpg", "label": "neutral"}, "missing key 'sentence'"),
    ({"image": "1.jpg", "sentence": "?!", "label": "neutral"}, "empty after cleaning"),
    ({"image": "", "sentence": "a", "label": "neutral"}, "'image' must be a non-empty"),
])
def test_bad_ve_entries_name_file_and_entry(tmp_path: Path, entry, message: str) -> None:
    path = _write(tmp_path / "ve.json", [{"image": "0.jpg", "sentence": "ok",
                                          "label": "neutral"}, entry])
    with pytest.raises(AnnotationError, match=rf"ve\.json: entry 1: .*{message}"):
        load_ve(path)


def test_bad_vqa_and_nlvr_entries(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="entry 0: none of the answers"):
        load_vqa(_write(tmp_path / "q.json", [{"question": "q", "image": "i",
                                               "answer": ["zebra"]}]), answer_list=["red"])
    with pytest.raises(AnnotationError, match="entry 0: training questions need 'answer'"):
        load_vqa(_write(tmp_path / "q2.json", [{"question": "q", "image": "i"}]),
                 need_answers=True)
    with pytest.raises(AnnotationError, match="entry 0: 'images' must list two"):
        load_nlvr(_write(tmp_path / "n.json", [{"images": ["a"], "sentence": "s",
                                                "label": "True"}]))


def test_answers_end_with_sep_after_cls(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue",
                                "circle"]) + "\n")
    tok = TextTokenizer.from_vocab_file(vocab)
    enc = encode_answers(tok, ["red circle", "blue"])
    assert enc["answer_ids"].tolist() == [[2, 5, 7, 3], [2, 6, 3, 0]]
    assert enc["answer_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


# --------------------------------------------------------------------------- stand-ins


def test_synthetic_statements_are_true_false_or_unknown_of_their_scene() -> None:
    spec = SyntheticSpec()
    singles, pairs = enumerate_scenes(spec)
    rng = __import__("numpy").random.default_rng(0)
    for scene in [*singles[:10], *pairs[:60]]:
        statements = ve_statements(scene, spec, rng)
        assert [lab for _, lab in statements] == ["entailment", "contradiction", "neutral"]
        shapes = {o.shape: o for o in scene.objects}
        (ent, _), (con, _), (neu, _) = statements
        named = [w for w in neu.split() if w in spec.shapes]
        assert any(s not in shapes for s in named)  # neutral names an absent shape
        assert all(s in shapes for s in ent.split() if s in spec.shapes)
        if " is " in ent and ent.split()[-1] in spec.colours:
            assert shapes[ent.split()[1]].colour == ent.split()[-1]
            assert shapes[con.split()[1]].colour != con.split()[-1]


def test_synthetic_nlvr_labels_follow_both_images(tmp_path: Path) -> None:
    import numpy as np

    scenes = Scenes(SyntheticSpec(), tmp_path, TaskSizes())
    rng = np.random.default_rng(1)
    labels = []
    for _ in range(200):
        left, right, sentence, label = nlvr_example(scenes, rng)
        colour, shape = sentence.split()[-2:]
        has = [has_object(left, colour, shape), has_object(right, colour, shape)]
        truth = all(has) if sentence.startswith("both") else sum(has) == 1
        assert truth == label
        labels.append(label)
    assert 0.4 < sum(labels) / len(labels) < 0.6


def test_synthetic_vqa_answers_are_in_the_list_and_true() -> None:
    import numpy as np

    spec = SyntheticSpec()
    answers = set(answer_list(spec))
    rng = np.random.default_rng(2)
    for scene in enumerate_scenes(spec)[1][:50]:
        for question, answer in vqa_questions(scene, rng):
            assert answer in answers
            if question.startswith("how many"):
                assert answer == "two"


def test_stand_ins_are_deterministic_and_cached(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_train_images=8, n_test_images=8, n_val_images=0)
    sizes = TaskSizes(train=4, val=2, test=3)
    a = generate_task(tmp_path / "a", task_spec("vqa").stand_in, spec, sizes)
    b = generate_task(tmp_path / "b", task_spec("vqa").stand_in, spec, sizes)
    for name in ("vqa_train.json", "vqa_test.json", "answer_list.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    png = sorted((a.root / "images").rglob("*.png"))[0]
    assert png.read_bytes() == (b.root / png.relative_to(a.root)).read_bytes()
    reused = generate_task(tmp_path / "a", task_spec("vqa").stand_in, spec, sizes)
    assert reused.root == a.root
    assert len(json.loads((a.root / "vqa_test.json").read_text())) == 9  # 3 per image


# --------------------------------------------------------------------------- converters


def _jsonl(path: Path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_snli_ve_converter_and_its_errors(tmp_path: Path) -> None:
    src = tmp_path / "ve"
    src.mkdir()
    row = {"Flickr30K_ID": "123", "sentence2": "A man sleeps.", "gold_label": "neutral"}
    for split in ("train", "dev", "test"):
        _jsonl(src / f"snli_ve_{split}.jsonl", [row, {**row, "gold_label": "entailment"}])
    summary = prepare_snli_ve(src, tmp_path / "out", image_prefix="flickr/")
    data = json.loads((tmp_path / "out" / "ve_dev.json").read_text())
    assert data[0] == {"image": "flickr/123.jpg", "sentence": "A man sleeps.",
                       "label": "neutral"}
    assert summary.output("ve_train").entries == 2
    assert len(load_ve(tmp_path / "out" / "ve_test.json")) == 2
    _jsonl(src / "snli_ve_dev.jsonl", [row, {**row, "gold_label": "-"}])
    with pytest.raises(DataFileError, match=r"snli_ve_dev\.jsonl: line 2: gold_label '-'"):
        prepare_snli_ve(src, tmp_path / "out")
    (src / "snli_ve_dev.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    with pytest.raises(DataFileError, match=r"line 2: not valid JSON"):
        prepare_snli_ve(src, tmp_path / "out")


def test_nlvr2_converter_pairs_images_and_checks_them(tmp_path: Path) -> None:
    src = tmp_path / "nlvr"
    src.mkdir()
    for name, split in (("train", "train"), ("dev", "dev"), ("test1", "test1")):
        _jsonl(src / f"{name}.json", [{"identifier": f"{split}-10-2-0", "sentence": "Two dogs.",
                                       "label": "True", "directory": 7}])
    prepare_nlvr2(src, tmp_path / "out")
    train = json.loads((tmp_path / "out" / "nlvr_train.json").read_text())
    assert train[0]["images"] == ["train/7/train-10-2-img0.png", "train/7/train-10-2-img1.png"]
    dev = json.loads((tmp_path / "out" / "nlvr_dev.json").read_text())
    assert dev[0]["images"] == ["dev/dev-10-2-img0.png", "dev/dev-10-2-img1.png"]
    with pytest.raises(DataFileError, match="3 referenced images are missing|referenced images"):
        prepare_nlvr2(src, tmp_path / "out2", image_root=tmp_path)
    summary = prepare_nlvr2(src, tmp_path / "out3", image_root=tmp_path,
                            allow_missing_images=True)
    assert summary.stats["dropped_missing_images"] == 6


def test_vqa_converter_with_vg_and_answer_list(tmp_path: Path) -> None:
    src = tmp_path / "vqa"
    src.mkdir()
    for split in ("train2014", "val2014", "test2015"):
        _write(src / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": [
            {"question_id": 11, "image_id": 5, "question": "What is it?"}]})
    for split in ("train2014", "val2014"):
        _write(src / f"v2_mscoco_{split}_annotations.json", {"annotations": [
            {"question_id": 11, "answers": [{"answer": "cat"}] * 6 + [{"answer": "dog"}] * 4}]})
    vg = _write(tmp_path / "qa.json", [{"qas": [
        {"qa_id": 1, "image_id": 9, "question": "Colour?", "answer": "Cat."},
        {"qa_id": 2, "image_id": 9, "question": "Where?", "answer": "on the moon"}]}])
    summary = prepare_vqa(src, tmp_path / "out", vg_qa=vg, top_answers=2)
    out = tmp_path / "out"
    train = load_vqa(out / "vqa_train.json", need_answers=True)
    assert train[0].image == "train2014/COCO_train2014_000000000005.jpg"
    assert json.loads((out / "answer_list.json").read_text()) == ["cat", "dog"]
    assert summary.stats["vg_qa_answers_not_in_list"] == 1
    vg_rows = load_vqa(out / "vg_qa.json", answer_list=["cat", "dog"], need_answers=True)
    assert vg_rows[0].weights == (0.5,) and vg_rows[0].answers == ("cat",)
    assert "answer" not in json.loads((out / "vqa_test.json").read_text())[0]


# --------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("task", ["ve", "nlvr", "nlvr_ta", "vqa"])
def test_official_task_key_map_round_trips(task: str) -> None:
    cfg = tiny_config()
    albef = build_albef(cfg.model, VOCAB, SPECIAL.pad, with_mlm=task == "vqa")
    model = build_task_model(task, albef, bert_config(cfg, VOCAB, SPECIAL.pad))
    text_layers = cfg.model.text.text_layers
    ours = model.state_dict()
    official = {ours_task_key_to_official(k, text_layers, ta=task == "nlvr_ta"): v
                for k, v in ours.items()}
    assert len(official) == len(ours)
    if task == "nlvr":  # the doubled stack: 2 text + 6 fusion layers, ALBEF's numbering
        assert "text_encoder.encoder.layer.7.crossattention.self.key.weight" in official
    if task == "vqa":
        assert "text_decoder.bert.encoder.layer.2.crossattention.self.query.weight" in official
        official["text_decoder.cls.predictions.decoder.weight"] = \
            official["text_decoder.bert.embeddings.word_embeddings.weight"]
        official["text_decoder_m.cls.predictions.bias"] = torch.zeros(3)
    mapped = map_official_task_state(official, text_layers)
    assert not mapped.problems and not mapped.unknown
    assert set(mapped.state) == set(ours)
    assert all(torch.equal(mapped.state[k], v) for k, v in ours.items())
    assert official_task_key_to_ours("temp", text_layers) is None
