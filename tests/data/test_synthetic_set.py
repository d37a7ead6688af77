"""The synthetic compositional dataset: formats, determinism, caching, hard negatives, layout."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from model.cli.synthetic import main
from model.data.synthetic import (
    PALETTE,
    RELATIONS,
    Scene,
    SceneObject,
    SyntheticPaths,
    SyntheticSpec,
    generate,
    hard_negatives,
    relation_caption,
    render_scene,
    sample_eval_scenes,
    sample_train_scenes,
)
from model.data.tokenizer import SPECIAL_TOKENS, TextTokenizer

SMALL = SyntheticSpec(seed=3, n_train_images=40, n_test_images=20, n_val_images=6)
JSON_FILES = ("train.json", "val.json", "test.json", "test_coco.json", "test_negatives.json",
              "test_boxes.json")
OUTPUT_FILES = (*JSON_FILES, "vocab.txt", "manifest.json")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return generate(tmp_path_factory.mktemp("synthetic"), SMALL)


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_files_and_formats(small: SyntheticPaths) -> None:
    root = small.root
    for name in OUTPUT_FILES:
        assert (root / name).is_file(), name
    train = _load(small.train_file)
    test = _load(small.test_file)
    assert small.val_file is not None
    val = _load(small.val_file)
    assert (len(train), len(test), len(val)) == (40, 20, 6)
    for split in (train, test, val):
        for entry in split:
            assert set(entry) == {"image", "caption"}
            assert isinstance(entry["caption"], list) and len(entry["caption"]) == 5
            assert not Path(entry["image"]).is_absolute()
            with Image.open(root / entry["image"]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    images = {e["image"] for split in (train, test, val) for e in split}
    assert len(images) == 66


def test_manifest_counts(small: SyntheticPaths) -> None:
    manifest = _load(small.manifest_file)
    assert manifest["spec"] == SMALL.to_dict()
    assert manifest["spec_hash"] == SMALL.hash()
    counts = manifest["counts"]
    assert counts["train"]["images"] == 40 and counts["train"]["captions"] == 200
    assert counts["test"]["single_object"] + counts["test"]["two_object"] == 20
    assert counts["test_negatives"] == counts["test"]["two_object"]
    assert manifest["vocab_size"] == len(small.vocab_file.read_text().splitlines())


def test_vocab_covers_every_caption_word(small: SyntheticPaths) -> None:
    lines = small.vocab_file.read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(SPECIAL_TOKENS)
    tokenizer = TextTokenizer.from_vocab_file(small.vocab_file)
    captions = [c for e in _load(small.train_file) for c in e["caption"]]
    out = tokenizer(captions)
    assert not (out["input_ids"] == tokenizer.unk_id).any()
    # Whole words: one token per word.
    assert out["attention_mask"].sum(1).tolist() == [1 + len(c.split()) for c in captions]


def test_coco_file_reads_with_pycocotools(small: SyntheticPaths) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(small.coco_file))
    test = _load(small.test_file)
    assert len(coco.getImgIds()) == len(test)
    assert len(coco.getAnnIds()) == 5 * len(test)
    for image_id, entry in zip(sorted(coco.getImgIds()), test, strict=True):
        assert coco.imgs[image_id]["file_name"] == entry["image"]
        anns = coco.loadAnns(sorted(coco.getAnnIds(imgIds=[image_id])))
        assert [a["caption"] for a in anns] == entry["caption"]


def test_hard_negatives_differ_by_exactly_the_named_swap(small: SyntheticPaths) -> None:
    test = {e["image"]: e["caption"] for e in _load(small.test_file)}
    negatives = _load(small.negatives_file)
    assert negatives
    colours, shapes = set(PALETTE), {"circle", "square", "triangle", "diamond"}
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for entry in negatives:
        true = entry["caption"]
        assert true == test[entry["image"]][0]
        words = true.split()
        for kind, vocabulary in (("colour", colours), ("shape", shapes)):
            swapped = entry["negatives"][kind].split()
            diff = [i for i, (a, b) in enumerate(zip(words, swapped, strict=True)) if a != b]
            assert len(diff) == 2, (kind, true, swapped)
            i, j = diff
            assert words[i] in vocabulary and words[j] in vocabulary
            assert (swapped[i], swapped[j]) == (words[j], words[i])
            assert Counter(swapped) == Counter(words)  # same bag of words
        # The reference negative is another test scene's main caption.
        other = entry["negatives"]["random"]
        assert other != true and any(other == t[0] for t in test.values())
        flipped = entry["negatives"]["relation"].split()
        diff = [i for i, (a, b) in enumerate(zip(words, flipped, strict=True)) if a != b]
        assert len(diff) == 1 and opposite[words[diff[0]]] == flipped[diff[0]]
        assert not set(entry["negatives"].values()) & set(test[entry["image"]])


def test_relation_negative_has_the_bag_of_words_of_a_true_phrasing() -> None:
    # "A left of B" flips to the false "A right of B", whose words equal the true "B right of A".
    left = SceneObject("red", "circle", "small")
    right = SceneObject("blue", "square", "large")
    forward, backward = RELATIONS["horizontal"]
    negatives = hard_negatives(left, forward, right)
    true_other_way = relation_caption(right, backward, left)
    assert Counter(negatives["relation"].split()) == Counter(true_other_way.split())
    assert negatives["relation"] != true_other_way


def test_generation_is_deterministic(tmp_path: Path) -> None:
    spec = SyntheticSpec(seed=11, n_train_images=12, n_test_images=8, n_val_images=2)
    a, b = generate(tmp_path / "a", spec), generate(tmp_path / "b", spec)
    files_a, files_b = _all_files(a.root), _all_files(b.root)
    assert [p.relative_to(a.root) for p in files_a] == [p.relative_to(b.root) for p in files_b]
    for fa, fb in zip(files_a, files_b, strict=True):
        if fa.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb)))
        assert fa.read_bytes() == fb.read_bytes(), fa.name


def test_cached_generation_does_not_rewrite(tmp_path: Path) -> None:
    spec = SyntheticSpec(seed=5, n_train_images=10, n_test_images=6, n_val_images=0)
    paths = generate(tmp_path, spec)
    assert paths.val_file is None and not (tmp_path / "val.json").exists()
    old = 1_000_000_000
    for f in _all_files(tmp_path):
        os.utime(f, ns=(old, old))
    again = generate(tmp_path, spec)
    assert again == paths
    assert all(f.stat().st_mtime_ns == old for f in _all_files(tmp_path))


def test_spec_change_regenerates(tmp_path: Path) -> None:
    first = SyntheticSpec(seed=5, n_train_images=10, n_test_images=6, n_val_images=2)
    generate(tmp_path, first)
    before = (tmp_path / "images/train/000000.png").read_bytes()
    second = SyntheticSpec(seed=6, n_train_images=4, n_test_images=6, n_val_images=0)
    paths = generate(tmp_path, second)
    assert _load(paths.manifest_file)["spec_hash"] == second.hash() != first.hash()
    assert (tmp_path / "images/train/000000.png").read_bytes() != before
    assert len(list((tmp_path / "images/train").iterdir())) == 4  # stale images removed
    assert not (tmp_path / "val.json").exists() and not (tmp_path / "images/val").exists()


def test_missing_file_triggers_regeneration(tmp_path: Path) -> None:
    spec = SyntheticSpec(seed=1, n_train_images=5, n_test_images=5, n_val_images=0)
    paths = generate(tmp_path, spec)
    reference = paths.test_file.read_bytes()
    paths.test_file.unlink()
    generate(tmp_path, spec)
    assert paths.test_file.read_bytes() == reference


def test_eval_scenes_are_distinct_and_train_images_differ(small: SyntheticPaths) -> None:
    test_scenes, val_scenes = sample_eval_scenes(SMALL)
    assert len(set(test_scenes + val_scenes)) == len(test_scenes) + len(val_scenes) == 26
    train_bytes = {(small.root / e["image"]).read_bytes() for e in _load(small.train_file)}
    test_bytes = {(small.root / e["image"]).read_bytes() for e in _load(small.test_file)}
    assert not train_bytes & test_bytes


def test_holdout_keeps_eval_scenes_out_of_training() -> None:
    spec = SyntheticSpec(n_train_images=300, n_test_images=40, n_val_images=10)
    test_scenes, val_scenes = sample_eval_scenes(spec)
    held_out = test_scenes + val_scenes
    assert set(sample_train_scenes(spec, held_out)).isdisjoint(held_out)
    assert not set(sample_train_scenes(spec)).isdisjoint(held_out)  # default: overlap allowed


@pytest.mark.parametrize("size", [32, 48, 64])
@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_two_objects_lie_in_separate_halves(size: int, axis: str) -> None:
    spec = SyntheticSpec(image_size=size, noise_std=0.0, texture_std=0.0, colour_jitter=0)
    scene = Scene(
        objects=(SceneObject("red", "triangle", "small"), SceneObject("blue", "circle", "large")),
        axis=axis,
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        pixels = render_scene(scene, spec, rng).astype(int)
        assert pixels.shape == (size, size, 3)
        red = (pixels[..., 0] > 180) & (pixels[..., 2] < 90)
        blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 90)
        ys_red, xs_red = np.nonzero(red)
        ys_blue, xs_blue = np.nonzero(blue)
        first, second = (xs_red, xs_blue) if axis == "horizontal" else (ys_red, ys_blue)
        assert first.max() < size / 2 <= second.min()
        # Each object covers at least the area of one patch of side size/4 (8 px at 32 px).
        assert red.sum() >= (size / 4) ** 2 and blue.sum() >= (size / 4) ** 2


@pytest.mark.parametrize("size", [48, 64])
def test_other_image_sizes(tmp_path: Path, size: int) -> None:
    spec = SyntheticSpec(image_size=size, n_train_images=3, n_test_images=3, n_val_images=0)
    paths = generate(tmp_path, spec)
    entry = _load(paths.test_file)[0]
    with Image.open(paths.root / entry["image"]) as image:
        assert image.size == (size, size)
    assert _load(paths.coco_file)["images"][0]["width"] == size


def test_spec_validation_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"SyntheticSpec\.colours"):
        SyntheticSpec(colours=("red", "mauve"))
    with pytest.raises(ValueError, match=r"SyntheticSpec\.captions_per_image"):
        SyntheticSpec(captions_per_image=6)
    with pytest.raises(ValueError, match=r"SyntheticSpec\.size_fractions"):
        SyntheticSpec(size_fractions=(0.3,))
    with pytest.raises(ValueError, match="distinct scene descriptions"):
        generate(
            tmp_path / "never",
            SyntheticSpec(colours=("red", "blue"), shapes=("circle", "square"), n_test_images=500),
        )
    assert not (tmp_path / "never").exists()


def test_fewer_captions_per_image(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_train_images=4, n_test_images=4, n_val_images=0, captions_per_image=2)
    paths = generate(tmp_path, spec)
    assert all(len(e["caption"]) == 2 for e in _load(paths.test_file))
    assert len(_load(paths.coco_file)["annotations"]) == 8


def test_cli_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--seed", "2", "--n-train", "6", "--n-test", "4"]
    assert main([*args, "--n-val", "0", "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "train: {'images': 6" in printed and "test: {'images': 4" in printed
    assert _load(tmp_path / "manifest.json")["spec"]["image_size"] == 48


def test_relational_captions_state_both_objects_and_the_relation() -> None:
    from model.data.synthetic import scene_captions

    left = SceneObject("red", "circle", "small")
    right = SceneObject("blue", "square", "large")
    scene = Scene(objects=(left, right), axis="horizontal")
    rng = np.random.default_rng(0)
    for _ in range(20):
        captions, main_triple = scene_captions(scene, 5, rng, style="relational")
        assert captions[0] == relation_caption(*main_triple)  # sizes in the main caption only
        for k, caption in enumerate(captions):
            words = caption.split()
            for obj in (left, right):
                assert obj.colour in words and obj.shape in words
            # Templates 0-2 name the subject first, 3-4 the reference object first; the
            # subject stands in the stated relation to the other (red circle is the left one).
            colours = [w for w in words if w in ("red", "blue")]
            subject = colours[0] if k < 3 else colours[1]
            relation = "left" if "left" in words else "right"
            assert subject == ("red" if relation == "left" else "blue"), caption
        for caption in captions[1:]:
            assert "small" not in caption.split() and "large" not in caption.split()


def test_caption_style_is_validated_and_part_of_the_cache_key() -> None:
    with pytest.raises(ValueError, match="caption_style"):
        SyntheticSpec(caption_style="poetic")
    assert SyntheticSpec(caption_style="relational").hash() != SyntheticSpec().hash()


def test_no_single_object_scenes_when_asked() -> None:
    spec = SyntheticSpec(n_train_images=50, n_test_images=10, n_val_images=0,
                         single_object_fraction=0.0)
    assert all(len(s.objects) == 2 for s in sample_train_scenes(spec))
    assert all(len(s.objects) == 2 for s in sample_eval_scenes(spec)[0])
