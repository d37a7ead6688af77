"""Throughput of retrieval evaluation: ITC top-k + ITM re-ranking, batched vs per-query loop.

A split of N images x 5N captions (ALBEF's COCO/Flickr layout) is encoded once with a randomly
initialised ALBEF of a cases.yaml model size; then ``model.evaluation.rerank.rerank_itm``
(many queries per fusion call) and ``rerank_itm_loop`` (one query per call, ALBEF's loop) score
the same ITC top-k cells. Their runs are interleaved (batched, loop, batched, loop, ...) so that
machine noise hits both; the medians, the speed-up and the largest score difference between the
two (they must agree) are reported.

CLI: ``python -m benchmarks.bench_retrieval --preset tiny --images 200 --k 16``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from benchmarks.cases import (
    DEFAULT_CASES,
    Case,
    ModelSpec,
    TextSpec,
    experiment_config,
    load_suite,
)
from benchmarks.measure import device_name, environment, synchronize
from benchmarks.report import render_markdown
from model.albef import ALBEF
from model.build import build_albef
from model.evaluation.features import EVAL_MAX_LENGTH, RetrievalFeatures, eval_mode, itc_scores
from model.evaluation.rerank import rerank_itm, rerank_itm_dedup, rerank_itm_loop

log = logging.getLogger(__name__)
CAPTIONS_PER_IMAGE = 5


def build_model(spec: ModelSpec, device: torch.device, seed: int, reference: Any) -> ALBEF:
    """A randomly initialised ALBEF of the model size (the weights do not change the cost)."""
    cfg = experiment_config(Case(spec, 2, "fp32", (reference,)), reference)
    torch.manual_seed(seed)
    return build_albef(cfg.model, spec.special.vocab_size, spec.special.pad).to(device)


def synthetic_captions(n: int, spec: ModelSpec, text: TextSpec, gen: torch.Generator
                       ) -> tuple[Tensor, Tensor]:
    """(n, 30) ids and mask: [CLS] + realistic lengths, padded to exactly 30 as ALBEF's eval."""
    sp = spec.special
    lengths = (torch.randn(n, generator=gen) * text.std_len + text.mean_len).round()
    lengths = lengths.clamp(text.min_len, EVAL_MAX_LENGTH).long()
    ids = torch.randint(max(sp.pad, sp.cls, sp.mask) + 1, sp.vocab_size, (n, EVAL_MAX_LENGTH),
                        generator=gen)
    mask = (torch.arange(EVAL_MAX_LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, sp.pad))
    ids[:, 0] = sp.cls
    return ids, mask


