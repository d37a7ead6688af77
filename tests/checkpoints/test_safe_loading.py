"""Every path that reads a checkpoint a user names refuses to unpickle code unless asked, and a
truncated checkpoint's error names the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoints import CheckpointReadError, read_checkpoint
from model.cli import gallery as gallery_cli
from model.cli.evaluate import main as evaluate_main
from model.cli.export import main as export_main
from model.engine.resume import checkpoint_path, load_checkpoint
from tests.evaluation.test_gallery import run  # noqa: F401  (module fixture: a trained tiny run directory)


class _Touch:
    """Unpickling this creates ``marker``: a stand-in for code in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def crafted(run, tmp_path: Path) -> tuple[Path, Path]:  # noqa: F811
    marker = tmp_path / "code_ran"
    payload = torch.load(checkpoint_path(run["dir"]), weights_only=False)
    payload["extra"] = _Touch(marker)
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return path, marker


def test_gallery_cli_refuses_a_crafted_pickle(run, crafted, tmp_path: Path) -> None:  # noqa: F811
    path, marker = crafted
    with pytest.raises(SystemExit, match="--trust-pickle"):
        gallery_cli.main(["--run-dir", str(run["dir"]), "--checkpoint", str(path), "--n", "1",
                        "--out", str(tmp_path / "g.png")])
    assert not marker.exists()
    gallery_cli.main(["--run-dir", str(run["dir"]), "--checkpoint", str(path), "--n", "1",
                    "--out", str(tmp_path / "g.png"), "--trust-pickle"])
    assert marker.exists()  # the opt-in really unpickles (this file is "trusted" here)


def test_evaluate_and_export_refuse_it_too(crafted, tmp_path: Path) -> None:
    path, marker = crafted
    assert evaluate_main(["--checkpoint", str(path), "--protocol", "coco_zeroshot",
                          "--preset", "tiny", "--out", str(tmp_path / "e")]) == 2
    assert export_main([str(path), str(tmp_path / "r.pt")]) == 2
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(run, tmp_path: Path) -> None:  # noqa: F811
    data = checkpoint_path(run["dir"]).read_bytes()
    bad_dir = tmp_path / "run"
    bad_dir.mkdir()
    checkpoint_path(bad_dir).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=rf"{checkpoint_path(bad_dir)}: not a readable"):
        read_checkpoint(checkpoint_path(bad_dir))
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_checkpoint(bad_dir, run["student"], None, "any")
