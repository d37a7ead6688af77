"""Image-text retrieval evaluation with ALBEF's exact protocol (docs/ALBEF.md §6).

1. Features are computed once per (checkpoint, split): the full ViT token sequence and projected
   feature of every image, and the text-mode hidden states, mask and projected feature of every
   caption (padded/truncated to exactly 30 tokens, docs/ALBEF.md C17). They can be cached to a file.
2. ITC scores: cosine similarity of the projected features (no temperature; ranks only).
3. Re-ranking: for each query, its ``k_test`` best candidates by ITC are re-scored with the **raw
   ITM class-1 logit** of the fusion layers run on the *cached* text states (ALBEF mode
   ``fusion``, docs/ALBEF.md C19); every other cell is -100 and the ITC similarity is not added
   (docs/ALBEF.md C18). Both directions: image->text and text->image.
4. Metrics: TR@K / IR@K with ALBEF's bookkeeping (``retrieval_metrics``).

The batched re-ranker packs many (query, candidate) pairs into one fusion call; the loop
re-ranker reproduces the official one-query-per-call loop and serves as its reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from model.albef import ALBEF
from model.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# ALBEF's fill value for cells that were not re-ranked (docs/ALBEF.md §6.4).
UNSCORED = -100.0
EVAL_MAX_LENGTH = 30  # retrieval evaluation pads/truncates every caption to exactly 30 tokens
RECALL_KS = (1, 5, 10)
SCORING_RERANK = "itc top-k, then raw ITM logit"
SCORING_ITC = "itc cosine"
_FEATURE_FORMAT = 1
# Pairs scored with the ITM head: (P, 1+N, Dv) image tokens, (P, L, D) text states, (P, L) mask.
PairScorer = Callable[[Tensor, Tensor], Tensor]


class RetrievalSplit(Protocol):
    """What evaluation needs from a dataset (``model.data.datasets.RetrievalEvalDataset``)."""

    texts: list[str]
    img2txt: Mapping[int, Sequence[int]]
    txt2img: Mapping[int, int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# Metrics


def _as_numpy(scores: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(scores, Tensor):
        return scores.detach().cpu().numpy()
    return np.asarray(scores)


def _best_rank(row: np.ndarray, targets: Iterable[int]) -> int:
    """0-based position of the best-placed target in ``row`` sorted by descending score.

    Uses ALBEF's ``np.argsort(row)[::-1]`` so ties (only among -100 cells) break the same way.
    """
    order = np.argsort(row)[::-1]
    position = np.empty(order.shape[0], dtype=np.int64)
    position[order] = np.arange(order.shape[0])
    return int(position[list(targets)].min())


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    # Same arithmetic as ALBEF (count * 100 / n), so values match to the last bit.
    return {f"{prefix}@{k}": 100.0 * int((ranks < k).sum()) / len(ranks) for k in RECALL_KS}


def retrieval_metrics(
    scores_i2t: np.ndarray | Tensor,
    scores_t2i: np.ndarray | Tensor,
    img2txt: Mapping[int, Sequence[int]],
    txt2img: Mapping[int, int],
) -> dict[str, float]:
    """ALBEF's ``itm_eval`` (docs/ALBEF.md §6.8): text and image recall at 1/5/10, in percent.

    Args:
        scores_i2t: (N_img, N_txt) scores, higher is better.
        scores_t2i: (N_txt, N_img) scores.
        img2txt: image index -> its ground-truth caption indices (rank = the best of them).
        txt2img: caption index -> its image index.

    Returns:
        ``TR@1/5/10``, ``IR@1/5/10``, ``txt_r_mean``, ``img_r_mean`` and ``r_mean``.
    """
    i2t, t2i = _as_numpy(scores_i2t), _as_numpy(scores_t2i)
    n_img, n_txt = i2t.shape
    if t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i has shape {t2i.shape}, expected {(n_txt, n_img)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"ground truth covers {len(img2txt)} images / {len(txt2img)} texts but the scores "
            f"are {n_img} x {n_txt}"
        )
    tr_ranks = np.array([_best_rank(i2t[i], img2txt[i]) for i in range(n_img)])
    ir_ranks = np.array([_best_rank(t2i[j], [txt2img[j]]) for j in range(n_txt)])
    out = {**_recalls(tr_ranks, "TR"), **_recalls(ir_ranks, "IR")}
    out["txt_r_mean"] = (out["TR@1"] + out["TR@5"] + out["TR@10"]) / 3
    out["img_r_mean"] = (out["IR@1"] + out["IR@5"] + out["IR@10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ---------------------------------------------------------------------------------------------
# Features


@dataclass
class RetrievalFeatures:
    """Everything re-ranking needs, computed once per (checkpoint, split).

    Attributes:
        image_tokens: (N_img, 1+N_p, Dv) ViT output tokens, CLS first.
        image_feat: (N_img, d) unit-norm projected image CLS.
        text_states: (N_txt, L, D) text-mode hidden states (L = 30).
        text_mask: (N_txt, L) 0/1 attention mask.
        text_feat: (N_txt, d) unit-norm projected text CLS.
        key: Cache identity (``feature_cache_key``); empty when not cached.
    """

    image_tokens: Tensor
    image_feat: Tensor
    text_states: Tensor
    text_mask: Tensor
    text_feat: Tensor
    key: str = ""

    @property
    def n_images(self) -> int:
        return self.image_feat.shape[0]

    @property
    def n_texts(self) -> int:
        return self.text_feat.shape[0]

    def _tensors(self) -> dict[str, Tensor]:
        # Not dataclasses.asdict: it deep-copies every (possibly multi-GB) tensor.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "key"}

    def to(self, device: torch.device | str) -> RetrievalFeatures:
        """A copy with every tensor on ``device``."""
        return RetrievalFeatures(**{k: v.to(device) for k, v in self._tensors().items()},
                                 key=self.key)

    def save(self, path: str | Path) -> Path:
        """Write the features (on CPU) with their key; atomic, so readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FEATURE_FORMAT, "key": self.key,
                   **{k: v.cpu() for k, v in self._tensors().items()}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, key: str | None = None,
             map_location: torch.device | str = "cpu") -> RetrievalFeatures:
        """Read features written by ``save``; ``key`` (if given) must equal the stored key."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if payload.get("format") != _FEATURE_FORMAT:
            raise ValueError(f"{path}: feature file format {payload.get('format')!r}, "
                             f"expected {_FEATURE_FORMAT}; delete it to recompute")
        if key is not None and payload["key"] != key:
            raise ValueError(f"{path}: cached features have key {payload['key']!r}, "
                             f"expected {key!r}")
        payload.pop("format")
        return cls(**payload)


def feature_cache_key(checkpoint_hash: str, split: str, image_size: int,
                      max_length: int = EVAL_MAX_LENGTH) -> str:
    """Identity of cached features: checkpoint, split, image size (and text length).

    It also names the cache file, so characters outside ``[A-Za-z0-9._-]`` become ``-``.
    """
    key = f"{checkpoint_hash}_{split}_{image_size}px_L{max_length}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", key)


def state_digest(model: nn.Module) -> str:
    """A 16-hex digest of the model's state dict, for when no checkpoint hash is at hand."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; every submodule's own training flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _encode_texts(model: ALBEF, texts: Sequence[str], tokenizer: TextTokenizer,
                  device: torch.device, text_batch: int, max_length: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Text-mode states (T, L, D), masks (T, L) and features (T, d), in chunks of ``text_batch``."""
    states, masks, feats = [], [], []
    for start in range(0, len(texts), text_batch):
        tok = tokenizer(texts[start:start + text_batch], max_length=max_length,
                        padding="max_length", truncation=True)
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        out = model.encode_text(ids, mask)
        states.append(out.states)
        masks.append(mask)
        feats.append(out.feat)
    return torch.cat(states), torch.cat(masks), torch.cat(feats)


def _encode_images(model: ALBEF, image_loader: Iterable[Any], device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """ViT tokens (N, 1+N_p, Dv) and features (N, d) in loader order (must be index order)."""
    tokens, feats, seen = [], [], []
    for batch in image_loader:
        images = batch["image"] if isinstance(batch, Mapping) else batch[0]
        if isinstance(batch, Mapping) and "index" in batch:
            seen.append(torch.as_tensor(batch["index"]).reshape(-1).cpu())
        out = model.encode_image(images.to(device, non_blocking=True))
        tokens.append(out.tokens)
        feats.append(out.feat)
    if not tokens:
        raise ValueError("the image loader yielded no batches")
    # Row i of the score matrix must be image i of the split: a shuffled loader would silently
    # misalign images and ground truth.
    if seen and not torch.equal(torch.cat(seen), torch.arange(sum(f.shape[0] for f in feats))):
        raise ValueError("the image loader must yield images in index order (shuffle=False)")
    return torch.cat(tokens), torch.cat(feats)


def extract_features(model: ALBEF, image_loader: Iterable[Any], texts: Sequence[str],
                     tokenizer: TextTokenizer, device: torch.device | str, text_batch: int = 256,
                     max_length: int = EVAL_MAX_LENGTH) -> RetrievalFeatures:
    """Encode every caption and image of a split once (docs/ALBEF.md §6.1-6.2), in eval mode.

    Args:
        model: The ALBEF network, already on ``device``.
        image_loader: Yields ``{"image": (B, 3, H, W), "index": (B,)}`` (or ``(images, ...)``)
            in index order.
        texts: All captions of the split, flattened in annotation order (already cleaned).
        tokenizer: ALBEF-convention tokenizer; captions are padded/truncated to ``max_length``.
        device: Where features are computed and kept.
        text_batch: Captions per text-encoder call (ALBEF: 256).
        max_length: Caption length in tokens, [CLS] included (ALBEF: 30).
    """
    if len(texts) == 0:
        raise ValueError("extract_features got no texts")
    device = torch.device(device)
    with eval_mode(model):
        states, mask, text_feat = _encode_texts(model, texts, tokenizer, device, text_batch,
                                                max_length)
        image_tokens, image_feat = _encode_images(model, image_loader, device)
    return RetrievalFeatures(image_tokens, image_feat, states, mask, text_feat)


def itc_scores(features: RetrievalFeatures) -> Tensor:
    """(N_img, N_txt) cosine similarity of the unit-norm projected features (§6.3)."""
    return features.image_feat @ features.text_feat.t()


# ---------------------------------------------------------------------------------------------
# ITM re-ranking


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _owned_rows(n_rows: int, rank: int, world: int) -> range:
    """ALBEF's contiguous split: chunks of floor(rows / W) + 1 rows, the last one shorter."""
    step = n_rows // world + 1
    return range(min(rank * step, n_rows), min((rank + 1) * step, n_rows))


def _empty_scores(n_rows: int, n_cols: int, device: torch.device) -> tuple[Tensor, range]:
    """The score matrix of this rank: -100 in its own rows, 0 in the others.

    Combination is exact rather than ALBEF's uniform shift: rows owned by other ranks hold 0
    here, so the all-reduce sum reproduces the single-process matrix bit for bit (ALBEF fills
    every rank's matrix with -100, which shifts every cell by -100 (W - 1); same rankings).
    """
    rank, world = _world()
    rows = _owned_rows(n_rows, rank, world)
    scores = torch.zeros(n_rows, n_cols, device=device)
    scores[rows.start:rows.stop] = UNSCORED
    return scores, rows


def _combine(scores: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    return scores


def itm_match_logit(model: ALBEF, image_tokens: Tensor | Sequence[tuple[Tensor, Tensor]],
                    text_states: Tensor, text_mask: Tensor, cls_only: bool = False) -> Tensor:
    """(P, 1+N, Dv) (or per-layer image keys/values, ``image_keys_values``), (P, L, D),
    (P, L) -> (P,) raw ITM class-1 logit (docs/ALBEF.md C18). ``cls_only``: the last fusion
    layer computes only the [CLS] row the ITM head reads."""
    fused = model.fuse(text_states, text_mask, image_tokens, cls_only=cls_only).hidden
    return model.itm_logits(fused)[:, 1]


def _text_width(mask: Tensor, trim: bool) -> int:
    """Columns to keep: up to the last one any caption of the call attends to (or all)."""
    attended = mask.any(dim=0).nonzero()
    if not trim or attended.numel() == 0:
        return mask.shape[1]
    return int(attended.max()) + 1


def _pair_scorers(model: ALBEF, f: RetrievalFeatures, trim: bool
                  ) -> tuple[PairScorer, PairScorer]:
    """Scorers of (query ids (P,), candidate ids (P,)) -> (P,) for i2t and t2i.

    With ``trim``, text columns that no caption of the call attends to are dropped before the
    fusion layers. The [CLS] output is unchanged: padded positions are masked as keys (their
    -10000 bias underflows to an exact 0 weight), and as queries they only feed their own rows.
    """
    def i2t(q: Tensor, c: Tensor) -> Tensor:
        w = _text_width(f.text_mask[c], trim)
        return itm_match_logit(model, f.image_tokens[q], f.text_states[c, :w],
                               f.text_mask[c, :w])

    def t2i(q: Tensor, c: Tensor) -> Tensor:
        w = _text_width(f.text_mask[q], trim)
        return itm_match_logit(model, f.image_tokens[c], f.text_states[q, :w],
                               f.text_mask[q, :w])

    return i2t, t2i


def _rerank_direction(sim: Tensor, k: int, queries_per_call: int, score: PairScorer) -> Tensor:
    """Fill each owned row's top-k cells by ``sim`` (Q, C) with ``score``; -100 elsewhere."""
    scores, rows = _empty_scores(*sim.shape, device=sim.device)
    for start in range(rows.start, rows.stop, queries_per_call):
        query = torch.arange(start, min(start + queries_per_call, rows.stop), device=sim.device)
        top = sim[query].topk(k, dim=1).indices  # (q, k)
        logits = score(query.repeat_interleave(k), top.reshape(-1)).view(top.shape)
        scores[query[:, None], top] = logits
    return _combine(scores)


def rerank_itm(model: ALBEF, features: RetrievalFeatures, sim: Tensor, k_test: int,
               batch_size: int = 256, trim_padding: bool = True) -> tuple[Tensor, Tensor]:
    """ITM re-ranking of the ITC top-k (docs/ALBEF.md §6.4-6.6), batched over queries.

    Queries are chunked so that one fusion call holds about ``batch_size`` pairs
    (``max(1, batch_size // k)`` queries of ``k`` candidates each). Under torch.distributed each
    rank scores a contiguous block of query rows and the blocks are summed (exactly).

    Args:
        model: ALBEF on the features' device.
        features: Cached features of the split.
        sim: (N_img, N_txt) ITC similarity (``itc_scores``).
        k_test: Candidates re-scored per query (clipped to the number of candidates).
        batch_size: Target number of (query, candidate) pairs per fusion call.
        trim_padding: Drop trailing text columns that no caption of a call attends to (same
            scores up to float summation order; the features themselves stay padded to 30).

    Returns:
        ``scores_i2t`` (N_img, N_txt) and ``scores_t2i`` (N_txt, N_img): raw ITM class-1 logits
        on each query's top-k cells, -100 everywhere else.
    """
    if k_test < 1 or batch_size < 1:
        raise ValueError(f"k_test and batch_size must be >= 1, got {k_test} and {batch_size}")
    i2t, t2i = _pair_scorers(model, features, trim_padding)
    with eval_mode(model):
        k = min(k_test, sim.shape[1])
        scores_i2t = _rerank_direction(sim, k, max(1, batch_size // k), i2t)
        k = min(k_test, sim.shape[0])
        scores_t2i = _rerank_direction(sim.t(), k, max(1, batch_size // k), t2i)
    return scores_i2t, scores_t2i


def _topk_pairs(sim: Tensor, k: int, rows: range) -> tuple[Tensor, Tensor]:
    """(query id, candidate id) of every owned row's top-k cells, flattened query-major."""
    query = torch.arange(rows.start, rows.stop, device=sim.device)
    if len(query) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=sim.device)
        return empty, empty
    top = sim[query].topk(k, dim=1).indices
    return query.repeat_interleave(k), top.reshape(-1)


def rerank_itm_dedup(model: ALBEF, features: RetrievalFeatures, sim: Tensor, k_test: int,
                     batch_size: int = 256) -> tuple[Tensor, Tensor, dict[str, float]]:
    """``rerank_itm`` with every (image, caption) pair scored once, in length-sorted batches.

    A pair in both an image's top-k captions and that caption's top-k images is one fusion
    pass, not two (ALBEF scores it twice). The unique pairs are sorted by caption length, so
    each fusion call pads its captions to a nearly equal width once, and every image's
    cross-attention keys and values are projected once per layer instead of once per pair;
    the last fusion layer computes only the [CLS] row the ITM head reads. Same scores as
    ``rerank_itm_loop`` up to float summation order (tests). Also returns the pair counts:
    ``pairs`` (both directions), ``unique_pairs`` and ``dedupe_share`` = 1 - unique / pairs.
    """
    if k_test < 1 or batch_size < 1:
        raise ValueError(f"k_test and batch_size must be >= 1, got {k_test} and {batch_size}")
    f, (n_img, n_txt), (rank, world) = features, sim.shape, _world()
    img_a, txt_a = _topk_pairs(sim, min(k_test, n_txt), _owned_rows(n_img, rank, world))
    txt_b, img_b = _topk_pairs(sim.t(), min(k_test, n_img), _owned_rows(n_txt, rank, world))
    keys = torch.cat([img_a * n_txt + txt_a, img_b * n_txt + txt_b])
    unique, inverse = torch.unique(keys, return_inverse=True)
    img_u, txt_u = unique // n_txt, unique % n_txt
    order = torch.argsort(f.text_mask[txt_u].sum(dim=1), stable=True)
    logits_u = torch.empty(len(unique), device=sim.device)
    with eval_mode(model):
        # Each image's cross-attention keys/values, once per layer (not once per pair).
        kv = model.fusion_encoder.image_keys_values(f.image_tokens)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ii, ti = img_u[idx], txt_u[idx]
            w = _text_width(f.text_mask[ti], True)
            logits_u[idx] = itm_match_logit(model, [(k[ii], v[ii]) for k, v in kv],
                                            f.text_states[ti, :w], f.text_mask[ti, :w],
                                            cls_only=True)
    logits = logits_u[inverse]
    scores_i2t, _ = _empty_scores(n_img, n_txt, sim.device)
    scores_i2t[img_a, txt_a] = logits[:len(img_a)]
    scores_t2i, _ = _empty_scores(n_txt, n_img, sim.device)
    scores_t2i[txt_b, img_b] = logits[len(img_a):]
    stats = {"pairs": float(len(keys)), "unique_pairs": float(len(unique)),
             "dedupe_share": 1.0 - len(unique) / max(1, len(keys))}
    return _combine(scores_i2t), _combine(scores_t2i), stats


def rerank_itm_loop(model: ALBEF, features: RetrievalFeatures, sim: Tensor,
                    k_test: int) -> tuple[Tensor, Tensor]:
    """Reference re-ranker: one query per fusion call, exactly as ALBEF's evaluation loop.

    Same arguments and results as ``rerank_itm``; kept to prove the batched version equal and
    to measure the speed-up.
    """
    f = features
    with eval_mode(model):
        scores_i2t, rows = _empty_scores(*sim.shape, device=sim.device)
        k = min(k_test, sim.shape[1])
        for i in rows:
            top = sim[i].topk(k).indices
            tokens = f.image_tokens[i].repeat(k, 1, 1)
            scores_i2t[i, top] = itm_match_logit(model, tokens, f.text_states[top],
                                                 f.text_mask[top])
        sim_t = sim.t()
        scores_t2i, rows = _empty_scores(*sim_t.shape, device=sim.device)
        k = min(k_test, sim_t.shape[1])
        for j in rows:
            top = sim_t[j].topk(k).indices
            states, mask = f.text_states[j].repeat(k, 1, 1), f.text_mask[j].repeat(k, 1)
            scores_t2i[j, top] = itm_match_logit(model, f.image_tokens[top], states, mask)
    return _combine(scores_i2t), _combine(scores_t2i)


# ---------------------------------------------------------------------------------------------
# Full evaluation


@dataclass
class RetrievalReport:
    """Re-ranked metrics (``TR@1`` ...), ITC-only metrics (``itc/TR@1`` ...) and provenance."""

    metrics: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"metrics": ..., "provenance": ...}``."""
        return {"metrics": dict(self.metrics), "provenance": dict(self.provenance)}


def _clock(device: torch.device) -> float:
    # Kernels run asynchronously on CUDA; wait for them so times are attributed correctly.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_or_extract(model: ALBEF, dataset: RetrievalSplit, tokenizer: TextTokenizer,
                     device: torch.device, batch_size: int, num_workers: int, text_batch: int,
                     cache: Path | None, key: str) -> tuple[RetrievalFeatures, bool]:
    """Features from ``cache`` when it exists with the right key and sizes, else computed."""
    if cache is not None and cache.is_file():
        feats = RetrievalFeatures.load(cache, key=key, map_location=device)
        if (feats.n_images, feats.n_texts) != (len(dataset), len(dataset.texts)):
            raise ValueError(f"{cache}: cached features hold {feats.n_images} images / "
                             f"{feats.n_texts} texts but the split has {len(dataset)} / "
                             f"{len(dataset.texts)}; delete the file to recompute")
        logger.info("loaded retrieval features from %s", cache)
        return feats, True
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats = extract_features(model, loader, dataset.texts, tokenizer, device, text_batch)
    feats.key = key
    if cache is not None and _world()[0] == 0:
        feats.save(cache)
        logger.info("saved retrieval features to %s", cache)
    return feats, False


def evaluate_retrieval(
    model: ALBEF,
    dataset: RetrievalSplit,
    tokenizer: TextTokenizer,
    device: torch.device | str,
    k_test: int,
    batch_size: int,
    *,
    split: str = "test",
    rerank_batch: int | None = None,
    text_batch: int = 256,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    checkpoint_hash: str | None = None,
    rerank: str = "batched",
) -> RetrievalReport:
    """Evaluate retrieval on one split: ITC-only and ITM re-ranked metrics, with provenance.

    Args:
        model: ALBEF, already on ``device`` (put in eval mode here and restored after).
        dataset: The split (``RetrievalEvalDataset``): images, ``texts``, ``img2txt``, ``txt2img``.
        tokenizer: ALBEF-convention tokenizer.
        device: Where features and scores live.
        k_test: ITC candidates re-scored per query (ALBEF: 256 COCO, 128 Flickr30k).
        batch_size: Images per encoder call.
        split: Split name, for provenance and the cache key.
        rerank_batch: Pairs per fusion call (default ``max(batch_size, k_test)``).
        text_batch: Captions per text-encoder call.
        num_workers: Image loader workers.
        cache_dir: When given, features are cached there under ``feature_cache_key``.
        checkpoint_hash: Checkpoint identity for the cache key (default: ``state_digest``).
        rerank: ``batched`` (``rerank_itm``) or ``dedupe`` (``rerank_itm_dedup``: each pair
            once, length-sorted batches); the same scores up to float summation order.
    """
    device = torch.device(device)
    if k_test < 10:
        logger.warning("k_test=%d < 10: R@10 then depends on the order of tied -100 cells", k_test)
    image_size = int(dataset[0]["image"].shape[-1])
    key, cache = "", None
    if cache_dir is not None:
        key = feature_cache_key(checkpoint_hash or state_digest(model), split, image_size)
        cache = Path(cache_dir) / f"retrieval_features_{key}.pt"
    t0 = _clock(device)
    with eval_mode(model):
        feats, cached = _load_or_extract(model, dataset, tokenizer, device, batch_size,
                                         num_workers, text_batch, cache, key)
        t1 = _clock(device)
        sim = itc_scores(feats)
        pairs_per_call = rerank_batch or max(batch_size, k_test)
        rerank_stats: dict[str, float] = {}
        if rerank == "dedupe":
            scores_i2t, scores_t2i, rerank_stats = rerank_itm_dedup(model, feats, sim, k_test,
                                                                    pairs_per_call)
        else:
            scores_i2t, scores_t2i = rerank_itm(model, feats, sim, k_test, pairs_per_call)
        t2 = _clock(device)
    itc = retrieval_metrics(sim, sim.t(), dataset.img2txt, dataset.txt2img)
    metrics = {**retrieval_metrics(scores_i2t, scores_t2i, dataset.img2txt, dataset.txt2img),
               **{f"itc/{k}": v for k, v in itc.items()}}
    provenance = {
        "split": split, "k_test": k_test, "scoring": SCORING_RERANK, "itc_scoring": SCORING_ITC,
        "n_images": feats.n_images, "n_texts": feats.n_texts, "image_size": image_size,
        "max_length": EVAL_MAX_LENGTH, "features_cached": cached, "feature_key": key,
        "feature_s": t1 - t0, "rerank_s": t2 - t1, "total_s": _clock(device) - t0,
        "world_size": _world()[1], "device": str(device), "rerank": rerank,
        **{f"rerank_{k}": v for k, v in rerank_stats.items()},
    }
    logger.info("retrieval %s: r_mean %.2f (itc %.2f), %d images, %d texts, %.1f s", split,
                metrics["r_mean"], metrics["itc/r_mean"], feats.n_images, feats.n_texts,
                provenance["total_s"])
    return RetrievalReport(metrics, provenance)
