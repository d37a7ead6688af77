"""ITM re-ranking (docs/ALBEF.md §6.4, C18-C19): for each query, its ``k_test`` best candidates
by ITC are re-scored with the raw ITM class-1 logit of the fusion layers run on the cached text
states; every other cell is -100 and the ITC similarity is not added. Both directions.

Three schedules, the same scores up to float summation order: ``rerank_itm_loop`` reproduces
the official one-query-per-call loop (the reference); ``rerank_itm`` packs many (query,
candidate) pairs into one fusion call per direction; ``rerank_itm_dedup`` scores each pair once
for both directions, in length-sorted batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from model.albef import ALBEF
from model.evaluation.features import RetrievalFeatures, eval_mode, rank_and_world

logger = logging.getLogger(__name__)

# ALBEF's fill value for cells that were not re-ranked (docs/ALBEF.md §6.4).
UNSCORED = -100.0
# Pairs scored with the ITM head: (P, 1+N, Dv) image tokens, (P, L, D) text states, (P, L) mask.
PairScorer = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# ITM re-ranking


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
    rank, world = rank_and_world()
    rows = _owned_rows(n_rows, rank, world)
    scores = torch.zeros(n_rows, n_cols, device=device)
    scores[rows.start:rows.stop] = UNSCORED
    return scores, rows


def _combine(scores: Tensor) -> Tensor:
    if rank_and_world()[1] > 1:
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
    f, (n_img, n_txt), (rank, world) = features, sim.shape, rank_and_world()
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
