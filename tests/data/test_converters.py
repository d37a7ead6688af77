"""Dataset converters: each public format in, ALBEF-style caption JSON out.

Every test writes a miniature copy of the real public download (same file names and JSON/TSV
structure, a few tiny generated images) and checks exact counts and split assignment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from PIL import Image

import model.data.jsonio as jsonio
from model.cli.prepare.__main__ import main as prepare_main
from model.data.jsonio import DataFileError, iter_json_array, write_json_list
from model.data.prepare import ConvertOptions
from model.data.prepare.cc3m import prepare_cc3m
from model.data.prepare.coco import prepare_coco
from model.data.prepare.combine import combine
from model.data.prepare.flickr import prepare_flickr
from model.data.prepare.sbu import prepare_sbu
from model.data.prepare.vg import prepare_vg

QUIET = ConvertOptions(show_progress=False)


def _jpeg(path: Path, shade: int = 0) -> Path:
    """Write a tiny valid JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 100, 200)).save(path, format="JPEG")
    return path


def _dump(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------
# Karpathy split fixtures (COCO and Flickr30K)
# ------------------------------------------------------------------------------------------

# (split, cocoid, number of captions): 2 train + 1 restval → train; 1 val; 2 test.
_COCO_IMAGES = [
    ("train", 9, 5),
    ("train", 25, 6),
    ("restval", 42, 5),
    ("val", 73, 5),
    ("test", 74, 5),
    ("test", 133, 7),
]


def _coco_folder(split: str) -> str:
    return "train2014" if split == "train" else "val2014"


def _coco_filename(split: str, cocoid: int) -> str:
    return f"COCO_{_coco_folder(split)}_{cocoid:012d}.jpg"


def _karpathy_coco(path: Path) -> Path:
    images = []
    for imgid, (split, cocoid, n) in enumerate(_COCO_IMAGES):
        sentences = [
            {"raw": f"A photo number {cocoid}, caption {j}.", "tokens": ["a"], "imgid": imgid}
            for j in range(n)
        ]
        images.append(
            {
                "filepath": _coco_folder(split),
                "sentids": list(range(n)),
                "filename": _coco_filename(split, cocoid),
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
    return _dump(path, {"images": images, "dataset": "coco"})


def _official_coco(tmp_path: Path, drop: int | None = None) -> list[Path]:
    """captions_{train,val}2014.json in the official COCO format (optionally lacking one id)."""
    files = []
    for folder in ("train2014", "val2014"):
        images, anns = [], []
        for split, cocoid, n in _COCO_IMAGES:
            if _coco_folder(split) != folder or cocoid == drop:
                continue
            images.append(
                {"id": cocoid, "file_name": _coco_filename(split, cocoid), "height": 8, "width": 8}
            )
            anns += [
                {"id": cocoid * 100 + j, "image_id": cocoid, "caption": f"c{j}"} for j in range(n)
            ]
        data = {"info": {}, "licenses": [], "images": images, "annotations": anns}
        files.append(_dump(tmp_path / "annotations" / f"captions_{folder}.json", data))
    return files


def test_coco_splits_counts_and_formats(tmp_path: Path) -> None:
    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    summary = prepare_coco(karpathy, tmp_path / "out", options=QUIET)

    train = _load(tmp_path / "out" / "coco_train.json")
    assert len(train) == 5 + 6 + 5  # train + restval, one entry per caption
    assert {e["image_id"] for e in train} == {"coco_9", "coco_25", "coco_42"}
    assert train[0] == {
        "image": "train2014/COCO_train2014_000000000009.jpg",
        "caption": "A photo number 9, caption 0.",
        "image_id": "coco_9",
    }
    # restval images live in val2014 but go to training.
    assert any(e["image"] == "val2014/COCO_val2014_000000000042.jpg" for e in train)

    val = _load(tmp_path / "out" / "coco_val.json")
    test = _load(tmp_path / "out" / "coco_test.json")
    assert [e["image"] for e in val] == ["val2014/COCO_val2014_000000000073.jpg"]
    assert [e["image"] for e in test] == [
        "val2014/COCO_val2014_000000000074.jpg",
        "val2014/COCO_val2014_000000000133.jpg",
    ]
    assert [len(e["caption"]) for e in test] == [5, 7]
    assert set(test[0]) == {"image", "caption"}

    pretrain = _load(tmp_path / "out" / "coco_pretrain.json")
    assert pretrain == [{"image": e["image"], "caption": e["caption"]} for e in train]
    assert summary.output("pretrain").images == 3
    assert summary.output("pretrain").captions == 16
    assert summary.output("test").captions == 12
    assert summary.stats["karpathy_restval_images"] == 1
    assert any("533,000" in note for note in summary.notes)  # paper numbers shown next to ours


def test_coco_official_cross_check_reports_and_strict_fails(tmp_path: Path) -> None:
    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    clean = prepare_coco(
        karpathy, tmp_path / "a", official=_official_coco(tmp_path), options=QUIET)
    assert clean.stats["official_missing"] == 0
    assert clean.stats["official_filename_differs"] == 0

    official = _official_coco(tmp_path, drop=74)
    summary = prepare_coco(karpathy, tmp_path / "b", official=official, options=QUIET)
    assert summary.stats["official_missing"] == 1
    with pytest.raises(DataFileError, match="cocoid 74"):
        prepare_coco(karpathy, tmp_path / "c", official=official, strict=True, options=QUIET)
    not_coco = _dump(tmp_path / "annotations" / "list.json", [])
    with pytest.raises(DataFileError, match="list.json: not a COCO captions annotation file"):
        prepare_coco(karpathy, tmp_path / "d", official=[not_coco])


def test_coco_errors_name_file_and_entry(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="dataset_coco.json.*expected an existing file"):
        prepare_coco(tmp_path / "dataset_coco.json", tmp_path / "out")
    data = _load(_karpathy_coco(tmp_path / "dataset_coco.json"))
    data["images"][2]["split"] = "training"
    bad = _dump(tmp_path / "bad.json", data)
    with pytest.raises(DataFileError, match=r"bad.json: images\[2\]\['split'\] is 'training'"):
        prepare_coco(bad, tmp_path / "out")
    del data["images"][4]["sentences"]
    data["images"][2]["split"] = "train"
    bad = _dump(tmp_path / "bad.json", data)
    with pytest.raises(DataFileError, match=r"images\[4\] has no 'sentences' key"):
        prepare_coco(bad, tmp_path / "out")
    with pytest.raises(DataFileError, match="'images' list"):
        prepare_coco(_dump(tmp_path / "list.json", []), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_coco_clean_captions_and_prefix(tmp_path: Path) -> None:
    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    prepare_coco(
        karpathy, tmp_path / "out",
        options=ConvertOptions(image_prefix="coco/", clean_captions=True, show_progress=False))
    first = _load(tmp_path / "out" / "coco_train.json")[0]
    assert first["image"] == "coco/train2014/COCO_train2014_000000000009.jpg"
    assert first["caption"] == "a photo number 9 caption 0"


def test_flickr_splits(tmp_path: Path) -> None:
    images = []
    for imgid, split in enumerate(["train", "train", "train", "val", "test"]):
        images.append(
            {
                "sentids": [0, 1],
                "imgid": imgid,
                "filename": f"{1000 + imgid}.jpg",
                "split": split,
                "sentences": [{"raw": f"dog {imgid} a", "tokens": []}, {"raw": "b", "tokens": []}],
            }
        )
    karpathy = _dump(
        tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"}
    )
    summary = prepare_flickr(karpathy, tmp_path / "out", options=QUIET)
    train = _load(tmp_path / "out" / "flickr_train.json")
    assert len(train) == 6
    assert train[0] == {
        "image": "flickr30k-images/1000.jpg",
        "caption": "dog 0 a",
        "image_id": "flickr_1000",
    }
    assert _load(tmp_path / "out" / "flickr_val.json") == [
        {"image": "flickr30k-images/1003.jpg", "caption": ["dog 3 a", "b"]}
    ]
    assert len(_load(tmp_path / "out" / "flickr_test.json")) == 1
    assert not (tmp_path / "out" / "flickr_pretrain.json").exists()
    assert [o.name for o in summary.outputs] == ["train", "val", "test"]


# ------------------------------------------------------------------------------------------
# Visual Genome
# ------------------------------------------------------------------------------------------


# VG image id → (download folder in its URL, coco_id, region phrases). Image 2 is the COCO
# Karpathy test image 133 (excluded with --exclude-coco-karpathy); image 3 is the Karpathy train
# image 9 (kept).
_VG_IMAGES: dict[int, tuple[str, int | None, list[str]]] = {
    1: ("VG_100K_2", None, ["the clock is green", "a tower", "a tower"]),
    2: ("VG_100K", 133, ["white plate", "fork"]),
    3: ("VG_100K", 9, ["man riding", "   "]),
    4: ("VG_100K_2", None, ["red bus"]),
}


def _vg_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """``region_descriptions.json`` and ``image_data.json`` in VG 1.2's format."""
    base = "https://cs.stanford.edu/people/rak248"
    image_data = [
        {"image_id": image_id, "url": f"{base}/{folder}/{image_id}.jpg", "width": 8,
         "height": 8, "coco_id": coco_id, "flickr_id": None}
        for image_id, (folder, coco_id, _) in _VG_IMAGES.items()
    ]  # fmt: skip
    regions = [
        {"id": image_id, "regions": [
            {"region_id": 10 * image_id + j, "image_id": image_id, "phrase": phrase,
             "x": 0, "y": 0, "width": 4, "height": 4}
            for j, phrase in enumerate(phrases)
        ]}
        for image_id, (_, _, phrases) in _VG_IMAGES.items()
    ]  # fmt: skip
    return (
        _dump(tmp_path / "region_descriptions.json", regions),
        _dump(tmp_path / "image_data.json", image_data),
    )


def test_vg_one_entry_per_phrase_and_coco_exclusion(tmp_path: Path) -> None:
    regions, image_data = _vg_fixture(tmp_path)
    out = tmp_path / "vg.json"
    summary = prepare_vg(regions, image_data, out, options=QUIET)
    entries = _load(out)
    assert len(entries) == 3 + 2 + 1 + 1  # the whitespace-only phrase is dropped
    assert entries[0] == {"image": "VG_100K_2/1.jpg", "caption": "the clock is green"}
    assert summary.stats["skipped_empty_captions"] == 1
    assert summary.stats["duplicate_phrases_in_image"] == 1
    assert summary.output("pretrain").images == 4

    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    summary = prepare_vg(
        regions,
        image_data,
        out,
        exclude_coco_karpathy=karpathy,
        dedupe_phrases=True, options=ConvertOptions(image_prefix="vg", show_progress=False))
    entries = _load(out)
    assert {e["image"] for e in entries} == {
        "vg/VG_100K_2/1.jpg",
        "vg/VG_100K/3.jpg",
        "vg/VG_100K_2/4.jpg",
    }
    assert len(entries) == 2 + 1 + 1
    assert summary.stats["excluded_coco_karpathy_images"] == 1
    assert summary.stats["excluded_coco_karpathy_regions"] == 2


def test_vg_with_image_dir_keeps_existing_and_searches_both_folders(tmp_path: Path) -> None:
    regions, image_data = _vg_fixture(tmp_path)
    root = tmp_path / "vg_images"
    _jpeg(root / "VG_100K" / "1.jpg")  # URL says VG_100K_2: still found in the other folder
    _jpeg(root / "VG_100K" / "2.jpg")
    _jpeg(root / "VG_100K_2" / "4.jpg")  # image 3 was not downloaded
    summary = prepare_vg(
        regions, image_data, tmp_path / "vg.json", images_dir=root, options=QUIET)
    images = {e["image"] for e in _load(tmp_path / "vg.json")}
    assert images == {"VG_100K/1.jpg", "VG_100K/2.jpg", "VG_100K_2/4.jpg"}
    assert summary.stats["missing_images"] == 1


def test_vg_bad_structure_names_entry(tmp_path: Path) -> None:
    regions, image_data = _vg_fixture(tmp_path)
    data = _load(regions)
    data[2]["regions"][1] = {"region_id": 31}
    _dump(regions, data)
    with pytest.raises(DataFileError, match=r"entry 2, regions\[1\] has no string 'phrase'"):
        prepare_vg(regions, image_data, tmp_path / "vg.json")
    assert not (tmp_path / "vg.json").exists()  # atomic: nothing half-written


# ------------------------------------------------------------------------------------------
# SBU
# ------------------------------------------------------------------------------------------


def _sbu_fixture(tmp_path: Path) -> tuple[Path, Path]:
    urls = [f"http://static.flickr.com/27{i}/43850589{i}0_b0f291553e.jpg" for i in range(5)]
    captions = ["Man on a horse ", "", "old house in the woods", "a bridge", "sunset\t"]
    url_file = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
    caption_file = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
    url_file.write_text("\n".join(urls) + "\n", encoding="utf-8")
    caption_file.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return url_file, caption_file


def test_sbu_basename_naming_keeps_only_downloaded(tmp_path: Path) -> None:
    urls, captions = _sbu_fixture(tmp_path)
    images = tmp_path / "sbu_images"
    for i in (0, 1, 3):
        _jpeg(images / "shard0" / f"43850589{i}0_b0f291553e.jpg")
    summary = prepare_sbu(urls, captions, images, tmp_path / "sbu.json", options=QUIET)
    assert _load(tmp_path / "sbu.json") == [
        {"image": "shard0/4385058900_b0f291553e.jpg", "caption": "Man on a horse"},
        {"image": "shard0/4385058930_b0f291553e.jpg", "caption": "a bridge"},
    ]
    assert summary.stats["rows"] == 5
    assert summary.stats["rows_without_image"] == 2
    assert summary.stats["skipped_empty_captions"] == 1  # row 1 has an image but no caption


def test_sbu_index_naming(tmp_path: Path) -> None:
    urls, captions = _sbu_fixture(tmp_path)
    images = tmp_path / "sbu_images"
    _jpeg(images / "0000001.jpg")  # 1-based line 1
    _jpeg(images / "00" / "0000005.jpg")
    _jpeg(images / "readme.jpg")  # not a number: ignored
    summary = prepare_sbu(
        urls,
        captions,
        images,
        tmp_path / "sbu.json",
        naming="index",
        index_base=1, options=ConvertOptions(image_prefix="sbu/", show_progress=False))
    assert _load(tmp_path / "sbu.json") == [
        {"image": "sbu/0000001.jpg", "caption": "Man on a horse"},
        {"image": "sbu/00/0000005.jpg", "caption": "sunset"},
    ]
    assert summary.output("pretrain").images == 2


def test_sbu_misaligned_files_fail(tmp_path: Path) -> None:
    urls, captions = _sbu_fixture(tmp_path)
    captions.write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "img").mkdir()
    with pytest.raises(DataFileError, match="not line-aligned.*5 lines.*has 2"):
        prepare_sbu(urls, captions, tmp_path / "img", tmp_path / "sbu.json")
    with pytest.raises(DataFileError, match="image directory not found"):
        prepare_sbu(urls, urls, tmp_path / "nowhere", tmp_path / "sbu.json")


# ------------------------------------------------------------------------------------------
# Conceptual Captions
# ------------------------------------------------------------------------------------------


def _cc3m_tsv(tmp_path: Path, header: bool = False) -> Path:
    rows = [(f"caption of row {i}", f"http://example.org/img/{i}.jpg") for i in range(6)]
    lines = (["caption\turl"] if header else []) + [f"{c}\t{u}" for c, u in rows]
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _img2dataset_sample(
    shard: Path, key: str, row: int | None, txt: bool = True, status: str = "success"
) -> None:
    _jpeg(shard / f"{key}.jpg")
    if txt:
        (shard / f"{key}.txt").write_text(f"caption of row {row}", encoding="utf-8")
    if row is not None:
        meta = {
            "url": f"http://example.org/img/{row}.jpg",
            "key": key,
            "status": status,
            "caption": f"caption of row {row}",
            "width": 8,
            "height": 8,
        }
        _dump(shard / f"{key}.json", meta)


def test_cc3m_img2dataset_layout(tmp_path: Path) -> None:
    tsv = _cc3m_tsv(tmp_path, header=True)
    root = tmp_path / "cc3m"
    _img2dataset_sample(root / "00000", "000000000", 0)
    _img2dataset_sample(root / "00000", "000000002", 2, txt=False)
    _img2dataset_sample(root / "00000", "000000003", None)  # .txt only: caption, no url
    _img2dataset_sample(root / "00000", "000000004", 4, status="failed_to_download")
    _img2dataset_sample(root / "00001", "000010000", 5)
    _jpeg(root / "00001" / "000010001.jpg")  # no side-car at all
    summary = prepare_cc3m(root, tmp_path / "cc3m_train.json", tsv=tsv, options=QUIET)
    assert _load(tmp_path / "cc3m_train.json") == [
        {"image": "00000/000000000.jpg", "caption": "caption of row 0"},
        {"image": "00000/000000002.jpg", "caption": "caption of row 2"},
        {"image": "00000/000000003.jpg", "caption": "caption of row None"},
        {"image": "00001/000010000.jpg", "caption": "caption of row 5"},
    ]
    assert summary.stats["rows"] == 6  # header line skipped
    assert summary.stats["rows_with_image"] == 3  # rows 0, 2, 5 matched through the .json url
    assert summary.stats["skipped_failed_status"] == 1
    assert summary.stats["skipped_no_caption"] == 1
    assert summary.stats["image_files"] == 6


def test_cc3m_row_index_layout(tmp_path: Path) -> None:
    tsv = _cc3m_tsv(tmp_path)
    root = tmp_path / "cc3m"
    _jpeg(root / "0.jpg")
    _jpeg(root / "sub" / "000004.jpg")
    summary = prepare_cc3m(
        root,
        tmp_path / "cc.json",
        tsv=tsv,
        layout="index", options=ConvertOptions(image_prefix="cc3m/", show_progress=False))
    assert _load(tmp_path / "cc.json") == [
        {"image": "cc3m/0.jpg", "caption": "caption of row 0"},
        {"image": "cc3m/sub/000004.jpg", "caption": "caption of row 4"},
    ]
    assert summary.stats["rows"] == 6
    assert summary.stats["rows_with_image"] == 2
    with pytest.raises(DataFileError, match="needs --tsv"):
        prepare_cc3m(root, tmp_path / "cc.json", layout="index")


def test_cc3m_bad_tsv_line_named(tmp_path: Path) -> None:
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a\thttp://x/1.jpg\nno tab here\n", encoding="utf-8")
    _jpeg(tmp_path / "cc" / "0.jpg")
    with pytest.raises(DataFileError, match="line 2 has 1 tab-separated fields"):
        prepare_cc3m(tmp_path / "cc", tmp_path / "cc.json", tsv=tsv, layout="index")


# ------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------


def _pretrain_file(path: Path, images: int, per_image: int, prefix: str) -> Path:
    rows = [
        {"image": f"{prefix}/{i}.jpg", "caption": f"c {i} {j}"}
        for i in range(images)
        for j in range(per_image)
    ]
    return _dump(path, rows)


def test_combine_counts_table_and_outputs(tmp_path: Path) -> None:
    sources = {
        "coco": [_pretrain_file(tmp_path / "coco.json", 3, 5, "coco")],
        "vg": [_pretrain_file(tmp_path / "vg.json", 2, 4, "vg")],
        "sbu": [_pretrain_file(tmp_path / "sbu.json", 4, 1, "sbu")],
        "cc3m": [
            _pretrain_file(tmp_path / "cc_train.json", 5, 1, "cc3m/train"),
            _pretrain_file(tmp_path / "cc_val.json", 1, 1, "cc3m/val"),
        ],
    }
    result = combine(sources, tmp_path / "out", show_progress=False)
    combined = _load(result.outputs["combined"])
    assert len(combined) == 15 + 8 + 4 + 6
    assert combined[0] == {"image": "coco/0.jpg", "caption": "c 0 0"}

    table = result.table.set_index("source")
    assert list(table.index) == ["coco", "vg", "sbu", "cc3m", "total"]
    assert table.loc["coco", ["images", "captions"]].tolist() == [3, 15]
    assert table.loc["cc3m", ["files", "images", "captions"]].tolist() == [2, 6, 6]
    assert table.loc["vg", ["paper_images", "paper_captions"]].tolist() == [101_000, 5_060_000]
    assert table.loc["total", ["images", "captions"]].tolist() == [15, 33]
    assert table.loc["total", "paper_images"] == 106_000 + 101_000 + 3_000_000 + 990_000
    assert table.loc["total", "paper_captions"] == 533_000 + 5_060_000 + 3_000_000 + 990_000

    csv = pd.read_csv(result.outputs["csv"])
    assert csv["captions"].tolist() == [15, 8, 4, 6, 33]
    markdown = result.outputs["markdown"].read_text(encoding="utf-8")
    assert "| total" in markdown and "paper_captions" in markdown
    manifest = yaml.safe_load(result.outputs["manifest"].read_text(encoding="utf-8"))
    assert manifest["combined_file"] == "pretrain_4m.json"
    assert len(manifest["train_files"]) == 5
    assert manifest["sources"]["cc3m"]["captions"] == 6


def test_combine_manifest_only_and_bad_entry(tmp_path: Path) -> None:
    good = _pretrain_file(tmp_path / "coco.json", 2, 2, "coco")
    result = combine({"coco": [good]}, tmp_path / "out", write_combined=False)
    assert "combined" not in result.outputs
    assert not (tmp_path / "out" / "pretrain_4m.json").exists()
    assert result.table.set_index("source").loc["total", "captions"] == 4

    bad = _dump(tmp_path / "bad.json", [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}])
    with pytest.raises(DataFileError, match="bad.json: entry 1: 'caption'"):
        combine({"vg": [bad]}, tmp_path / "out2")
    assert not (tmp_path / "out2" / "pretrain_4m.json").exists()


# ------------------------------------------------------------------------------------------
# Shared I/O and CLI
# ------------------------------------------------------------------------------------------


def test_streaming_reader_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonio, "_CHUNK_CHARS", 7)  # force refills inside strings and numbers
    rows = [{"image": f"x/{i}.jpg", "caption": "é " * i, "n": 12345678 * i} for i in range(30)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert list(iter_json_array(path)) == rows
    assert list(iter_json_array(_dump(tmp_path / "empty.json", []))) == []
    path.write_text('[{"a": 1}, {"a": 2,}]', encoding="utf-8")
    with pytest.raises(DataFileError, match="list element 1"):
        list(iter_json_array(path))
    path.write_text('[{"a": 1}] [', encoding="utf-8")
    with pytest.raises(DataFileError, match="after the closing"):
        list(iter_json_array(path))
    path.write_text('{"images": []}', encoding="utf-8")
    with pytest.raises(DataFileError, match="expected a JSON list"):
        list(iter_json_array(path))
    path.write_text('[{"a": 1}, {"a":', encoding="utf-8")
    with pytest.raises(DataFileError, match="truncated JSON in list element 1"):
        list(iter_json_array(path))


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def rows() -> Iterator[dict[str, str]]:
        yield {"image": "a.jpg", "caption": "x"}
        raise RuntimeError("boom")

    target = tmp_path / "out.json"
    target.write_text("previous", encoding="utf-8")
    with pytest.raises(RuntimeError):
        write_json_list(target, rows())
    assert target.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert write_json_list(target, iter([])) == 0
    assert _load(target) == []


def test_cli_dispatch_and_error_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    code = prepare_main(
        ["coco", "--karpathy", str(karpathy), "--out-dir", str(tmp_path / "o"), "--no-progress"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "[coco]" in out and "coco_pretrain.json" in out
    assert _load(tmp_path / "o" / "coco_val.json")[0]["image"].endswith("000000000073.jpg")

    code = prepare_main(
        [
            "sbu",
            "--urls",
            str(tmp_path / "missing.txt"),
            "--captions",
            "x",
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 2
    assert "SBU URL file not found" in capsys.readouterr().err

    code = prepare_main(
        [
            "combine",
            "--coco",
            str(tmp_path / "o" / "coco_pretrain.json"),
            "--out-dir",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "| coco" in capsys.readouterr().out


def test_cli_vg(tmp_path: Path) -> None:
    regions, image_data = _vg_fixture(tmp_path)
    karpathy = _karpathy_coco(tmp_path / "dataset_coco.json")
    args = ["vg", "--regions", regions, "--image-data", image_data, "--out", tmp_path / "vg.json",
            "--exclude-coco-karpathy", karpathy, "--image-prefix", "vg/", "--clean-captions",
            "--no-progress"]  # fmt: skip
    assert prepare_main([str(a) for a in args]) == 0
    first = _load(tmp_path / "vg.json")[0]
    assert first == {"image": "vg/VG_100K_2/1.jpg", "caption": "the clock is green"}


def test_cli_flickr(tmp_path: Path) -> None:
    flickr = {"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A b."}]}]}
    karpathy = _dump(tmp_path / "dataset_flickr30k.json", flickr)
    args = ["flickr", "--karpathy", karpathy, "--out-dir", tmp_path / "f", "--image-dir", "imgs",
            "--no-progress"]  # fmt: skip
    assert prepare_main([str(a) for a in args]) == 0
    test = _load(tmp_path / "f" / "flickr_test.json")
    assert test == [{"image": "imgs/1.jpg", "caption": ["A b."]}]


def test_cli_cc3m(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = _cc3m_tsv(tmp_path)
    _jpeg(tmp_path / "cc" / "3.jpg")
    args = ["cc3m", "--images", tmp_path / "cc", "--tsv", tsv, "--layout", "index",
            "--out", tmp_path / "cc.json", "--no-progress"]  # fmt: skip
    assert prepare_main([str(a) for a in args]) == 0
    assert "rows_with_image: 1" in capsys.readouterr().out
