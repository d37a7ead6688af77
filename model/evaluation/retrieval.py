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

Features: model/evaluation/features.py; the re-rankers: model/evaluation/rerank.py.
"""


from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from model.albef import ALBEF
from model.data.tokenizer import TextTokenizer
from model.evaluation.features import (
    EVAL_MAX_LENGTH,
    RetrievalFeatures,
    RetrievalSplit,
    eval_mode,
    extract_features,
    feature_cache_key,
    itc_scores,
    rank_and_world,
    state_digest,
)
from model.evaluation.rerank import rerank_itm, rerank_itm_dedup

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
SCORING_RERANK = "itc top-k, then raw ITM logit"
SCORING_ITC = "itc cosine"


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
    if cache is not None and rank_and_world()[0] == 0:
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
        "world_size": rank_and_world()[1], "device": str(device), "rerank": rerank,
        **{f"rerank_{k}": v for k, v in rerank_stats.items()},
    }
    logger.info("retrieval %s: r_mean %.2f (itc %.2f), %d images, %d texts, %.1f s", split,
                metrics["r_mean"], metrics["itc/r_mean"], feats.n_images, feats.n_texts,
                provenance["total_s"])
    return RetrievalReport(metrics, provenance)
