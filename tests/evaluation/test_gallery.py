"""The Grad-CAM gallery (model/evaluation/gallery.py, model/cli/gallery.py): library and CLI;
the PNG is looked at.

A tiny model is trained for a few steps with the real trainer on a small synthetic set (so the
CLI has a real run directory); the gallery PNG is read back with matplotlib and its panels are
compared with the arrays the library returns: per-word heat differs between words, the overlay
and the image panel are what the recipe says, and the mask panel is the soft mask in [0, 1].
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from PIL import Image

from model.cli import gallery as gallery_cli
from model.config.experiment import load_experiment
from model.data.synthetic import SyntheticSpec, generate
from model.data.transforms import build_transform
from model.engine.train import train
from model.evaluation import gallery
from model.evaluation.gallery import CAPTION_H, LABEL_H, PAD, gradcam_gallery, overlay
from model.method.gradcam import gradcam_maps, minmax_normalise
from tests.tiny import stop_training_after

PANEL = 128
TRAIN_STEPS = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run directory: tiny preset, small synthetic set, a few steps, checkpoint.pt."""
    root = tmp_path_factory.mktemp("vis_run")
    cfg = load_experiment(preset="tiny", sets=[
        f"data.cache_dir={root / 'cache'}",
        "data.synthetic.n_train_images=64",
        "data.synthetic.n_test_images=16",
        "train.batch_size=16",
        "model.queue_size=64",
        "data.num_workers=0",
        "softmask.mode=gradcam",
    ])
    torch.manual_seed(0)
    with stop_training_after(TRAIN_STEPS):
        _summary, trainer = train(cfg, root / "run", progress=False, device="cpu")
    from model.engine.data import build_tokenizer

    return {"dir": root / "run", "cfg": cfg, "student": trainer.objective.student,
            "tokenizer": build_tokenizer(trainer.sources), "sources": trainer.sources}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """First caption of the first images of a separately generated small test split."""
    paths = generate(tmp_path_factory.mktemp("vis_synth"),
                     SyntheticSpec(n_train_images=64, n_test_images=8, n_val_images=0))
    entries = json.loads(paths.test_file.read_text())[:3]
    images = [Image.open(paths.root / e["image"]).convert("RGB") for e in entries]
    return images, [e["caption"][0] for e in entries]


def _panel(png: np.ndarray, box) -> np.ndarray:
    top, left, bottom, right = box
    return png[top:bottom, left:right, :3].astype(np.float64)


def _expected_size(rows: int, columns: int) -> tuple[int, int]:
    return (PAD + rows * (CAPTION_H + LABEL_H + PANEL + PAD), PAD + columns * (PANEL + PAD))


