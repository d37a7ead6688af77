"""The paper's downstream protocol: registry, derived stage configs, pretrain -> fine-tune -> eval
at tiny size (synthetic stand-in data), pos-embed interpolation, idempotent stages."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ablations.grid import PROTOCOLS_FILE
from model.cell.pipeline import run_cell
from model.cell.stages import run_downstream
from model.config.experiment import load_experiment
from model.config.loader import ConfigError
from model.config.protocols import load_protocols, stage_config
from model.evaluation.checkpoint import describe_checkpoint
from results.paper import PAPER_PATH
from tests.tiny import tiny_grid_sets

BASE_FILE = PROTOCOLS_FILE.parent / "base.yaml"
PAPER_PROTOCOLS = {"coco_finetune", "flickr_finetune", "flickr_zeroshot", "coco_zeroshot",
                   "flickr_zeroshot_pretrained"}


# ------------------------------------------------------------------ registry and configs
def test_registry_names_the_paper_protocols_and_their_numbers() -> None:
    reg = load_protocols(PROTOCOLS_FILE, paper_file=PAPER_PATH)
    assert PAPER_PROTOCOLS <= set(reg.protocols)
    assert reg.resolve_order(["flickr_zeroshot"]) == ["coco_finetune", "flickr_zeroshot"]
    assert reg.resolve_order(["coco_finetune", "flickr_zeroshot"]) == [
        "coco_finetune", "flickr_zeroshot"]
    assert reg.expected_model("flickr_zeroshot") == ("fine-tuned", "coco")
    assert reg.expected_model("coco_zeroshot") == ("pretrained", None)
    assert reg.stage_label("flickr_finetune") == "fine-tuned on flickr"
    # docs/METHOD.md §5, quoted exactly.
    assert reg.get("coco_finetune").paper["SoftMask++"] == {
        "TR@1": 76.6, "TR@5": 93.5, "TR@10": 96.6, "IR@1": 60.2, "IR@5": 83.7, "IR@10": 90.5}
    assert reg.get("coco_finetune").paper["ALBEF"]["IR@1"] == 56.8
    assert reg.get("flickr_finetune").paper["ALBEF"]["TR@1"] == 94.3
    assert reg.get("flickr_zeroshot").paper["ALBEF"]["IR@10"] == 96.7
    assert reg.get("coco_zeroshot").paper["SoftMask++"]["TR@1"] == 72.3
    assert reg.get("vqa").paper["ViLT"] == {"test-dev": 71.3}
    assert "CVPR 2023" in reg.paper_source
    assert reg.get("coco_finetune").split_images == 5000
    assert reg.get("flickr_zeroshot").split_images == 1000
    # the rows live in the one paper file: without it the registry has none
    assert all(not p.paper for p in load_protocols(PROTOCOLS_FILE).protocols.values())


def test_every_protocol_row_of_the_paper_file_names_a_protocol() -> None:
    """The loader skips rows of protocols a (user's) protocols file does not define, so the
    project's two files are checked against each other here."""
    import yaml

    rows = yaml.safe_load(PAPER_PATH.read_text())["protocols"]
    assert set(rows) <= set(load_protocols(PROTOCOLS_FILE).protocols)
    assert {"coco_finetune", "flickr_finetune", "snli_ve", "nlvr2", "vqa"} <= set(rows)


def test_bad_paper_values_are_named_with_the_file_and_key(tmp_path: Path) -> None:
    paper = tmp_path / "paper.yaml"
    paper.write_text("protocols:\n  coco_finetune: {ALBEF: {TR@1: high}}\n")
    with pytest.raises(ConfigError) as err:
        load_protocols(PROTOCOLS_FILE, paper_file=paper)
    assert f"{paper}: protocols.coco_finetune.ALBEF: expected numbers" in str(err.value)


REGISTRY = load_protocols(PROTOCOLS_FILE)


def test_base_stage_configs_follow_albef_retrieval_recipe() -> None:
    """docs/ALBEF.md §5: 384 px, lr 1e-5 cosine to 1e-6, batch 32, test batch 64; COCO 5 epochs
    k_test 256, Flickr 10 epochs k_test 128; queue size inherited from pre-training."""
    cell = load_experiment(preset="base", base=BASE_FILE,
                           sets=["softmask.mode=gradcam", "downstream=[coco_finetune]"])
    coco = stage_config(cell, "coco_finetune", "/ckpt/pre.pt", REGISTRY)
    assert coco.train.mode == "retrieval" and coco.train.schedule == "albef_finetune"
    assert (coco.train.lr, coco.train.min_lr, coco.train.warmup_lr) == (1e-5, 1e-6, 1e-5)
    assert (coco.train.epochs, coco.train.batch_size, coco.train.max_steps) == (5, 32, None)
    assert coco.model.vision.image_size == 384 and coco.eval.image_size is None
    assert (coco.eval.k_test, coco.eval.batch_size) == (256, 64)
    assert coco.data.train_files == ("data/ann/coco_train.json",)
    assert coco.data.eval_file == "data/ann/coco_test.json"
    assert coco.data.image_root == cell.data.image_root
    assert coco.model.queue_size == cell.model.queue_size == 65536
    assert coco.train.init_from == "/ckpt/pre.pt" and coco.downstream == ()
    assert coco.softmask.mode == "gradcam"  # the cell's objective is inherited ...
    plain = stage_config(cell, "coco_finetune_plain", "/ckpt/pre.pt", REGISTRY)
    assert plain.softmask.mode == "off" and plain.loss.focal_gamma == 0  # ... unless plain
    flickr = stage_config(cell, "flickr_finetune", "/ckpt/pre.pt", REGISTRY)
    assert (flickr.train.epochs, flickr.eval.k_test) == (10, 128)
    assert flickr.data.train_files == ("data/ann/flickr_train.json",)
    zs = stage_config(cell, "flickr_zeroshot", "/ckpt/coco.pt", REGISTRY)
    assert zs.train.mode == "retrieval" and zs.data.eval_file == "data/ann/flickr_test.json"
    assert zs.eval.k_test == 128 and zs.model.vision.image_size == 384
    coco_zs = stage_config(cell, "coco_zeroshot", "/ckpt/pre.pt", REGISTRY)
    assert coco_zs.train.mode == "pretrain" and coco_zs.model.vision.image_size == 384


def test_synthetic_layers_apply_only_to_synthetic_data(synthetic_cache: Path) -> None:
    tiny = load_experiment(preset="tiny", sets=tiny_grid_sets(synthetic_cache))
    cfg = stage_config(tiny, "coco_finetune", None, REGISTRY)
    assert cfg.data.kind == "synthetic" and cfg.train.mode == "retrieval"
    assert cfg.model.vision.image_size == 48  # != 32: the pos-embed grid is interpolated
    assert cfg.eval.k_test == 16 and cfg.train.epochs == 1
    # Caller --set items come after the protocol layers.
    later = stage_config(tiny, "coco_finetune", None, REGISTRY, sets=["eval.k_test=4"])
    assert later.eval.k_test == 4


def test_bad_protocol_files_are_reported(tmp_path: Path) -> None:
    reg = load_protocols(PROTOCOLS_FILE)
    with pytest.raises(ConfigError, match="unknown protocol 'coco_ft'"):
        reg.get("coco_ft")
    bad = tmp_path / "protocols.yaml"
    bad.write_text("protocols:\n  a: {from: b, train: false, overrides: [nope.yaml], "
                   "dataset: coco, colour: red}\n  b: {from: a, train: true, overrides: [], "
                   "dataset: coco}\n")
    with pytest.raises(ConfigError) as info:
        load_protocols(bad)
    text = str(info.value)
    assert "protocols.a: unknown keys ['colour']" in text and "nope.yaml" in text
    bad.write_text("protocols:\n  a: {from: b, train: false, overrides: [], dataset: coco}\n"
                   "  b: {from: a, train: true, overrides: [], dataset: coco}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_protocols(bad)


# ------------------------------------------------------------------ end to end, tiny size
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def finished_cell(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path
                  ) -> Iterator[tuple[Path, dict, list[str]]]:
    """The paper preset's protocol at tiny size: pre-train, then coco_finetune, in one cell."""
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "downstream=[coco_finetune]"])
    run_dir = tmp_path_factory.mktemp("cell") / "run"
    logger = logging.getLogger("model.checkpoints")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_cell(cfg, run_dir, identity={"cell": "albef", "seed": 0},
                              protocols=PROTOCOLS_FILE)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    yield run_dir, result, handler.messages


