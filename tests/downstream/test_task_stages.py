"""Downstream task stages end to end at micro size: pre-train -> (TA ->) fine-tune -> evaluate,
through the grid's stage runner and ``python -m model.cli.evaluate``; protocol validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ablations.grid import PROTOCOLS_FILE
from model.cell.stages import run_downstream
from model.cli.evaluate import main as evaluate_main
from model.config.experiment import load_experiment
from model.config.loader import ConfigError
from model.config.protocols import load_protocols, validate_downstream
from model.engine.train import train
from tests.tiny import tiny_grid_sets

STAGE_SETS = ["train.max_steps=3", "train.epochs=1", "train.batch_size=8", "train.log_every=1"]
MICRO = {"synthetic": {"train": 16, "val": 6, "test": 6}, "eval_batch_size": 8,
         "ta": {"max_steps": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path):
    root = tmp_path_factory.mktemp("downstream")
    cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(synthetic_cache),
                                               "train.max_steps=2"])
    train(cfg, root / "pre", progress=False)
    return cfg, root


@pytest.fixture(scope="module")
def micro_protocols(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ablations/protocols.yaml with micro stand-ins (a copy; the override files beside it)."""
    root = tmp_path_factory.mktemp("protocols")
    shutil.copytree("ablations/protocols", root / "protocols")
    data = yaml.safe_load(Path("ablations/protocols.yaml").read_text())
    for name in ("snli_ve", "nlvr2", "vqa"):
        entry = data["protocols"][name]
        entry["task_synthetic"] = {**entry.get("task_synthetic", {}), **MICRO}
    (root / "protocols.yaml").write_text(yaml.safe_dump(data))
    return root / "protocols.yaml"


@pytest.mark.parametrize("protocol, splits", [("snli_ve", {"val", "test"}),
                                              ("nlvr2", {"dev", "test-P"}),
                                              ("vqa", {"test"})])
