"""Grad-CAM localisation against object boxes: the pointing game, in-box mass, the boxes file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.build import build_objective
from model.data.synthetic import SyntheticSpec, generate
from model.data.tokenizer import TextTokenizer
from model.data.transforms import build_transform
from model.engine.data import special_ids
from model.evaluation.localisation import (
    inside_boxes,
    load_box_items,
    localisation_scores,
    patch_centres,
    pointing_and_mass,
)
from tests.tiny import tiny_config

# A 4x4 grid of 8 px patches (32 px image): centres at 4, 12, 20, 28 on each axis.
CENTRES = patch_centres(4, 8)
TOP_LEFT_BOX = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # holds patches 0, 1, 4, 5


def _map(values: dict[int, float]) -> torch.Tensor:
    m = torch.zeros(1, 16)
    for index, value in values.items():
        m[0, index] = value
    return m


def test_patch_centres_are_row_major() -> None:
    assert CENTRES[0].tolist() == [4.0, 4.0]
    assert CENTRES[1].tolist() == [12.0, 4.0]  # next column, same row
    assert CENTRES[4].tolist() == [4.0, 12.0]  # next row
    inside = inside_boxes(TOP_LEFT_BOX, CENTRES)
    assert inside[0].nonzero().flatten().tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("values, hit", [
    ({5: 1.0, 15: 0.5}, True),            # peak inside
    ({15: 1.0, 5: 0.5}, False),           # peak outside
    ({0: 1.0, 5: 1.0}, True),             # tie, every peak patch inside
    ({0: 1.0, 15: 1.0}, False),           # tie with a patch outside: not a win
    ({}, False),                          # all-zero map
])
def test_pointing_game(values: dict[int, float], hit: bool) -> None:
    inside = inside_boxes(TOP_LEFT_BOX, CENTRES)
    hits, _ = pointing_and_mass(_map(values), inside)
    assert bool(hits[0]) is hit


def test_mass_share_is_the_in_box_fraction() -> None:
    inside = inside_boxes(TOP_LEFT_BOX, CENTRES)
    _, mass = pointing_and_mass(_map({0: 1.0, 5: 2.0, 15: 1.0}), inside)
    assert mass[0].item() == pytest.approx(3.0 / 4.0)
    _, zero = pointing_and_mass(_map({}), inside)
    assert zero[0].item() == 0.0


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    spec = SyntheticSpec(n_train_images=8, n_test_images=12, n_val_images=0)
    return generate(tmp_path_factory.mktemp("synth"), spec)


def test_boxes_file_holds_every_object_and_its_pixels(small_set) -> None:
    from PIL import Image

    items = load_box_items(small_set.boxes_file)
    assert len(items) == 12
    for item in items:
        pixels = np.asarray(Image.open(small_set.root / item["image"]), dtype=float)
        for obj in item["objects"]:
            assert obj["colour"] in item["caption"] and obj["shape"] in item["caption"]
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            # The object's colour is denser inside its box than in the whole image.
            from model.data.synthetic import PALETTE

            colour = np.asarray(PALETTE[obj["colour"]], dtype=float)
            near = np.linalg.norm(pixels - colour, axis=2) < 60
            box = near[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            assert box.mean() > 2 * near.mean() or near.mean() > 0.5


def test_bad_boxes_file_names_the_item(tmp_path) -> None:
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "x", "objects": [{"box": [1]}]}]))
    with pytest.raises(ValueError, match="item 0"):
        load_box_items(path)


def test_localisation_scores_run_on_a_model_and_leave_no_gradients(small_set) -> None:
    tokenizer = TextTokenizer.from_vocab_file(small_set.vocab_file)
    cfg = tiny_config(f"model.text.vocab_size={tokenizer.vocab_size}")
    torch.manual_seed(0)
    obj = build_objective(cfg, special_ids(tokenizer), seed=0)
    items = load_box_items(small_set.boxes_file)
    scores = localisation_scores(obj.student, items, build_transform("test", 32),
                                 small_set.root, tokenizer, "cpu", layer=1, patch_size=8,
                                 batch_size=5)
    assert set(scores) == {"loc/pointing", "loc/mass", "loc/pointing_colour",
                           "loc/pointing_shape"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert all(p.grad is None for p in obj.parameters())
    obj.train()
    localisation_scores(obj.student, items[:2], build_transform("test", 32), small_set.root,
                        tokenizer, "cpu", layer=1, patch_size=8)
    assert obj.student.training  # eval mode is restored