def test_gallery_png_shows_per_word_maps_and_the_mask(run, pairs, tmp_path) -> None:
    student, tok, cfg = run["student"], run["tokenizer"], run["cfg"]
    images, captions = pairs
    captions = [*captions, ""]  # a caption without any real word: [CLS] fallback, no word panel
    images = [*images, images[0]]
    student.train()
    params = dict(student.named_parameters())
    for p in params.values():
        p.grad = None
    params["itm_head.weight"].grad = torch.ones_like(params["itm_head.weight"])
    out = tmp_path / "gallery.png"
    res = gradcam_gallery(student, tok, images, captions, build_transform("test", 32),
                          layer=cfg.softmask.layer, out_path=out, panel_size=PANEL)

    # side effects: none on the model
    assert student.training, "the model's mode must be restored"
    assert torch.equal(params["itm_head.weight"].grad, torch.ones_like(params["itm_head.weight"]))
    assert all(p.grad is None for n, p in params.items() if n != "itm_head.weight")

    # the file, its pixel size and layout
    assert out.is_file() and res.path == out
    png = mpimg.imread(out)
    assert png.shape[:2] == res.size
    longest = max(len(c.split()) for c in captions)
    assert res.n_columns == 2 + longest
    assert res.size == _expected_size(len(captions), res.n_columns)
    assert res.grid == (4, 4)

    for r, (row, image) in enumerate(zip(res.rows, images, strict=True)):
        assert row.words == captions[r].split(), "every word of the caption gets a panel"
        assert row.maps.shape == (len(row.words), 4, 4)
        assert row.heat.shape == (len(row.words), PANEL, PANEL)
        assert 0.0 <= row.itm_score <= 1.0
        # the image panel is the image, upscaled for display
        shown = np.asarray(image.resize((PANEL, PANEL), Image.Resampling.BICUBIC)) / 255.0
        np.testing.assert_allclose(_panel(png, res.panel_box(r, 0)), shown, atol=1.5 / 255)
        # the mask panel: greyscale, in [0, 1], block-constant = the soft mask of the chosen word
        mask_px = _panel(png, res.panel_box(r, res.mask_column))
        assert np.array_equal(mask_px[..., 0], mask_px[..., 1])
        assert np.array_equal(mask_px[..., 0], mask_px[..., 2])
        assert row.mask.shape == (4, 4)
        assert row.mask.min() >= 0.0 and row.mask.max() <= 1.0
        blocks = mask_px[..., 0].reshape(4, PANEL // 4, 4, PANEL // 4).mean(axis=(1, 3))
        np.testing.assert_allclose(blocks, row.mask, atol=1.0 / 255)
        if not row.words:
            assert row.mask_word == -1
            continue
        # per-word maps differ between words of the same caption (arrays and PNG panels)
        assert len(row.words) >= 2
        diffs = [np.abs(row.heat[0] - row.heat[k]).max() for k in range(1, len(row.words))]
        assert max(diffs) > 0.02, diffs
        assert not np.allclose(row.maps[0], row.maps[-1], rtol=1e-3, atol=0)
        k = 1 + int(np.argmax(diffs))
        first = _panel(png, res.panel_box(r, res.word_column(0)))
        other = _panel(png, res.panel_box(r, res.word_column(k)))
        assert np.abs(first - other).max() > 0.05
        # each word panel is the ALBEF overlay of its heat, as written
        for w in range(len(row.words)):
            panel = _panel(png, res.panel_box(r, res.word_column(w)))
            np.testing.assert_allclose(panel, overlay(shown, row.heat[w]), atol=2.5 / 255)
            assert 0.0 <= row.heat[w].min() and row.heat[w].max() <= 1.0
            assert row.heat[w].max() == pytest.approx(1.0) and row.heat[w].min() == 0.0
        # the mask is 1 - minmax(map of the chosen word): black on its most attended patch
        chosen = row.maps[row.mask_word].reshape(-1)
        expected = 1.0 - minmax_normalise(torch.from_numpy(chosen)[None])[0].numpy()
        np.testing.assert_allclose(row.mask.reshape(-1), expected, atol=1e-6)
        assert row.mask.reshape(-1)[chosen.argmax()] == 0.0 and row.mask.max() == 1.0


def test_gallery_maps_equal_the_training_computation(run, pairs, tmp_path) -> None:
    """The gallery's maps are gradcam_maps of the positive pass, as in the training step."""
    student, tok, cfg = run["student"], run["tokenizer"], run["cfg"]
    images, captions = pairs
    layer = cfg.softmask.layer
    res = gradcam_gallery(student, tok, images, captions, build_transform("test", 32),
                          layer=layer, out_path=tmp_path / "g.png", mask_word=1, blur=False)
    transform = build_transform("test", 32)
    x = torch.stack([transform(im) for im in images])
    t = tok(captions, max_length=30)
    student.eval()
    try:
        img = student.encode_image(x)
        txt = student.encode_text(t["input_ids"], t["attention_mask"])
        pos = student.fuse(txt.states, t["attention_mask"], img.tokens, attn_layer=layer)
        maps = gradcam_maps(student.itm_logits(pos.hidden), pos.cross_attn, t["attention_mask"])
    finally:
        student.train()
    for b, row in enumerate(res.rows):
        ref = maps[b, row.positions].reshape(len(row.positions), 4, 4).numpy()
        np.testing.assert_allclose(row.maps, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
        assert row.mask_word == 1
        assert row.words[1] == captions[b].split()[1]


def test_cli_end_to_end(run, tmp_path) -> None:
    run_dir = run["dir"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint.pt").is_file()
    out = tmp_path / "cli.png"
    res = gallery_cli.main(["--run-dir", str(run_dir), "--n", "3", "--out", str(out)])
    assert out.is_file()
    png = mpimg.imread(out)
    assert png.shape[:2] == res.size == _expected_size(3, res.n_columns)
    # the first pairs of the evaluation split, first caption each
    test_file = run["sources"].eval_file
    entries = json.loads(Path(test_file).read_text())[:3]
    assert [r.caption for r in res.rows] == [e["caption"][0] for e in entries]
    assert res.layer == run["cfg"].softmask.layer
    # weights come from the checkpoint: same maps as the in-memory trained student
    ref = gradcam_gallery(run["student"], run["tokenizer"],
                          [Image.open(run["sources"].image_root / e["image"]) for e in entries],
                          [e["caption"][0] for e in entries], build_transform("test", 32),
                          layer=res.layer, out_path=tmp_path / "ref.png")
    for a, b in zip(res.rows, ref.rows, strict=True):
        np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-12)

    # explicit pairs, explicit checkpoint, default output path, options
    image = run["sources"].image_root / entries[0]["image"]
    res2 = gallery_cli.main(["--run-dir", str(run_dir), "--checkpoint",
                           str(run_dir / "checkpoint.pt"), "--image", str(image), "--caption",
                           "a red circle", "--image", str(image), "--caption",
                           "a large blue square above a small red circle", "--mask-word", "2",
                           "--no-blur", "--panel-size", "64", "--layer", "0"])
    assert res2.path == run_dir / "gradcam_gallery.png" and res2.path.is_file()
    assert [r.words for r in res2.rows] == [["a", "red", "circle"],
                                            "a large blue square above a small red circle".split()]
    assert [r.mask_word for r in res2.rows] == [2, 2] and res2.layer == 0
    assert mpimg.imread(res2.path).shape[:2] == res2.size
    with pytest.raises(SystemExit):
        gallery_cli.main(["--run-dir", str(run_dir), "--image", str(image)])
    with pytest.raises(SystemExit, match=r"\.png"):  # not a PNG file name: refused, not written
        gallery_cli.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "figure")])
    assert not (tmp_path / "figure").exists()