def test_task_stage_runs_and_its_checkpoint_evaluates_to_the_same_numbers(
        pretrained, micro_protocols: Path, protocol: str, splits: set[str],
        tmp_path: Path) -> None:
    cfg, root = pretrained
    run_dir = tmp_path / "run"
    stages = run_downstream(cfg, run_dir, root / "pre" / "checkpoint.pt", [protocol],
                            {"cell": "albef", "seed": 0}, registry=load_protocols(micro_protocols),
                            sets=STAGE_SETS)
    stage = stages[protocol]
    assert set(stage.metrics) == splits
    assert all(0.0 <= v <= 100.0 for v in stage.metrics.values())
    stage_dir = run_dir / protocol
    assert (stage_dir / "DONE").is_file()
    assert list((stage_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard, like a cell
    result = json.loads((stage_dir / "result.json").read_text())
    prov = result["provenance"]
    assert prov["data_kind"] == "synthetic" and prov["image_size"] == 48
    assert prov["init_image_size"] == 32
    assert prov["train_steps"] == (2 if protocol == "nlvr2" else 3)  # 16 pairs / batch 8
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    if protocol == "nlvr2":  # the text-assignment step ran first, at the pre-training size
        assert [r["step"] for r in rows if r.get("stage") == "ta"] == [1, 2]
        assert prov["teacher_init"] == "copy of the TA-trained student"
    else:
        assert prov["teacher_init"] == "the checkpoint's momentum weights"
    if protocol == "vqa":
        submission = json.loads((stage_dir / "vqa_result.json").read_text())
        assert all(set(p) == {"question_id", "answer"} for p in submission)
        assert len(submission) == prov["questions"] == 18  # 6 images x 3 questions
    # The saved task model, evaluated as it is through the CLI, gives the stage's numbers
    # (one epoch: the selected epoch is the last one).
    out = tmp_path / "eval"
    rc = evaluate_main(["--checkpoint", str(stage_dir / "task_checkpoint.pt"),
                        "--protocol", protocol, "--config", str(stage_dir / "config.yaml"),
                        "--protocols-file", str(micro_protocols),
                        "--out", str(out), "--device", "cpu"])
    assert rc == 0
    evaluated = json.loads((out / "result.json").read_text())
    assert evaluated["provenance"]["evaluated_as_is"] is True
    for split, value in stage.metrics.items():
        assert evaluated["metrics"][split] == pytest.approx(value)
    assert "SoftMask++" in (out / "table.md").read_text()


def test_a_rerun_skips_the_finished_stage(pretrained, micro_protocols: Path,
                                          tmp_path: Path) -> None:
    cfg, root = pretrained
    args = (cfg, tmp_path / "run", root / "pre" / "checkpoint.pt", ["snli_ve"], None)
    registry = load_protocols(micro_protocols)
    first = run_downstream(*args, registry=registry, sets=STAGE_SETS)["snli_ve"]
    mtime = (tmp_path / "run" / "snli_ve" / "task_checkpoint.pt").stat().st_mtime_ns
    again = run_downstream(*args, registry=registry, sets=STAGE_SETS)["snli_ve"]
    assert again.skipped and again.metrics == first.metrics
    assert (tmp_path / "run" / "snli_ve" / "task_checkpoint.pt").stat().st_mtime_ns == mtime


def test_task_protocol_errors_name_the_file_and_key(tmp_path: Path) -> None:
    text = Path("ablations/protocols.yaml").read_text()
    bad = tmp_path / "protocols.yaml"
    for f in Path("ablations/protocols").iterdir():
        (tmp_path / "protocols").mkdir(exist_ok=True)
        (tmp_path / "protocols" / f.name).write_text(f.read_text())
    bad.write_text(text.replace("name: ve\n", "name: vee\n").replace("k_test: 128", "k_test: 0"))
    with pytest.raises(ConfigError) as err:
        load_protocols(bad)
    message = str(err.value)
    assert "protocols.snli_ve.task" in message and "vee" in message
    assert "k_test" in message and "must be >= 1" in message


def test_real_data_task_files_are_checked_before_anything_runs() -> None:
    cfg = load_experiment(preset="tiny", sets=["data.kind=albef_json",
                                               "data.train_files=[x.json]",
                                               "downstream=[vqa]"])
    with pytest.raises(ConfigError) as err:
        validate_downstream(cfg, load_protocols(PROTOCOLS_FILE))
    message = str(err.value)
    assert "protocols.vqa.task.train_files: data/ann/vqa_train.json does not exist" in message
    assert "protocols.vqa.task.answer_list" in message


def test_official_nlvr_file_loads_through_the_key_map(pretrained, micro_protocols: Path,
                                                     tmp_path: Path) -> None:
    """An NLVR2 model saved under ALBEF's names (18-layer text_encoder, cls_head, *_m twins)
    evaluates to the same numbers as ours."""
    from model.downstream.keymap import ours_task_key_to_official

    cfg, root = pretrained
    run_dir = tmp_path / "run"
    stage = run_downstream(cfg, run_dir, root / "pre" / "checkpoint.pt", ["nlvr2"], None,
                           registry=load_protocols(micro_protocols), sets=STAGE_SETS)["nlvr2"]
    ours = torch.load(run_dir / "nlvr2" / "task_checkpoint.pt")["model"]
    official = {ours_task_key_to_official(k, cfg.model.text.text_layers): v
                for k, v in ours.items()}
    official.update({k.replace("visual_encoder", "visual_encoder_m", 1): v
                     for k, v in official.items() if k.startswith("visual_encoder.")})
    torch.save({"model": official, "epoch": 9}, tmp_path / "nlvr.pth")
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(tmp_path / "nlvr.pth"), "--protocol", "nlvr2",
                          "--config", str(run_dir / "nlvr2" / "config.yaml"),
                          "--protocols-file", str(micro_protocols),
                          "--out", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads((out / "result.json").read_text())
    assert evaluated["metrics"] == pytest.approx(stage.metrics)
    assert "official ALBEF nlvr" in evaluated["provenance"]["load_reports"][0]


def test_nlvr_fine_tunes_from_albefs_text_assignment_file(pretrained, micro_protocols: Path,
                                                         tmp_path: Path) -> None:
    """ALBEF's released TA file (18-layer text_encoder, ta_head, vision_proj / text_proj / temp,
    no momentum weights): NLVR2 starts from it and skips the TA step."""
    from model.build import build_albef
    from model.downstream.backbone import bert_config
    from model.downstream.keymap import ours_task_key_to_official
    from model.downstream.tasks import build_task_model

    cfg, _ = pretrained
    from model.checkpoints import read_state

    state, _ = read_state(pretrained[1] / "pre" / "checkpoint.pt")
    vocab = state["student.text_encoder.embeddings.word_embeddings.weight"].shape[0]
    albef = build_albef(cfg.model, vocab, 0, with_mlm=False)
    ta = build_task_model("nlvr_ta", albef, bert_config(cfg, vocab, 0))
    official = {ours_task_key_to_official(k, cfg.model.text.text_layers, ta=True): v
                for k, v in ta.state_dict().items()}
    official.update({"text_proj.weight": torch.zeros(32, 64), "text_proj.bias": torch.zeros(32),
                     "temp": torch.tensor(0.07)})
    torch.save({"model": official}, tmp_path / "pretrain_model_nlvr.pth")
    stage = run_downstream(cfg, tmp_path / "run", tmp_path / "pretrain_model_nlvr.pth",
                           ["nlvr2"], None, registry=load_protocols(micro_protocols),
                           sets=STAGE_SETS)["nlvr2"]
    prov = stage.provenance
    assert prov["ta_steps"] == 0 and prov["ta"].startswith("skipped")
    report = prov["load_reports"][0]
    assert "official ALBEF text-assignment" in report and "MISMATCH" not in report
    assert "text-assignment step's 3-way head" in report


def test_a_cells_headline_is_its_last_retrieval_stage_not_a_task() -> None:
    """A cell with downstream: [coco_finetune, snli_ve, vqa] keeps COCO's R@K as the numbers
    the ablation tables read; the task accuracies stay under its stages."""
    from types import SimpleNamespace

    from model.cell.pipeline import headline_stage

    coco = SimpleNamespace(metrics={"TR@1": 70.0, "IR@1": 55.0})
    stages = {"coco_finetune": coco, "snli_ve": SimpleNamespace(metrics={"val": 80.0}),
              "vqa": SimpleNamespace(metrics={"test": 70.0})}
    assert headline_stage(["coco_finetune", "snli_ve", "vqa"], stages) is coco
    assert headline_stage(["snli_ve", "vqa"], {k: stages[k] for k in ("snli_ve", "vqa")}) is None