def test_cell_runs_pretrain_then_finetune_and_reports_both(finished_cell) -> None:
    run_dir, result, _ = finished_cell
    assert (run_dir / "DONE").is_file() and (run_dir / "coco_finetune" / "DONE").is_file()
    assert set(result["stages"]) == {"pretrain", "coco_finetune"}
    pre, ft = result["stages"]["pretrain"], result["stages"]["coco_finetune"]
    # Headline = the last stage's numbers and provenance.
    assert result["metrics"] == ft["metrics"] and result["provenance"] == ft["provenance"]
    for stage in (pre, ft):
        assert {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"} <= set(stage["metrics"])
    assert pre["provenance"]["stage"] == "pretrained"
    prov = ft["provenance"]
    assert prov["stage"] == "fine-tuned on coco" and prov["protocol"] == "coco_finetune"
    assert prov["evaluation"] == "fine-tuned" and prov["data_kind"] == "synthetic"
    assert prov["init_from"] == str((run_dir / "checkpoint.pt").resolve())
    # A different image size than pre-training: 32 px (4x4 grid) -> 48 px (6x6 grid).
    assert pre["provenance"]["image_size"] == 32 and prov["image_size"] == 48
    assert prov["init_image_size"] == 32 and prov["pos_embed_shape"] == [1, 37, 64]
    assert prov["train_steps"] == 20  # 640 captions / batch 32, one epoch
    assert json.loads((run_dir / "result.json").read_text())["stages"].keys() == {
        "pretrain", "coco_finetune"}


def test_finetune_interpolated_pos_embed_and_recorded_retrieval_mode(finished_cell) -> None:
    run_dir, _, messages = finished_cell
    loads = [m for m in messages if "checkpoint.pt" in m and "interpolated" in m]
    assert loads, "the fine-tuning stage did not load the pre-training checkpoint"
    for key in ("student.visual_encoder.pos_embed", "teacher.visual_encoder.pos_embed"):
        assert f"interpolated {key}: (1, 17, 64) -> (1, 37, 64)" in loads[0]
    payload = torch.load(run_dir / "coco_finetune" / "checkpoint.pt", weights_only=False)
    assert payload["config"]["train"]["mode"] == "retrieval"
    assert payload["config"]["model"]["vision"]["image_size"] == 48
    assert payload["config"]["data"]["train_files"] == ["data/ann/coco_train.json"]
    assert payload["objective"]["student.visual_encoder.pos_embed"].shape == (1, 37, 64)
    assert not any(".mlm_head." in k for k in payload["objective"])
    # The file itself says what it is (the eval CLI's check relies on it).
    state = payload["objective"]
    info = describe_checkpoint(run_dir / "coco_finetune" / "checkpoint.pt", payload, state, "0")
    assert info.stage_label == "fine-tuned on coco"


def test_stages_are_idempotent_and_eval_only_stages_reuse_checkpoints(finished_cell) -> None:
    run_dir, result, _ = finished_cell
    cfg = load_experiment(files=[run_dir / "config.yaml"])
    again = run_cell(cfg, run_dir, protocols=PROTOCOLS_FILE)  # a finished cell returns its result
    assert again["metrics"] == result["metrics"]
    mtime = (run_dir / "coco_finetune" / "checkpoint.pt").stat().st_mtime
    stages = run_downstream(cfg, run_dir, run_dir / "checkpoint.pt", ["flickr_zeroshot"],
                            registry=REGISTRY)
    assert list(stages) == ["coco_finetune", "flickr_zeroshot"]
    assert stages["coco_finetune"].skipped  # DONE: not trained again
    assert (run_dir / "coco_finetune" / "checkpoint.pt").stat().st_mtime == mtime
    zs = stages["flickr_zeroshot"]
    assert not zs.trained and not zs.skipped
    assert zs.checkpoint == (run_dir / "coco_finetune" / "checkpoint.pt").resolve()
    assert zs.provenance["evaluation"] == "zero-shot"
    assert zs.provenance["stage"] == "fine-tuned on coco"
    # Same model, same (synthetic) split, same settings: the same numbers as the stage's own.
    for key in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"):
        assert zs.metrics[key] == result["stages"]["coco_finetune"]["metrics"][key]
    assert (run_dir / "flickr_zeroshot" / "DONE").is_file()
    assert (run_dir / "flickr_zeroshot" / "config.yaml").is_file()


def test_unknown_downstream_protocol_fails_before_pretraining(synthetic_cache: Path,
                                                              tmp_path: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "downstream=[coco_ft]"])
    with pytest.raises(ConfigError, match="unknown protocol 'coco_ft'"):
        run_cell(cfg, tmp_path / "run", protocols=PROTOCOLS_FILE)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert "unknown protocol" in (tmp_path / "run" / "FAILED").read_text()


