"""Preflight: annotation structure, captions and images are checked before training starts."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from model.cli.preflight import main
from model.data.preflight import (
    PRETRAIN,
    RETRIEVAL_EVAL,
    RETRIEVAL_TRAIN,
    preflight,
)


def _jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    """A small JPEG with noisy content (so truncating it cuts into the scan data)."""
    image = Image.effect_noise((size, size), 40 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _dump(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def clean_set(tmp_path: Path) -> tuple[Path, list[Path]]:
    """An image root with 6 images and one file in each annotation format."""
    root = tmp_path / "images"
    for i in range(6):
        _write(root / "coco" / f"{i}.jpg", _jpeg_bytes(i))
    pretrain = [{"image": f"coco/{i}.jpg", "caption": f"caption {i}"} for i in range(6)]
    train = [
        {"image": f"coco/{i}.jpg", "caption": f"c {i} {j}", "image_id": f"coco_{i}"}
        for i in range(4)
        for j in range(2)
    ]
    test = [{"image": f"coco/{i}.jpg", "caption": [f"a {i}", f"b {i}"]} for i in (4, 5)]
    files = [
        _dump(tmp_path / "pretrain.json", pretrain),
        _dump(tmp_path / "coco_train.json", train),
        _dump(tmp_path / "coco_test.json", test),
    ]
    return root, files


def test_clean_set_passes_with_formats_and_counts(clean_set: tuple[Path, list[Path]]) -> None:
    root, files = clean_set
    report = preflight(files, root)
    assert report.ok, report.to_markdown()
    assert [s.format for s in report.files] == [PRETRAIN, RETRIEVAL_TRAIN, RETRIEVAL_EVAL]
    pretrain, train, test = report.files
    assert (pretrain.entries, pretrain.images_listed, pretrain.images_decodable) == (6, 6, 6)
    assert (train.entries, train.captions, train.images_listed, train.images_found) == (8, 8, 4, 4)
    assert (test.entries, test.captions, test.images_checked) == (2, 4, 2)
    assert "Data preflight: OK" in report.to_markdown()


def test_missing_and_corrupt_images_are_named(
    clean_set: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, files = clean_set
    (root / "coco" / "2.jpg").unlink()  # planted missing file
    good = (root / "coco" / "4.jpg").read_bytes()
    (root / "coco" / "4.jpg").write_bytes(good[: len(good) // 2])  # planted truncated JPEG
    _write(root / "coco" / "5.jpg", b"this is not an image")  # planted garbage
    report = preflight(files[:1], root)
    assert not report.ok
    problems = {(p.index, p.image): p.problem for p in report.problems}
    assert problems[(2, "coco/2.jpg")] == "image file not found"
    assert "truncated" in problems[(4, "coco/4.jpg")]
    assert "cannot decode" in problems[(5, "coco/5.jpg")]
    stats = report.files[0]
    assert (stats.images_checked, stats.images_found, stats.images_decodable) == (6, 5, 3)
    markdown = report.to_markdown()
    assert "3 problem(s)" in markdown
    assert "coco/2.jpg" in markdown and "coco/4.jpg" in markdown
    assert str(files[0]) in markdown

    # Without decoding only the missing file is a problem.
    no_decode = preflight(files[:1], root, decode=False)
    assert [p.image for p in no_decode.problems] == ["coco/2.jpg"]
    assert no_decode.files[0].images_decodable is None


def test_truncated_images_flagged_even_if_loader_tolerates_them(
    clean_set: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, files = clean_set
    good = (root / "coco" / "1.jpg").read_bytes()
    (root / "coco" / "1.jpg").write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = preflight(files[:1], root, workers=2)
    assert [p.image for p in report.problems] == ["coco/1.jpg"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_structure_and_caption_problems(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write(root / "a.jpg", _jpeg_bytes())
    entries = [
        {"image": "a.jpg", "caption": "fine"},
        {"image": "a.jpg", "caption": "   "},
        {"image": "a.jpg", "caption": 7},
        {"caption": "no image"},
        "not an object",
        {"image": "a.jpg", "caption": []},
    ]
    bad = _dump(tmp_path / "bad.json", entries)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg", "caption": "x"}, {"image": ', encoding="utf-8")
    mixed = _dump(
        tmp_path / "mixed.json",
        [{"image": "a.jpg", "caption": "x", "image_id": "1"}, {"image": "a.jpg", "caption": "y"}],
    )
    report = preflight([bad, broken, mixed, tmp_path / "absent.json"], root, max_problems=3)
    assert not report.ok
    stats = {Path(s.file).name: s for s in report.files}
    assert stats["bad.json"].empty_captions == 1
    assert stats["bad.json"].bad_entries == 5
    assert stats["broken.json"].format == "invalid"
    assert stats["mixed.json"].format == "mixed"
    assert stats["absent.json"].format == "invalid"
    # 5 bad entries + truncated file + mixed image_id + missing file; only 3 are listed.
    assert report.problem_count == 8
    assert len(report.problems) == 3
    assert [p.index for p in report.problems] == [1, 2, 3]
    assert report.problems[0].problem == "empty caption"


def test_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    root = tmp_path / "images"
    entries = []
    for i in range(40):
        if i % 2 == 0:  # half of the images are missing
            _write(root / f"{i}.jpg", _jpeg_bytes(i, size=8))
        entries.append({"image": f"{i}.jpg", "caption": f"c {i}"})
    ann = _dump(tmp_path / "big.json", entries)
    first = preflight([ann], root, sample=10, seed=3)
    again = preflight([ann], root, sample=10, seed=3)
    other = preflight([ann], root, sample=10, seed=4)
    stats = first.files[0]
    assert (stats.images_listed, stats.images_checked) == (40, 10)
    assert stats.images_found + first.problem_count == 10
    assert [p.image for p in first.problems] == [p.image for p in again.problems]
    assert {p.image for p in first.problems} != {p.image for p in other.problems}
    assert preflight([ann], root, sample=100).files[0].images_checked == 40
    assert "10 images/file, seed 3" in first.to_markdown()


def test_missing_image_root(clean_set: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, files = clean_set
    report = preflight(files, tmp_path / "nowhere")
    assert not report.ok
    assert report.problems[0].problem == "image root is not a directory"
    assert report.files[0].images_checked == 0


def test_cli_exit_codes_and_reports(
    clean_set: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, files = clean_set
    args = [str(f) for f in files] + ["--image-root", str(root), "--sample", "3"]
    assert main(args + ["--json", str(tmp_path / "r.json")]) == 0
    assert "Data preflight: OK" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["ok"] is True

    (root / "coco" / "0.jpg").unlink()
    assert main([str(files[0]), "--image-root", str(root), "--report", str(tmp_path / "r.md")]) == 1
    assert "coco/0.jpg" in (tmp_path / "r.md").read_text(encoding="utf-8")
    assert main([str(files[0]), "--image-root", str(root), "--sample", "-1"]) == 2


def test_caption_empty_after_albefs_cleaning_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write(root / "a.jpg", _jpeg_bytes())
    path = _dump(tmp_path / "ann.json", [{"image": "a.jpg", "caption": "a dog"},
                                         {"image": "a.jpg", "caption": ["ok", "?!..."]}])
    report = preflight([path], root)
    assert not report.ok
    assert report.files[0].empty_captions == 1
    assert report.problems[0].index == 1
    assert report.problems[0].problem == "caption '?!...' is empty after ALBEF's cleaning"
