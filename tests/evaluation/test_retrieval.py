"""Retrieval evaluation (ALBEF protocol) and compositional hard-negative accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model.albef import ALBEF
from model.build import build_albef
from model.config.experiment import load_experiment
from model.data.datasets import RetrievalEvalDataset
from model.data.synthetic import SyntheticSpec, generate
from model.data.tokenizer import TextTokenizer, build_wordpiece_vocab
from model.data.transforms import build_transform
from model.evaluation import rerank
from model.evaluation.compositional import compositional_accuracy, load_negative_items, score_pairs
from model.evaluation.features import (
    RetrievalFeatures,
    eval_mode,
    extract_features,
    feature_cache_key,
    itc_scores,
)
from model.evaluation.rerank import UNSCORED, itm_match_logit, rerank_itm, rerank_itm_loop
from model.evaluation.retrieval import evaluate_retrieval, retrieval_metrics
from tests.tiny import NO_DROPOUT, tiny_objective

KEYS = ["TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "txt_r_mean", "img_r_mean", "r_mean"]
WORDS = ["red", "blue", "green", "circle", "square", "left", "right", "of", "the", "a", "above"]
VOCAB_SIZE = 60


def reference_ranks(scores: np.ndarray, targets: list[list[int]]) -> np.ndarray:
    """Direct transcription of docs/ALBEF.md §6.8: sort each row descending with numpy's argsort
    reversed, then take the smallest position of any target."""
    ranks = []
    for row, gt in zip(scores, targets, strict=True):
        order = list(np.argsort(row)[::-1])
        ranks.append(min(order.index(t) for t in gt))
    return np.array(ranks)


def multi_caption_gt(n_img: int, per_image: int) -> tuple[dict[int, list[int]], dict[int, int]]:
    img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)}
    txt2img = {t: i for i, caps in img2txt.items() for t in caps}
    return img2txt, txt2img


# ---------------------------------------------------------------------------------------------
# Metrics on hand-built matrices


def test_perfect_scores_give_100() -> None:
    img2txt, txt2img = multi_caption_gt(4, 5)
    i2t = np.array([[1.0 if txt2img[t] == i else 0.0 for t in range(20)] for i in range(4)])
    out = retrieval_metrics(i2t, i2t.T.copy(), img2txt, txt2img)
    assert list(out) == KEYS
    assert all(v == 100.0 for v in out.values())


def test_best_gt_caption_at_rank_2() -> None:
    """Image 0's five captions all sit behind two wrong ones: TR@1 misses, TR@5 hits."""
    img2txt, txt2img = multi_caption_gt(3, 5)
    i2t = np.zeros((3, 15))
    for i in range(3):
        i2t[i, img2txt[i]] = 0.5 + 0.01 * np.arange(5)
    i2t[0, [5, 10]] = [0.9, 0.8]  # two captions of other images outrank image 0's own
    t2i = np.array([[1.0 if txt2img[t] == i else 0.0 for i in range(3)] for t in range(15)])
    out = retrieval_metrics(i2t, t2i, img2txt, txt2img)
    assert out["TR@1"] == pytest.approx(200 / 3)
    assert out["TR@5"] == out["TR@10"] == 100.0
    assert out["img_r_mean"] == 100.0
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + 100.0) / 2)
    assert reference_ranks(i2t, [img2txt[i] for i in range(3)]).tolist() == [2, 0, 0]


def test_image_recall_uses_the_caption_image() -> None:
    """Caption 1 of image 0 ranks its image 3rd of 3: IR@1 loses exactly that caption."""
    img2txt, txt2img = multi_caption_gt(3, 2)
    t2i = np.eye(3)[[txt2img[t] for t in range(6)]]
    t2i[1] = [0.1, 0.5, 0.9]
    out = retrieval_metrics(np.eye(3).repeat(2, axis=1), t2i, img2txt, txt2img)
    assert out["IR@1"] == pytest.approx(500 / 6)
    assert out["IR@5"] == 100.0


