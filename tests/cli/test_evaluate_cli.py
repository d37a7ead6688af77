"""``python -m model.cli.evaluate``: any checkpoint (ours full / slim, official ALBEF
pre-training or retrieval format) under a protocol, end to end at tiny size, with loud
protocol/kind checks."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from ablations.grid import PROTOCOLS_FILE
from model.checkpoints import infer_text_layers, ours_to_albef
from model.cli.evaluate import main, rebase_data_paths
from model.config.experiment import load_experiment
from model.config.protocols import load_protocols, stage_config
from model.engine.data import resolve_sources
from model.engine.train import train
from model.evaluation.checkpoint import file_sha256
from model.release import export_release
from tests.tiny import tiny_grid_sets

RECALLS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path
                ) -> dict[str, Path]:
    """A (briefly) pre-trained tiny run and a (briefly) COCO-fine-tuned stage of it, plus the
    same models as slim / official-ALBEF files."""
    root = tmp_path_factory.mktemp("eval_cli")
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "train.max_steps=2"])
    _, tr = train(cfg, root / "pre", progress=False)
    pre = root / "pre" / "checkpoint.pt"
    ft_cfg = stage_config(cfg, "coco_finetune", pre, load_protocols(PROTOCOLS_FILE),
                          sets=["train.max_steps=2"])
    _, ft_tr = train(ft_cfg, root / "ft", progress=False)
    ft = root / "ft" / "checkpoint.pt"
    official_pre = root / "ALBEF_pretrain.pth"
    state = tr.objective.state_dict()
    torch.save({"model": ours_to_albef(state, infer_text_layers(state), "pretrain"),
                "epoch": 29}, official_pre)
    ft_state = ft_tr.objective.state_dict()
    official_ft = ours_to_albef(ft_state, infer_text_layers(ft_state), "retrieval")
    official_coco = root / "mscoco.pth"  # as released: ALBEF's retrieval config inside
    torch.save({"model": official_ft, "config": {"train_file": ["data/coco_train.json"],
                                                 "image_res": 384, "k_test": 256}}, official_coco)
    official_bare = root / "retrieval_bare.pth"
    torch.save({"model": official_ft}, official_bare)
    slim = root / "release.pt"
    export_release(ft, slim, "ours")
    return {"pre": pre, "pre_dir": root / "pre", "ft": ft, "ft_dir": root / "ft",
            "official_pre": official_pre, "official_coco": official_coco,
            "official_bare": official_bare, "slim": slim, "root": root}


def _run(args: list[str], out: Path) -> tuple[int, dict, str]:
    rc = main([*args, "--out", str(out), "--device", "cpu"])
    result = json.loads((out / "result.json").read_text()) if rc in (0, 3) else {}
    table = (out / "table.md").read_text() if rc in (0, 3) else ""
    return rc, result, table


def test_our_finetuned_checkpoint_writes_the_table_with_provenance(
        checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rc, result, table = _run(["--checkpoint", str(checkpoints["ft"]),
                                  "--protocol", "coco_finetune"], tmp_path / "ours")
    assert rc == 0 and result["warnings"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "model.cli.evaluate"]
    prov = result["provenance"]
    assert prov["checkpoint"] == str(checkpoints["ft"].resolve())
    assert prov["checkpoint_sha256"] == file_sha256(checkpoints["ft"])
    assert prov["checkpoint_format"] == "ours"
    assert prov["checkpoint_container"] == "training checkpoint (ours)"
    assert prov["checkpoint_stage"] == "fine-tuned on coco"
    assert prov["config_source"] == "config recorded in checkpoint.pt"
    assert (prov["image_size"], prov["k_test"], prov["n_images"], prov["n_texts"]) == (
        48, 16, 16, 80)
    assert prov["images_found"] == prov["images_listed"] == 16
    assert prov["scoring"] == "itc top-k, then raw ITM logit" and prov["split"] == "test.json"
    assert prov["split_name"] == "COCO 5K test"
    # The 48 px model was built from the 48 px checkpoint: nothing to interpolate.
    assert prov["pos_embed_interpolated"] == []
    # Paper rows (quoted) next to ours, in the paper's TR/IR R@1/5/10 layout.
    assert "| TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 |" in table
    assert "| ALBEF (4M) | quoted from the paper | 73.1 | 91.4 | 96.0 | 56.8 | 81.5 | 89.2 |" \
        in table
    assert "| SoftMask++ (4M) | quoted from the paper | 76.6 |" in table
    assert "ours: checkpoint.pt (fine-tuned on coco) | this evaluation" in table
    assert "SYNTHETIC stand-in" in table and "WARNING" not in table
    rows = list(csv.DictReader((tmp_path / "ours" / "table.csv").open()))
    assert [r["source"] for r in rows] == ["quoted from the paper"] * 2 + ["this evaluation"]
    assert float(rows[2]["TR@1"]) == result["metrics"]["TR@1"]


def test_slim_and_official_files_of_the_same_model_give_the_same_numbers(
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    _, ours, _ = _run(["--checkpoint", str(checkpoints["ft"]), "--protocol", "coco_finetune"],
                      tmp_path / "ours")
    rc, slim, _ = _run(["--checkpoint", str(checkpoints["slim"]), "--protocol", "coco_finetune"],
                       tmp_path / "slim")
    assert rc == 0 and slim["warnings"] == []
    assert slim["provenance"]["checkpoint_container"] == "slim release (ours naming)"
    # An official retrieval-format file carries ALBEF's config, not ours: --config gives ours.
    rc, official, table = _run(["--checkpoint", str(checkpoints["official_coco"]),
                                "--protocol", "coco_finetune",
                                "--config", str(checkpoints["pre_dir"])], tmp_path / "official")
    assert rc == 0 and official["warnings"] == []
    prov = official["provenance"]
    assert prov["checkpoint_format"] == "retrieval"
    assert prov["checkpoint_container"] == "ALBEF retrieval-format file"
    assert prov["checkpoint_stage"] == "fine-tuned on coco"
    for key in RECALLS:
        assert slim["metrics"][key] == ours["metrics"][key] == official["metrics"][key]


def test_official_pretrain_file_zero_shot_and_interpolated(checkpoints: dict[str, Path],
                                                            tmp_path: Path) -> None:
    rc, result, _ = _run(["--checkpoint", str(checkpoints["official_pre"]),
                          "--protocol", "coco_zeroshot",
                          "--config", str(checkpoints["pre_dir"] / "config.yaml")],
                         tmp_path / "zs")
    assert rc == 0 and result["warnings"] == []
    prov = result["provenance"]
    assert prov["checkpoint_format"] == "pretrain" and prov["checkpoint_stage"] == "pretrained"
    # 32 px pre-training grid -> the protocol's 48 px (tiny stand-in for 256 -> 384).
    assert prov["pos_embed_interpolated"] == [["visual_encoder.pos_embed", [1, 17, 64],
                                               [1, 37, 64]]]
    assert set(RECALLS) <= set(result["metrics"])


def test_zero_shot_after_coco_from_a_pretrain_checkpoint_warns_loudly(
        checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rc, result, table = _run(["--checkpoint", str(checkpoints["official_pre"]),
                                  "--protocol", "flickr_zeroshot",
                                  "--config", str(checkpoints["pre_dir"])], tmp_path / "wrong")
    assert rc == 0  # evaluated anyway, but nobody can miss it
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("FINE-TUNED ON COCO" in m and "pretrained" in m for m in messages)
    assert len(result["warnings"]) == 1
    assert "**WARNING: protocol 'flickr_zeroshot' reports a model FINE-TUNED ON COCO" in table
    # Our own pre-training checkpoint is recognised from its recorded config too.
    rc = main(["--checkpoint", str(checkpoints["pre"]), "--protocol", "flickr_zeroshot",
               "--out", str(tmp_path / "wrong2"), "--device", "cpu", "--fail-on-warning"])
    assert rc == 3
    warned = json.loads((tmp_path / "wrong2" / "result.json").read_text())["warnings"]
    assert "train.mode=pretrain" in warned[0]
    # A fine-tuned file that does not say on what: cannot be verified, said so.
    _, bare, _ = _run(["--checkpoint", str(checkpoints["official_bare"]),
                       "--protocol", "flickr_zeroshot", "--config",
                       str(checkpoints["pre_dir"])], tmp_path / "bare")
    assert "could not be verified" in bare["warnings"][0]
    # A fine-tuned model under a zero-shot-from-pre-training protocol.
    _, zs, _ = _run(["--checkpoint", str(checkpoints["ft"]), "--protocol", "coco_zeroshot"],
                    tmp_path / "zs")
    assert "not zero-shot" in zs["warnings"][0]


def test_wrong_resolution_warns(checkpoints: dict[str, Path], tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rc, result, table = _run(["--checkpoint", str(checkpoints["ft"]),
                                  "--protocol", "coco_finetune", "--set", "eval.image_size=32"],
                                 tmp_path / "res")
    assert rc == 0
    assert result["provenance"]["image_size"] == 32
    assert result["provenance"]["protocol_image_size"] == 48
    assert any("evaluated at 32 px but protocol 'coco_finetune' evaluates at 48 px"
               in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "**WARNING: evaluated at 32 px" in table


def _real_layout(checkpoints: dict[str, Path], root: Path) -> tuple[Path, list[str]]:
    """The synthetic test split laid out like docs/DATA.md (ann/ + images/), read as real
    (albef_json) data through the protocol's data/ paths and --data-root."""
    cfg = load_experiment(files=[checkpoints["pre_dir"] / "config.yaml"])
    sources = resolve_sources(cfg)
    (root / "ann").mkdir(parents=True)
    shutil.copy(sources.eval_file, root / "ann" / "coco_test.json")
    shutil.copytree(sources.image_root / "images" / "test", root / "images" / "images" / "test")
    sets = ["data.kind=albef_json", f"data.tokenizer={sources.tokenizer}",
            "data.image_root=data/images", "model.vision.image_size=48", "eval.k_test=16"]
    return root, sets