# ------------------------------------------------------------------ two ranks (gloo)
def _ddp_cell(rank: int, port: int, cache: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A recipe written for two ranks (the scale-out check refuses it otherwise).
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(cache),
                                               "downstream=[flickr_zeroshot]",
                                               "train.recipe_world_size=2"])
    out = run_cell(cfg, run_dir, identity={"cell": "albef"}, device="cpu",
                   protocols=PROTOCOLS_FILE)
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_run_the_stages_and_evaluate_together(synthetic_cache: Path,
                                                        tmp_path: Path) -> None:
    """Training stages are data-parallel and every evaluation is collective (re-ranking rows
    split across ranks): nothing may wait for a rank that went elsewhere."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    mp.spawn(_ddp_cell, args=(port, str(synthetic_cache), str(run_dir)), nprocs=2, join=True)
    main = json.loads((run_dir / "rank0.json").read_text())
    assert json.loads((run_dir / "rank1.json").read_text()) == {"status": "done", "rank": 1}
    assert set(main["stages"]) == {"pretrain", "coco_finetune", "flickr_zeroshot"}
    assert main["metrics"] == main["stages"]["flickr_zeroshot"]["metrics"]
    for stage in main["stages"].values():
        assert stage["provenance"]["world_size"] == 2
    assert main["stages"]["coco_finetune"]["provenance"]["train_steps"] == 10  # 640 / (2 x 32)