def test_gt_among_unscored_cells_beyond_k() -> None:
    """k = 10 scored cells per row; ground truth left among the tied -100 cells always misses."""
    img2txt, txt2img = multi_caption_gt(4, 5)
    i2t = np.full((4, 20), UNSCORED)
    i2t[0, 10:20] = np.linspace(1, 2, 10)  # image 0: all ten scored cells are wrong
    i2t[1, 5:15] = np.linspace(1, 2, 10)   # image 1: its best caption (9) is 6th -> rank 5
    i2t[2, 10:15], i2t[2, 15:20] = 3.0, 1.0
    i2t[3, 15:20], i2t[3, 10:15] = 3.0, 1.0
    t2i = np.full((20, 4), UNSCORED)
    t2i[np.arange(20), [txt2img[t] for t in range(20)]] = 1.0
    out = retrieval_metrics(i2t, t2i, img2txt, txt2img)
    assert (out["TR@1"], out["TR@5"], out["TR@10"]) == (50.0, 50.0, 75.0)
    assert out["IR@1"] == 100.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference_with_many_ties(seed: int) -> None:
    """Random sparse -100 matrices, k = 3 < 10, so tie order among -100 cells matters."""
    rng = np.random.default_rng(seed)
    img2txt, txt2img = multi_caption_gt(8, 5)
    i2t = np.full((8, 40), UNSCORED, dtype=np.float32)
    t2i = np.full((40, 8), UNSCORED, dtype=np.float32)
    for row in i2t:
        row[rng.choice(40, 3, replace=False)] = rng.normal(size=3)
    for row in t2i:
        row[rng.choice(8, 3, replace=False)] = rng.normal(size=3)
    out = retrieval_metrics(torch.from_numpy(i2t), torch.from_numpy(t2i), img2txt, txt2img)
    tr = reference_ranks(i2t, [img2txt[i] for i in range(8)])
    ir = reference_ranks(t2i, [[txt2img[t]] for t in range(40)])
    for k in (1, 5, 10):
        assert out[f"TR@{k}"] == 100.0 * (tr < k).sum() / 8
        assert out[f"IR@{k}"] == 100.0 * (ir < k).sum() / 40


def test_metrics_reject_mismatched_shapes() -> None:
    img2txt, txt2img = multi_caption_gt(2, 2)
    with pytest.raises(ValueError, match="scores_t2i"):
        retrieval_metrics(np.zeros((2, 4)), np.zeros((2, 4)), img2txt, txt2img)


# ---------------------------------------------------------------------------------------------
# Tiny model fixtures


@pytest.fixture(scope="module")
def model() -> ALBEF:
    torch.manual_seed(0)
    net = build_albef(load_experiment(preset="tiny").model, vocab_size=VOCAB_SIZE, pad_id=0)
    return net.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    build_wordpiece_vocab([" ".join(WORDS)], path, vocab_size=VOCAB_SIZE)
    return TextTokenizer.from_vocab_file(path)


def random_captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


class FakeSplit(torch.utils.data.Dataset):
    """The RetrievalEvalDataset interface over in-memory images: 5 captions per image."""

    def __init__(self, n_images: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n_images, 3, 32, 32, generator=gen)
        self.texts = random_captions(5 * n_images, seed)
        self.img2txt, self.txt2img = multi_caption_gt(n_images, 5)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "index": index}


@pytest.fixture(scope="module")
def split() -> FakeSplit:
    return FakeSplit(12)