def encode_split(model: ALBEF, n_images: int, image_size: int, spec: ModelSpec, text: TextSpec,
                 device: torch.device, seed: int, chunk: int = 128) -> RetrievalFeatures:
    """Features of a random N-image x 5N-caption split, in eval mode, in chunks."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = synthetic_captions(CAPTIONS_PER_IMAGE * n_images, spec, text, gen)
    tokens, img_feat, states, txt_feat = [], [], [], []
    with eval_mode(model):
        for start in range(0, n_images, chunk):
            images = torch.randn(min(chunk, n_images - start), 3, image_size, image_size,
                                 generator=gen)
            out = model.encode_image(images.to(device))
            tokens.append(out.tokens)
            img_feat.append(out.feat)
        for start in range(0, ids.shape[0], chunk):
            out = model.encode_text(ids[start:start + chunk].to(device),
                                    mask[start:start + chunk].to(device))
            states.append(out.states)
            txt_feat.append(out.feat)
    return RetrievalFeatures(torch.cat(tokens), torch.cat(img_feat), torch.cat(states),
                             mask.to(device), torch.cat(txt_feat))


def _timed(fn: Callable[[], tuple[Tensor, Tensor]], device: torch.device
           ) -> tuple[float, tuple[Tensor, Tensor]]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def bench_rerank(model: ALBEF, feats: RetrievalFeatures, k: int, batch_size: int,
                 repeats: int, device: torch.device) -> dict[str, Any]:
    """Interleaved runs of the three re-rankers (per-direction batched, deduplicated and
    length-sorted, ALBEF's per-query loop): medians, speed-ups, the share of pairs the dedupe
    saves, and the largest score difference to the loop."""
    sim = itc_scores(feats)
    times: dict[str, list[float]] = {"batched": [], "dedupe": [], "loop": []}
    diff, stats = 0.0, {}
    for _ in range(repeats):
        t, (b_i2t, b_t2i) = _timed(lambda: rerank_itm(model, feats, sim, k, batch_size), device)
        times["batched"].append(t)
        start = time.perf_counter()
        d_i2t, d_t2i, stats = rerank_itm_dedup(model, feats, sim, k, batch_size)
        synchronize(device)
        times["dedupe"].append(time.perf_counter() - start)
        t, (l_i2t, l_t2i) = _timed(lambda: rerank_itm_loop(model, feats, sim, k), device)
        times["loop"].append(t)
        diff = max(diff, *((a - b).abs().max().item() for a, b in
                           ((b_i2t, l_i2t), (b_t2i, l_t2i), (d_i2t, l_i2t), (d_t2i, l_t2i))))
    med = {name: float(np.median(v)) for name, v in times.items()}
    n_queries = feats.n_images + feats.n_texts
    return {"batched_s": med["batched"], "dedupe_s": med["dedupe"], "loop_s": med["loop"],
            "speedup": med["loop"] / med["batched"],
            "dedupe_speedup": med["loop"] / med["dedupe"],
            "dedupe_share": stats.get("dedupe_share", 0.0),
            "pairs": stats.get("pairs", 0.0), "unique_pairs": stats.get("unique_pairs", 0.0),
            "batched_queries_per_s": n_queries / med["batched"],
            "loop_queries_per_s": n_queries / med["loop"],
            **{f"{name}_s_spread": float(np.ptp(v)) for name, v in times.items()},
            "max_abs_score_diff": diff}


def run_retrieval_benchmark(preset: str, n_images: int, k: int, batch_size: int, repeats: int,
                            device: str | torch.device, out_dir: str | Path,
                            cases: str | Path = DEFAULT_CASES, seed: int = 0) -> pd.DataFrame:
    """Encode a synthetic split, time both re-rankers, write ``retrieval.{csv,md}``."""
    suite = load_suite(cases)
    spec, dev = suite.models[preset], torch.device(device)
    reference = suite.variants["albef"]
    model = build_model(spec, dev, seed, reference)
    image_size = experiment_config(Case(spec, 2, "fp32", (reference,)),
                                   reference).model.vision.image_size
    synchronize(dev)
    start = time.perf_counter()
    feats = encode_split(model, n_images, image_size, spec, suite.text, dev, seed)
    synchronize(dev)
    feature_s = time.perf_counter() - start
    log.info("%s: %d images x %d captions encoded in %.1f s", preset, feats.n_images,
             feats.n_texts, feature_s)
    row = {"preset": preset, "images": feats.n_images, "captions": feats.n_texts, "k_test": k,
           "rerank_batch": batch_size, "repeats": repeats, "feature_s": feature_s,
           **bench_rerank(model, feats, k, batch_size, repeats, dev), **environment(dev)}
    df = pd.DataFrame([row])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "retrieval.csv", index=False)
    shown = df[["preset", "images", "captions", "k_test", "rerank_batch", "feature_s",
                "loop_s", "batched_s", "speedup", "dedupe_s", "dedupe_speedup", "dedupe_share",
                "max_abs_score_diff"]]
    caption = (f"Retrieval evaluation on {device_name(dev)} ({row['threads']} threads): "
               f"median of {repeats} interleaved runs per re-ranker; feature extraction once; "
               f"torch {row['torch_version']}, git {row['git_sha']}.")
    (out / "retrieval.md").write_text(render_markdown(
        shown, {"feature_s": ".2f", "batched_s": ".2f", "loop_s": ".2f", "speedup": ".1f",
                "dedupe_s": ".2f", "dedupe_speedup": ".1f", "dedupe_share": ".3f",
                "max_abs_score_diff": ".2e"}, caption), encoding="utf-8")
    return df


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: time both re-rankers on a synthetic split and print the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_retrieval",
                                     description="Retrieval re-ranking: batched and "
                                                 "deduplicated vs ALBEF's loop.")
    parser.add_argument("--preset", default="tiny", help="a model name from cases.yaml")
    parser.add_argument("--images", type=int, default=200, help="N (captions: 5N)")
    parser.add_argument("--k", type=int, default=16, help="k_test: candidates per query")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per fusion call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=str(DEFAULT_CASES))
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_retrieval_benchmark(args.preset, args.images, args.k, args.batch_size, args.repeats,
                            args.device, args.out, args.cases, args.seed)
    sys.stdout.write((Path(args.out) / "retrieval.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