def _magenta(path: Path) -> np.ndarray:
    png = mpimg.imread(path)[..., :3]
    return (png[..., 0] > 0.95) & (png[..., 1] < 0.05) & (png[..., 2] > 0.95)


def test_cli_draws_the_ground_truth_boxes_of_synthetic_pairs(run, tmp_path) -> None:
    out = tmp_path / "boxes.png"
    res = gallery_cli.main(["--run-dir", str(run["dir"]), "--n", "2", "--out", str(out),
                          "--no-blur"])
    magenta = _magenta(out)
    assert magenta.any()
    # Outlines on every panel of both rows (image, one per word, mask).
    for r in range(2):
        for c in range(res.n_columns):
            top, left, bottom, right = gallery._panel_box(r, c, res.panel_size)
            assert magenta[top:bottom + 1, left:right + 1].any(), (r, c)
    # Pairs given on the command line have no boxes.
    image = run["sources"].image_root / json.loads(
        Path(run["sources"].eval_file).read_text())[0]["image"]
    plain = tmp_path / "plain.png"
    gallery_cli.main(["--run-dir", str(run["dir"]), "--image", str(image), "--caption",
                    "a red circle", "--out", str(plain), "--no-blur"])
    assert not _magenta(plain).any()


@pytest.mark.slow
def test_cli_as_a_module(run, tmp_path) -> None:
    """``python -m model.cli.gallery`` in a fresh interpreter (import cost: marked slow)."""
    out = tmp_path / "module.png"
    proc = subprocess.run(
        [sys.executable, "-m", "model.cli.gallery", "--run-dir", str(run["dir"]), "--n",
         "2", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "wrote" in proc.stdout