def loader_of(split: FakeSplit, batch: int = 5) -> list[dict[str, torch.Tensor]]:
    n = len(split)
    return [{"image": split.images[i:i + batch], "index": torch.arange(i, min(i + batch, n))}
            for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def features(model: ALBEF, split: FakeSplit, tokenizer: TextTokenizer) -> RetrievalFeatures:
    return extract_features(model, loader_of(split), split.texts, tokenizer, "cpu", text_batch=16)


# ---------------------------------------------------------------------------------------------
# Features and re-ranking


def test_features_shapes_and_padding(features: RetrievalFeatures, model: ALBEF,
                                     split: FakeSplit, tokenizer: TextTokenizer) -> None:
    assert features.image_tokens.shape == (12, 1 + 16, 64)
    assert features.text_states.shape == (60, 30, 64)
    # Padded to exactly 30; [CLS] plus one token per word (whole-word vocabulary), no [SEP].
    lengths = [1 + len(text.split()) for text in split.texts]
    assert features.text_mask.sum(1).tolist() == lengths
    assert features.text_feat.norm(dim=1).sub(1).abs().max() < 1e-5
    # Chunked text encoding equals one call over all captions; images likewise.
    whole = extract_features(model, loader_of(split, 12), split.texts, tokenizer, "cpu",
                             text_batch=60)
    for name in ("image_tokens", "image_feat", "text_states", "text_mask", "text_feat"):
        torch.testing.assert_close(getattr(whole, name), getattr(features, name),
                                   rtol=1e-5, atol=1e-5)


def test_shuffled_loader_is_rejected(model: ALBEF, split: FakeSplit, tokenizer: TextTokenizer
                                     ) -> None:
    shuffled = loader_of(split)[::-1]
    with pytest.raises(ValueError, match="index order"):
        extract_features(model, shuffled, split.texts[:4], tokenizer, "cpu")


@pytest.mark.parametrize(("batch_size", "trim"), [(1, True), (24, True), (50, True), (24, False)])
def test_batched_rerank_equals_loop(model: ALBEF, features: RetrievalFeatures,
                                    batch_size: int, trim: bool) -> None:
    """1 query per call, several per call, a size that does not divide the rows, and with the
    all-padding text columns kept or trimmed (captions here hold at most 9 of 30 tokens)."""
    sim = itc_scores(features)
    batched = rerank_itm(model, features, sim, k_test=8, batch_size=batch_size,
                         trim_padding=trim)
    loop = rerank_itm_loop(model, features, sim, k_test=8)
    for fast, ref in zip(batched, loop, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        scored = ref != UNSCORED
        assert torch.equal(fast != UNSCORED, scored)
        # Identical rankings over the scored cells (the -100 cells tie in both).
        assert torch.equal(fast.masked_fill(~scored, -1e9).argsort(dim=1, stable=True),
                           ref.masked_fill(~scored, -1e9).argsort(dim=1, stable=True))


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_deduplicated_rerank_equals_loop_and_scores_each_pair_once(
        model: ALBEF, features: RetrievalFeatures, batch_size: int, monkeypatch) -> None:
    """Each (image, caption) pair in both directions' top-k is one fusion pass; the scores,
    the scored cells and the rankings are the loop's."""
    sim = itc_scores(features)
    calls: list[int] = []
    real = rerank.itm_match_logit

    def counting(net, image, text_states, text_mask, cls_only=False):
        calls.append(text_states.shape[0])  # pairs in this fusion call
        return real(net, image, text_states, text_mask, cls_only)

    monkeypatch.setattr(rerank, "itm_match_logit", counting)
    i2t, t2i, stats = rerank.rerank_itm_dedup(model, features, sim, k_test=8,
                                                 batch_size=batch_size)
    monkeypatch.setattr(rerank, "itm_match_logit", real)
    loop = rerank_itm_loop(model, features, sim, k_test=8)
    for fast, ref in zip((i2t, t2i), loop, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        scored = ref != UNSCORED
        assert torch.equal(fast != UNSCORED, scored)
        assert torch.equal(fast.masked_fill(~scored, -1e9).argsort(dim=1, stable=True),
                           ref.masked_fill(~scored, -1e9).argsort(dim=1, stable=True))
    # Independent count: pairs in the image->text top-k or the text->image top-k (or both).
    both = (loop[0] != UNSCORED) | (loop[1] != UNSCORED).t()
    total = int((loop[0] != UNSCORED).sum() + (loop[1] != UNSCORED).sum())
    assert sum(calls) == int(both.sum()) == stats["unique_pairs"]
    assert stats["pairs"] == total
    assert stats["dedupe_share"] == pytest.approx(1 - int(both.sum()) / total)
    assert stats["dedupe_share"] > 0  # on this split many pairs are top-k both ways


def test_cls_only_fusion_gives_the_full_passes_cls_row() -> None:
    """The last layer's other rows never reach [CLS] (no later layer mixes them), so computing
    only its [CLS] row changes nothing the ITM head reads; padded captions and per-image keys /
    values included."""
    torch.manual_seed(0)
    model = tiny_objective(*NO_DROPOUT).student.eval()
    states = torch.randn(6, 9, model.fusion_encoder.layer[0].attention.self.query.in_features)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    image = torch.randn(6, 17, model.fusion_encoder.layer[0].crossattention.self.key.in_features)
    kv = model.fusion_encoder.image_keys_values(image)
    with torch.no_grad():
        full = model.fuse(states, mask, image).hidden
        cls = model.fuse(states, mask, kv, cls_only=True).hidden
    assert cls.shape == (6, 1, full.shape[-1])
    torch.testing.assert_close(cls[:, 0], full[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(full[:, 1], full[:, 0])  # the rows differ: the check can fail


def test_deduplicated_rerank_on_a_hand_built_split() -> None:
    """Two images, three captions, k = 1: image 0's best caption is 1 and caption 1's best image
    is 0, so that pair is scored once for both directions."""

    class Keys(torch.nn.Module):
        def image_keys_values(self, tokens):  # one "layer": keys = values = the tokens
            return [(tokens, tokens)]

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fusion_encoder = Keys()

        def itm_logits(self, fused):
            return fused[:, 0, :2]

        def fuse(self, states, mask, image, cls_only=False):
            keys, _ = image[0]
            out = states + keys[:, :1, :states.shape[-1]]
            return type("F", (), {"hidden": out})()

    feats = RetrievalFeatures(
        image_tokens=torch.tensor([[[0.0, 1.0]], [[0.0, 2.0]]]),
        image_feat=torch.eye(2), text_feat=torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]),
        text_states=torch.tensor([[[0.0, 10.0]], [[0.0, 20.0]], [[0.0, 30.0]]]),
        text_mask=torch.ones(3, 1, dtype=torch.long))
    sim = itc_scores(feats)  # image 0 ~ caption 1 (1.0), image 1 ~ caption 0 (1.0)
    i2t, t2i, stats = rerank.rerank_itm_dedup(Fixed(), feats, sim, k_test=1)
    assert stats == {"pairs": 5.0, "unique_pairs": 3.0, "dedupe_share": pytest.approx(0.4)}
    assert i2t[0, 1] == 21.0 and i2t[1, 0] == 12.0
    assert t2i[1, 0] == 21.0 and t2i[0, 1] == 12.0 and t2i[2, int(sim[:, 2].argmax())] > 0


def test_only_itc_top_k_cells_are_scored(model: ALBEF, features: RetrievalFeatures) -> None:
    sim = itc_scores(features)
    i2t, t2i = rerank_itm(model, features, sim, k_test=8, batch_size=32)
    top_i2t = torch.zeros_like(sim, dtype=torch.bool).scatter(1, sim.topk(8).indices, True)
    top_t2i = torch.zeros_like(sim.t(), dtype=torch.bool).scatter(1, sim.t().topk(8).indices,
                                                                  True)
    assert torch.equal(i2t != UNSCORED, top_i2t)
    assert torch.equal(t2i != UNSCORED, top_t2i)
    # A scored cell is the raw ITM class-1 logit of that pair (no ITC added).
    f = features
    expect = itm_match_logit(model, f.image_tokens[3:4], f.text_states[7:8], f.text_mask[7:8])
    if top_i2t[3, 7]:
        torch.testing.assert_close(i2t[3, 7], expect[0], rtol=1e-5, atol=1e-5)
    j = int(sim[:, 7].argmax())
    expect = itm_match_logit(model, f.image_tokens[j:j + 1], f.text_states[7:8], f.text_mask[7:8])
    torch.testing.assert_close(t2i[7, j], expect[0], rtol=1e-5, atol=1e-5)


def test_k_larger_than_candidates_scores_everything(model: ALBEF,
                                                    features: RetrievalFeatures) -> None:
    sim = itc_scores(features)
    _, t2i = rerank_itm(model, features, sim, k_test=100, batch_size=64)
    assert (t2i != UNSCORED).all()


def test_distributed_row_split_sums_to_single_process(
    model: ALBEF, features: RetrievalFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each simulated rank scores its contiguous rows; the sum equals the 1-process matrix."""
    for n_rows, world in [(12, 5), (60, 5), (7, 8), (10, 3)]:
        owned = [rerank._owned_rows(n_rows, r, world) for r in range(world)]
        assert sorted(i for rows in owned for i in rows) == list(range(n_rows))
    sim = itc_scores(features)
    single = rerank_itm(model, features, sim, k_test=8, batch_size=16)
    total = [torch.zeros_like(single[0]), torch.zeros_like(single[1])]
    for rank in range(3):
        monkeypatch.setattr(rerank, "rank_and_world", lambda r=rank: (r, 3))
        monkeypatch.setattr(rerank, "_combine", lambda scores: scores)
        part = rerank_itm(model, features, sim, k_test=8, batch_size=16)
        total = [t + p for t, p in zip(total, part, strict=True)]
    for summed, ref in zip(total, single, strict=True):
        torch.testing.assert_close(summed, ref, rtol=1e-5, atol=1e-5)


def test_eval_mode_restores_training_flags(model: ALBEF) -> None:
    model.train()
    model.text_encoder.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert model.training and model.visual_encoder.training
    assert not model.text_encoder.training
    model.eval()


def test_features_save_load_round_trip(features: RetrievalFeatures, tmp_path: Path) -> None:
    features.key = feature_cache_key("abc123", "test", 32)
    path = features.save(tmp_path / "feats.pt")
    loaded = RetrievalFeatures.load(path, key=features.key)
    assert loaded.key == "abc123_test_32px_L30"
    for name in ("image_tokens", "image_feat", "text_states", "text_mask", "text_feat"):
        assert torch.equal(getattr(loaded, name), getattr(features, name))
    with pytest.raises(ValueError, match="key"):
        RetrievalFeatures.load(path, key=feature_cache_key("other", "test", 32))
    assert feature_cache_key("h", "coco/test split", 384) == "h_coco-test-split_384px_L30"
    features.key = ""


def test_evaluate_retrieval_reports_both_scorings(
    model: ALBEF, split: FakeSplit, tokenizer: TextTokenizer, features: RetrievalFeatures,
    tmp_path: Path,
) -> None:
    report = evaluate_retrieval(model, split, tokenizer, "cpu", k_test=10, batch_size=5,
                                split="fake", cache_dir=tmp_path, checkpoint_hash="h0")
    sim = itc_scores(features)
    itc = retrieval_metrics(sim, sim.t(), split.img2txt, split.txt2img)
    assert {k: report.metrics[f"itc/{k}"] for k in KEYS} == pytest.approx(itc)
    reranked = retrieval_metrics(*rerank_itm(model, features, sim, 10), split.img2txt,
                                 split.txt2img)
    assert {k: report.metrics[k] for k in KEYS} == pytest.approx(reranked)
    prov = report.provenance
    assert prov["scoring"] == "itc top-k, then raw ITM logit"
    assert prov["itc_scoring"] == "itc cosine"
    assert (prov["k_test"], prov["split"], prov["n_images"], prov["n_texts"],
            prov["image_size"]) == (10, "fake", 12, 60, 32)
    assert prov["feature_s"] >= 0 and prov["rerank_s"] >= 0 and not prov["features_cached"]
    again = evaluate_retrieval(model, split, tokenizer, "cpu", k_test=10, batch_size=5,
                               split="fake", cache_dir=tmp_path, checkpoint_hash="h0")
    assert again.provenance["features_cached"]
    assert again.metrics == report.metrics
    assert set(report.to_dict()) == {"metrics", "provenance"}


# ---------------------------------------------------------------------------------------------
# Compositional accuracy


@pytest.fixture()
def negative_items(tmp_path: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        items.append({"image": f"{i}.png", "caption": "a red circle left of the blue square",
                      "negatives": {"colour": "a blue circle left of the red square",
                                    "shape": "a red square left of the blue circle",
                                    "relation": "a red circle right of the blue square"}})
    return items


def test_identical_negative_is_never_a_win(model: ALBEF, tokenizer: TextTokenizer,
                                           negative_items: list[dict[str, Any]],
                                           tmp_path: Path) -> None:
    for item in negative_items:
        item["negatives"] = dict.fromkeys(item["negatives"], item["caption"])
    out = compositional_accuracy(model, negative_items, build_transform("test", 32), tmp_path,
                                 tokenizer, "cpu", batch_size=2)
    assert set(out) == {f"{p}/{k}" for p in ("comp", "comp_itc")
                        for k in ("colour", "shape", "relation", "mean")}
    assert all(v == 0.0 for v in out.values())


def test_compositional_batching_and_pair_scores(model: ALBEF, tokenizer: TextTokenizer,
                                                negative_items: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    transform = build_transform("test", 32)
    del negative_items[3]["negatives"]["shape"]  # a missing kind is skipped, not counted
    one = compositional_accuracy(model, negative_items, transform, tmp_path, tokenizer, "cpu",
                                 batch_size=1)
    many = compositional_accuracy(model, negative_items, transform, tmp_path, tokenizer, "cpu",
                                  batch_size=4)
    assert one == pytest.approx(many)
    assert one["comp/mean"] == pytest.approx(
        (one["comp/colour"] + one["comp/shape"] + one["comp/relation"]) / 3)

    assert all(v in {0.0, 25.0, 50.0, 75.0, 100.0} for v in (one["comp/shape"],
                                                               one["comp_itc/shape"]))
    # score_pairs: each caption is fused with its own image only.
    image = transform(Image.open(tmp_path / "0.png").convert("RGB"))[None]
    texts = ["a red circle", "a blue square"]
    with eval_mode(model):
        itm, itc = score_pairs(model, image.repeat(1, 1, 1, 1), texts, tokenizer)
        tok = tokenizer(texts, max_length=30, padding="max_length")
        img, txt = model.encode_image(image), model.encode_text(tok["input_ids"],
                                                                tok["attention_mask"])
        ref = itm_match_logit(model, img.tokens.expand(2, -1, -1), txt.states,
                              tok["attention_mask"])
    torch.testing.assert_close(itm[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(itc[0], txt.feat @ img.feat[0], rtol=1e-5, atol=1e-5)


def test_synthetic_split_end_to_end(tmp_path: Path) -> None:
    """The real dataset class, tokenizer and negatives file of a generated synthetic set."""
    paths = generate(tmp_path, SyntheticSpec(n_train_images=1, n_test_images=8, n_val_images=0))
    tok = TextTokenizer.from_vocab_file(paths.vocab_file)
    transform = build_transform("test", 32)
    dataset = RetrievalEvalDataset(paths.test_file, paths.root, transform)
    net = build_albef(load_experiment(preset="tiny").model, tok.vocab_size, tok.pad_id)
    report = evaluate_retrieval(net, dataset, tok, "cpu", k_test=16, batch_size=4)
    assert (report.provenance["n_images"], report.provenance["n_texts"]) == (8, 40)
    assert all(0.0 <= v <= 100.0 for v in report.metrics.values())
    items = load_negative_items(paths.negatives_file)
    out = compositional_accuracy(net, items, transform, paths.root, tok, "cpu", batch_size=4)
    assert {"comp/colour", "comp/shape", "comp/relation", "comp/mean"} <= set(out)
    assert all(0.0 <= v <= 100.0 for v in out.values())


# ---------------------------------------------------------------------------------------------
# Real two-process run (gloo)


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Every rank builds the same model and features, re-ranks once alone and once split."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_albef(load_experiment(preset="tiny").model, vocab_size=VOCAB_SIZE).eval()
    gen = torch.Generator().manual_seed(1)
    with eval_mode(net):
        image = net.encode_image(torch.randn(6, 3, 32, 32, generator=gen))
        mask = torch.ones(20, 30, dtype=torch.long)
        text = net.encode_text(torch.randint(5, VOCAB_SIZE, (20, 30), generator=gen), mask)
    feats = RetrievalFeatures(image.tokens, image.feat, text.states, mask, text.feat)
    sim = itc_scores(feats)
    alone = rerank_itm(net, feats, sim, k_test=4, batch_size=8)
    alone_loop = rerank_itm_loop(net, feats, sim, k_test=4)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    try:
        split = rerank_itm(net, feats, sim, k_test=4, batch_size=8)
        looped = rerank_itm_loop(net, feats, sim, k_test=4)
    finally:
        torch.distributed.destroy_process_group()
    # The loop scores the same (query, candidates) groups in both runs: bit-identical. The
    # batched path may group queries differently per rank: equal to float tolerance.
    same = all(torch.equal(a, b) for a, b in zip(alone_loop, looped, strict=True)) and all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(alone, split, strict=True))
    Path(out_dir, f"rank{rank}").write_text("equal" if same else "different")


@pytest.mark.slow
def test_two_ranks_equal_single_process(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["equal", "equal"]


def test_reference_negatives_are_reported_but_not_averaged(
        model: ALBEF, tokenizer: TextTokenizer, negative_items: list[dict[str, Any]],
        tmp_path: Path) -> None:
    for item in negative_items:
        item["negatives"]["random"] = "a green triangle above the yellow diamond"
    out = compositional_accuracy(model, negative_items, build_transform("test", 32), tmp_path,
                                 tokenizer, "cpu", batch_size=2)
    assert "comp/random" in out and "comp_itc/random" in out
    for prefix in ("comp", "comp_itc"):
        swaps = [out[f"{prefix}/{k}"] for k in ("colour", "shape", "relation")]
        assert out[f"{prefix}/mean"] == pytest.approx(sum(swaps) / 3)
