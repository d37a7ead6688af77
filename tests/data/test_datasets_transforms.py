"""Datasets, image transforms and collation."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from model.data.captions import pre_caption
from model.data.collate import PretrainCollate, collate_eval_images
from model.data.datasets import (
    AnnotationError,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    UnreadableImageError,
    load_caption_file,
)
from model.data.synthetic import SyntheticPaths, SyntheticSpec, generate
from model.data.tokenizer import TextTokenizer
from model.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AlbefRandAugment,
    MultiView,
    build_multiview,
    build_transform,
)

SPEC = SyntheticSpec(seed=7, n_train_images=12, n_test_images=6, n_val_images=0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return generate(tmp_path_factory.mktemp("synthetic"), SPEC)


@pytest.fixture(scope="module")
def tokenizer(synthetic: SyntheticPaths) -> TextTokenizer:
    return TextTokenizer.from_vocab_file(synthetic.vocab_file)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _test_transform() -> v2.Compose:
    return build_transform("test", 32)


# --- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "test", "strong"])
@pytest.mark.parametrize("size", [32, 48, 64])
def test_transform_shapes_and_dtypes(kind: str, size: int) -> None:
    image = Image.new("RGB", (57, 40), (200, 30, 30))  # not square: test resize ignores aspect
    out = build_transform(kind, size)(image)  # type: ignore[arg-type]
    assert type(out) is torch.Tensor
    assert out.shape == (3, size, size) and out.dtype == torch.float32


def test_test_transform_is_deterministic_and_clip_normalised() -> None:
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    a = build_transform("test", 32)(image)
    assert torch.equal(a, build_transform("test", 32)(image))
    expected = [
        (v - m) / s for v, m, s in zip((1.0, 0.0, 128 / 255), CLIP_MEAN, CLIP_STD, strict=True)
    ]
    assert torch.allclose(a[:, 5, 5], torch.tensor(expected), atol=1e-5)


def test_hflip_switch_and_crop_scale() -> None:
    def ops(t: v2.Compose) -> list[type]:
        return [type(op) for op in t.transforms]

    assert v2.RandomHorizontalFlip in ops(build_transform("pretrain", 32))
    assert v2.RandomHorizontalFlip not in ops(build_transform("pretrain", 32, hflip=False))
    assert v2.RandomHorizontalFlip not in ops(build_transform("strong", 32, hflip=False))
    crop = build_transform("finetune", 32).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.5, 1.0)
    crop = build_transform("pretrain", 32, crop_scale=(0.6, 1.0)).transforms[0]
    assert crop.scale == (0.6, 1.0)
    strong = ops(build_transform("strong", 32))
    assert {v2.ColorJitter, AlbefRandAugment, v2.GaussianBlur} <= set(strong)
    with pytest.raises(ValueError, match="unknown kind"):
        build_transform("weak", 32)  # type: ignore[arg-type]


def test_strong_ops_select_the_strong_views_operations() -> None:
    """``mmda.strong_ops`` picks the strong view's photometric ops, in the fixed order; the
    standard views keep following ``randaugment`` alone."""
    def photometric(t: v2.Compose) -> list[type]:
        kinds = (v2.ColorJitter, AlbefRandAugment, v2.GaussianBlur)
        return [type(op) for op in t.transforms if isinstance(op, kinds)]

    full = [v2.ColorJitter, AlbefRandAugment, v2.GaussianBlur]
    assert photometric(build_transform("strong", 32)) == full
    # order follows the pipeline, not the list
    assert photometric(build_transform("strong", 32, strong_ops=("blur", "color_jitter"))) == [
        v2.ColorJitter, v2.GaussianBlur]
    assert photometric(build_transform("strong", 32, strong_ops=())) == []
    assert photometric(build_transform("strong", 32, randaugment=False)) == full
    assert photometric(build_transform("pretrain", 32, strong_ops=())) == [AlbefRandAugment]
    assert photometric(build_transform("pretrain", 32, randaugment=False)) == []
    with pytest.raises(ValueError, match="unknown strong_ops"):
        build_transform("strong", 32, strong_ops=("solarize",))
    views = build_multiview(32, randaugment=False, strong_ops=("color_jitter",)).views
    assert photometric(views["image"]) == [] and photometric(views["image_strong"]) == [
        v2.ColorJitter]


def test_randaugment_uses_albef_op_pool() -> None:
    # The subclass relies on torchvision's op table; fail loudly if torchvision renames it.
    assert set(AlbefRandAugment._AUGMENTATION_SPACE) < set(v2.RandAugment._AUGMENTATION_SPACE)
    assert "Solarize" not in AlbefRandAugment._AUGMENTATION_SPACE
    ra = AlbefRandAugment()
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (2, 7, 11)
    rotate = ra._AUGMENTATION_SPACE["Rotate"][0](11, 256, 256)
    translate = ra._AUGMENTATION_SPACE["TranslateX"][0](11, 256, 256)
    assert float(rotate[7]) == pytest.approx(21.0) and float(translate[7]) == pytest.approx(7.0)
    out = ra(torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_multiview_returns_every_view() -> None:
    views = build_multiview(32, hflip=False)(Image.new("RGB", (32, 32)))
    assert set(views) == {"image", "image_strong"}
    assert all(v.shape == (3, 32, 32) for v in views.values())
    with pytest.raises(ValueError, match="'image'"):
        MultiView({"strong": _test_transform()})
    pickle.loads(pickle.dumps(build_multiview(32)))


# --- annotation validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image": "a.png", "caption": "x"}, "expected a JSON list"),
        ([{"image": "a.png", "caption": "x"}, {"caption": "y"}], r"entry 1: missing key 'image'"),
        (
            [{"image": "a.png", "caption": "x"}, {"image": "b.png"}],
            "entry 1: missing key 'caption'",
        ),
        ([{"image": "a.png", "caption": "  "}], "entry 0: caption 0 is empty"),
        ([{"image": "a.png", "caption": []}], "entry 0: 'caption' must be"),
        ([{"image": "a.png", "caption": ["ok", 3]}], "entry 0: caption 1"),
        (["a.png"], "entry 0: expected an object"),
    ],
)
def test_bad_annotation_files_name_file_and_entry(
    tmp_path: Path, data: object, message: str
) -> None:
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(AnnotationError, match=message) as info:
        load_caption_file(path)
    assert str(path) in str(info.value)


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(AnnotationError, match="broken.json: invalid or truncated JSON"):
        load_caption_file(broken)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PretrainDataset([tmp_path / "missing.json"], tmp_path, _test_transform())


ENTRY = {"image": "a/b.png", "caption": ["caf\u00e9 \"quoted\"", "x\ny"], "image_id": 7}


@pytest.mark.parametrize("text", [
    json.dumps([ENTRY, ENTRY]), json.dumps([ENTRY, ENTRY], indent=2),
    json.dumps([ENTRY, ENTRY], ensure_ascii=False, separators=(",", ":")),
    "\r\n\t [ " + json.dumps(ENTRY) + " ,\n" + json.dumps(ENTRY) + "\n]\n\n",
])
def test_caption_files_decode_entry_by_entry_as_json_loads_does(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(text, encoding="utf-8")
    entries = load_caption_file(path)
    assert [(e.image, e.caption, e.image_id) for e in entries] == [
        (e["image"], e["caption"], e["image_id"]) for e in json.loads(text)]
    path.write_text(" [ ] ", encoding="utf-8")
    assert load_caption_file(path) == []


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected a JSON list at top level, found end of file"),
    ("[{", "invalid or truncated JSON in list element 0"),
    ('[{"image": "a", "caption": "b"},]', "list element 1 .character offset 32.: Expecting value"),
    ('[{"image": "a", "caption": "b"} {"image": "a", "caption": "b"}]',
     "expected ',' or ']' after list element 0, found '{'"),
    ('[{"image": "a", "caption": "b"}] []', "unexpected '\\[' after the closing"),
    ('[{"image": "a", "caption": "b"}', "expected ',' or ']' after list element 0, found end"),
    ('{"image": "a", "caption": "b"}', "expected a JSON list at top level, found '{'"),
])
def test_malformed_caption_files_are_refused_naming_file_and_element(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=message) as info:
        load_caption_file(path)
    assert str(path) in str(info.value)
    if text.startswith("["):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


# --- PretrainDataset ---------------------------------------------------------------------------


def test_pretrain_items_and_random_captions(synthetic: SyntheticPaths) -> None:
    dataset = PretrainDataset([synthetic.train_file], synthetic.root, build_multiview(32))
    assert len(dataset) == 12
    entry = json.loads(synthetic.train_file.read_text())[3]
    seen = set()
    for _ in range(30):
        item = dataset[3]
        assert set(item) == {"image", "image_strong", "caption", "index"}
        assert item["image"].shape == item["image_strong"].shape == (3, 32, 32)
        assert item["index"] == 3
        seen.add(item["caption"])
    assert seen <= {pre_caption(c) for c in entry["caption"]} and len(seen) > 1
    random.seed(123)
    first = [dataset[i]["caption"] for i in range(len(dataset))]
    random.seed(123)
    assert first == [dataset[i]["caption"] for i in range(len(dataset))]


def test_pretrain_string_captions_and_several_files(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10), "red").save(tmp_path / "a.png")
    one = _write(tmp_path / "one.json", [{"image": "a.png", "caption": "A Red, Square!"}])
    two = _write(tmp_path / "two.json", [{"image": "a.png", "caption": ["x-y"]}])
    dataset = PretrainDataset([one, two], tmp_path, _test_transform(), max_words=2)
    assert len(dataset) == 2
    assert dataset[0]["caption"] == "a red" and dataset[1]["caption"] == "x y"
    assert set(dataset[0]) == {"image", "caption", "index"}
    with pytest.raises(TypeError, match="sequence of paths"):
        PretrainDataset(one, tmp_path, _test_transform())  # type: ignore[arg-type]


def _corrupt_copy(synthetic: SyntheticPaths, target: Path, bad: list[int]) -> Path:
    shutil.copytree(synthetic.root, target)
    entries = json.loads(synthetic.train_file.read_text())
    for index in bad:
        path = target / entries[index]["image"]
        if index % 2:
            path.write_bytes(b"definitely not a png")
        else:
            path.write_bytes(path.read_bytes()[:60])  # truncated PNG
    return target / "train.json"


def test_unreadable_image_is_skipped_counted_and_warned_once(
    synthetic: SyntheticPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ann = _corrupt_copy(synthetic, tmp_path / "copy", bad=[4, 5])
    dataset = PretrainDataset([ann], tmp_path / "copy", _test_transform())
    with caplog.at_level(logging.WARNING, logger="model.data.datasets"):
        assert dataset[4]["index"] == 6
        assert dataset[5]["index"] == 6
        assert dataset[3]["index"] == 3
    assert dataset.skipped == 3 and len(dataset.bad_files) == 2
    warnings = [r for r in caplog.records if "skipping unreadable image" in r.message]
    assert len(warnings) == 2
    assert dataset[11]["index"] == 11


def test_last_item_wraps_around_and_all_unreadable_raises(
    synthetic: SyntheticPaths, tmp_path: Path
) -> None:
    ann = _corrupt_copy(synthetic, tmp_path / "copy", bad=[11])
    dataset = PretrainDataset([ann], tmp_path / "copy", _test_transform())
    assert dataset[11]["index"] == 0
    empty_root = tmp_path / "nothing"
    empty_root.mkdir()
    dataset = PretrainDataset([synthetic.train_file], empty_root, _test_transform())
    with pytest.raises(UnreadableImageError, match="image_root"):
        dataset[0]
    assert dataset.skipped == 12


def test_transform_errors_are_not_mistaken_for_bad_images(synthetic: SyntheticPaths) -> None:
    def broken_transform(image: Image.Image) -> torch.Tensor:
        raise ValueError("bug in a transform")

    dataset = PretrainDataset([synthetic.train_file], synthetic.root, broken_transform)
    with pytest.raises(ValueError, match="bug in a transform"):
        dataset[0]
    assert dataset.skipped == 0


# --- retrieval datasets ------------------------------------------------------------------------


def _eval_file(tmp_path: Path) -> Path:
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.png", "blue")):
        Image.new("RGB", (20, 12), colour).save(tmp_path / name)
    entries = [
        {"image": "a.png", "caption": ["A red one.", "Red!"]},
        {"image": "b.png", "caption": ["green"]},
        {"image": "c.png", "caption": ["blue 1", "blue 2", "blue-3"]},
    ]
    return _write(tmp_path / "eval.json", entries)


def test_retrieval_eval_bookkeeping(tmp_path: Path) -> None:
    dataset = RetrievalEvalDataset(_eval_file(tmp_path), tmp_path, _test_transform())
    assert len(dataset) == 3
    assert dataset.texts == ["a red one", "red", "green", "blue 1", "blue 2", "blue 3"]
    assert dataset.img2txt == {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    assert dataset.txt2img == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    for image, texts in dataset.img2txt.items():
        assert all(dataset.txt2img[t] == image for t in texts)
    assert dataset.image_paths == ["a.png", "b.png", "c.png"]
    item = dataset[2]
    assert set(item) == {"image", "index"} and item["index"] == 2
    assert item["image"].shape == (3, 32, 32)


def test_retrieval_eval_from_coco_matches_json(synthetic: SyntheticPaths) -> None:
    transform = _test_transform()
    from_json = RetrievalEvalDataset(synthetic.test_file, synthetic.root, transform)
    from_coco = RetrievalEvalDataset.from_coco(synthetic.coco_file, synthetic.root, transform)
    assert from_coco.texts == from_json.texts and len(from_json.texts) == 30
    assert from_coco.img2txt == from_json.img2txt
    assert from_coco.txt2img == from_json.txt2img
    assert from_coco.image_paths == from_json.image_paths
    assert torch.equal(from_coco[1]["image"], from_json[1]["image"])


def test_from_coco_orders_by_ids(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 9, "file_name": "late.png"}, {"id": 2, "file_name": "early.png"}],
        "annotations": [
            {"id": 30, "image_id": 9, "caption": "third"},
            {"id": 5, "image_id": 2, "caption": "Second"},
            {"id": 1, "image_id": 2, "caption": "first"},
        ],
    }
    dataset = RetrievalEvalDataset.from_coco(
        _write(tmp_path / "c.json", coco), tmp_path, _test_transform()
    )
    assert dataset.image_paths == ["early.png", "late.png"]
    assert dataset.texts == ["first", "second", "third"]
    assert dataset.img2txt == {0: [0, 1], 1: [2]}
    with pytest.raises(AnnotationError, match="not a COCO annotation file"):
        RetrievalEvalDataset.from_coco(_write(tmp_path / "l.json", []), tmp_path, _test_transform())
    coco["images"].append({"id": 11, "file_name": "lonely.png"})
    with pytest.raises(AnnotationError, match="image id 11 .* no captions"):
        RetrievalEvalDataset.from_coco(
            _write(tmp_path / "d.json", coco), tmp_path, _test_transform()
        )


def test_retrieval_eval_unreadable_image_raises(tmp_path: Path) -> None:
    ann = _eval_file(tmp_path)
    (tmp_path / "b.png").write_bytes(b"broken")
    dataset = RetrievalEvalDataset(ann, tmp_path, _test_transform())
    with pytest.raises(UnreadableImageError, match="image 1"):
        dataset[1]


def test_retrieval_train_one_sample_per_caption(tmp_path: Path) -> None:
    dataset = RetrievalTrainDataset([_eval_file(tmp_path)], tmp_path, _test_transform())
    assert len(dataset) == 6 and dataset.n_images == 3
    assert [dataset[i]["image_idx"] for i in range(6)] == [0, 0, 1, 2, 2, 2]
    item = dataset[5]
    assert item["caption"] == "blue 3" and item["index"] == 5
    # ALBEF's own train files: one entry per caption, grouped by image_id.
    per_caption = [
        {"image": "a.png", "caption": "one", "image_id": "coco_1"},
        {"image": "b.png", "caption": "two", "image_id": "coco_2"},
        {"image": "a.png", "caption": "three", "image_id": "coco_1"},
    ]
    ann = _write(tmp_path / "per_caption.json", per_caption)
    dataset = RetrievalTrainDataset([ann], tmp_path, _test_transform())
    assert [dataset[i]["image_idx"] for i in range(3)] == [0, 1, 0]


# --- collate -----------------------------------------------------------------------------------


def test_pretrain_collate_shapes(synthetic: SyntheticPaths, tokenizer: TextTokenizer) -> None:
    dataset = PretrainDataset([synthetic.train_file], synthetic.root, build_multiview(32))
    collate = pickle.loads(pickle.dumps(PretrainCollate(tokenizer, max_length=25)))
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate)))
    assert set(batch) == {"image", "image_strong", "input_ids", "attention_mask", "index"}
    assert batch["image"].shape == batch["image_strong"].shape == (5, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] <= 25
    assert batch["input_ids"].dtype == torch.int64
    assert (batch["input_ids"][:, 0] == tokenizer.cls_id).all()
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_retrieval_collate_keeps_image_idx(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    dataset = RetrievalTrainDataset([_eval_file(tmp_path)], tmp_path, _test_transform())
    collate = PretrainCollate(tokenizer, max_length=None, truncation=False)
    batch = collate([dataset[i] for i in range(4)])
    assert batch["image_idx"].tolist() == [0, 0, 1, 2]
    assert batch["image"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="keys"):
        collate([dataset[0], {"image": dataset[0]["image"], "caption": "x", "index": 0}])


def test_eval_collate(tmp_path: Path) -> None:
    dataset = RetrievalEvalDataset(_eval_file(tmp_path), tmp_path, _test_transform())
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_eval_images)))
    assert set(batch) == {"image", "index"}
    assert batch["image"].shape == (3, 3, 32, 32) and batch["index"].tolist() == [0, 1, 2]
