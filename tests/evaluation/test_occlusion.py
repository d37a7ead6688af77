"""Test-time occlusion (docs/METHOD.md §6): the fill, and the metrics against an independent
recomputation on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data.transforms import build_transform
from model.evaluation.occlusion import box_pixels, occlude, occlusion_scores
from tests.tiny import SPECIAL, tiny_objective


def _scene() -> tuple[np.ndarray, list[list[float]]]:
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    image[2:6, 2:6] = 200  # object 1: pixels 2..5
    image[9:13, 9:13] = 50  # object 2
    return image, [[2.0, 2.0, 6.0, 6.0], [9.0, 9.0, 13.0, 13.0]]


def test_the_box_takes_its_surroundings_colour_and_nothing_else_changes() -> None:
    image, boxes = _scene()
    out = occlude(image, boxes, 0)
    inside = box_pixels(boxes[0], 16, 16)
    assert inside.sum() == 16 and (out[inside] == 100).all()
    assert (out[~inside] == image[~inside]).all()  # object 2 and the background untouched
    out = occlude(image, boxes, 1)
    assert (out[box_pixels(boxes[1], 16, 16)] == 100).all()


def test_the_ring_leaves_out_the_other_object() -> None:
    image, _ = _scene()
    image[6:9, 2:6] = 30  # a second object right below the first: its pixels are not "ring"
    boxes = [[2.0, 2.0, 6.0, 6.0], [2.0, 6.0, 6.0, 9.0]]
    out = occlude(image, boxes, 0)
    ring = box_pixels([0, 0, 8, 8], 16, 16) & ~box_pixels(boxes[0], 16, 16) & \
        ~box_pixels(boxes[1], 16, 16)
    expected = np.round(image[ring].mean(axis=0)).astype(np.uint8)
    assert (out[box_pixels(boxes[0], 16, 16)] == expected).all()


def _items(tmp_path: Path, n: int = 3) -> tuple[list[dict], list[str], dict, dict]:
    g = np.random.default_rng(0)
    items, texts, img2txt = [], [], {}
    words = [f"w{i}" for i in range(5, 20)]
    for i in range(n):
        pixels = g.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        caption = " ".join(g.choice(words, 4))
        items.append({"image": f"{i}.png", "caption": caption,
                      "objects": [{"colour": "a", "shape": "b", "box": [2, 2, 12, 12]},
                                  {"colour": "c", "shape": "d", "box": [18, 18, 30, 30]}]})
        img2txt[i] = [len(texts), len(texts) + 1]
        texts += [caption, " ".join(g.choice(words, 3))]
    return items, texts, img2txt, {f"{i}.png": i for i in range(n)}


class _WordTokenizer:
    """w<k> -> id k, [CLS] first, as the tiny model's vocabulary expects."""

    def __call__(self, captions, max_length, padding, truncation=True):
        rows = [[SPECIAL.cls] + [int(w[1:]) for w in c.split()] for c in captions]
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.tensor([r + [SPECIAL.pad] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != SPECIAL.pad).long()}


def test_match_drop_and_gap_equal_an_independent_recomputation(tmp_path: Path) -> None:
    items, texts, img2txt, index = _items(tmp_path)
    model = tiny_objective("model.text.hidden_dropout=0.0", "model.text.attn_dropout=0.0"
                           ).student.eval()
    view = build_transform("test", 32)
    tok = _WordTokenizer()
    got = occlusion_scores(model, items, view, tmp_path, tok, "cpu", 4, texts, img2txt, index)

    def p_match(pixels: np.ndarray, caption: str) -> float:
        t = tok([caption], 30, "longest")
        with torch.no_grad():
            img = model.encode_image(view(Image.fromarray(pixels))[None])
            txt = model.encode_text(t["input_ids"], t["attention_mask"])
            logits = model.itm_logits(model.fuse(txt.states, t["attention_mask"],
                                                 img.tokens).hidden)
        return logits.softmax(1)[0, 1].item()

    drops, clean = [], []
    for item in items:
        pixels = np.asarray(Image.open(tmp_path / item["image"]).convert("RGB"))
        boxes = [o["box"] for o in item["objects"]]
        c = p_match(pixels, item["caption"])
        clean.append(c)
        drops.append([c - p_match(occlude(pixels, boxes, k), item["caption"]) for k in (0, 1)])
    drops = np.array(drops)
    assert got["occ/match_clean"] == pytest.approx(100 * np.mean(clean), abs=1e-4)
    assert got["occ/drop"] == pytest.approx(100 * drops.mean(), abs=1e-4)
    assert got["occ/drop_gap"] == pytest.approx(100 * np.abs(drops[:, 0] - drops[:, 1]).mean(),
                                                abs=1e-4)
    assert 0.0 <= got["occ/tr1"] <= 100.0
    assert json.dumps(got)  # plain floats: they go into result.json