def test_real_data_layout_with_data_root(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data_root, sets = _real_layout(checkpoints, tmp_path / "DATA")
    args = ["--checkpoint", str(checkpoints["ft"]), "--protocol", "coco_finetune",
            "--data-root", str(data_root)]
    for item in sets:
        args += ["--set", item]
    rc, result, table = _run(args, tmp_path / "real")
    assert rc == 0
    prov = result["provenance"]
    assert prov["eval_file"] == str(data_root / "ann" / "coco_test.json")
    assert prov["image_root"] == str(data_root / "images")
    assert prov["data_kind"] == "albef_json" and "SYNTHETIC" not in table
    # Real data: the protocol is 384 px / k_test 256 on 5000 images, and the table says so.
    warned = " ".join(result["warnings"])
    assert "evaluated at 48 px but protocol 'coco_finetune' evaluates at 384 px" in warned
    assert "k_test=16 but protocol 'coco_finetune' uses k_test=256" in warned
    assert "the split has 16 images but the paper's COCO 5K test has 5000" in warned
    # A missing image is an error, not a silently smaller split.
    (data_root / "images" / "images" / "test" / "000003.png").unlink()
    assert main([*args, "--out", str(tmp_path / "missing"), "--device", "cpu"]) == 2


def test_rebase_data_paths_moves_only_data_prefixed_paths() -> None:
    cfg = load_experiment(preset="base", sets=["data.train_files=[data/ann/a.json, /abs/b.json]",
                                               "data.image_root=data/images",
                                               "data.eval_file=elsewhere/c.json"])
    moved = rebase_data_paths(cfg, "/datasets")
    assert moved.data.train_files == ("/datasets/ann/a.json", "/abs/b.json")
    assert moved.data.image_root == "/datasets/images"
    assert moved.data.eval_file == "elsewhere/c.json"


def test_cli_errors_are_reported(checkpoints: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(checkpoints["ft"]), "--protocol", "coco_ft",
                 "--out", str(tmp_path)]) == 2
    assert "unknown protocol 'coco_ft'" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--protocol", "coco_finetune",
                 "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
