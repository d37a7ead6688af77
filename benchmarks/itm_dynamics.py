"""Why ITM does (not) learn in a small setting: gradient norms, cross-attention entropy and ITM
accuracy by negative type, over training, for several negative-sampling recipes side by side.

Each variant trains the ``albef`` cell of a preset (default ``tiny``) with the trainer's own
``train_step``, and every ``--every`` steps measures, on a fixed probe of test images:

* ``grad/<part>``: L2 norm of this step's gradient of the visual encoder, text encoder, fusion
  layers and ITM head (read after the step: ``train_step`` leaves the gradients in place);
* ``xattn_entropy``: entropy of the Grad-CAM layer's cross-attention over the image tokens,
  divided by ln(1 + N) (1 = uniform attention, i.e. the words look at nothing in particular);
* ITM *classification* accuracy (p(match) > 0.5 or not) on the probe's true pairs (``acc/pos``),
  on random negatives (another scene's caption, ``acc/random``), on the in-probe caption ITC
  finds most similar (``acc/itc_hard``, what ALBEF's sampler favours) and on the colour/shape/
  relation swaps (``acc/swap``).

A head that only knows the 1:2 class prior answers "no match" everywhere: ``acc/pos`` 0 and
every negative accuracy 100. Output: ``dynamics.jsonl``, ``dynamics.png`` and ``dynamics.md``.
CLI: ``python -m benchmarks.itm_dynamics --out results/benchmarks/itm-dynamics``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from model.albef import ALBEF  # noqa: E402
from model.config.experiment import load_experiment  # noqa: E402
from model.data.transforms import build_transform  # noqa: E402
from model.engine.data import build_tokenizer  # noqa: E402
from model.engine.train import Trainer, run_step, setup  # noqa: E402
from model.evaluation.compositional import (
    caption_groups,
    load_images,
    load_negative_items,
    negative_kinds,
)
from model.evaluation.features import EVAL_MAX_LENGTH, eval_mode  # noqa: E402

log = logging.getLogger(__name__)

# Variant name -> --set items on top of the preset (the recipes compared in the README).
VARIANTS: dict[str, tuple[str, ...]] = {
    "albef_negatives": ("loss.itm_neg_ramp=[0,0]", "loss.itm_neg_hardness=1.0"),
    "preset": (),
    "random_negatives": ("loss.itm_neg_ramp=[1000000,1000000]",),
}
PARTS = ("visual_encoder", "text_encoder", "fusion_encoder", "itm_head")


def grad_norms(model: ALBEF) -> dict[str, float]:
    """L2 norm of the current gradients of each part (0 for a part without gradients)."""
    out = {}
    for part in PARTS:
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        out[f"grad/{part}"] = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    return out


def attention_entropy(cross_attn: Tensor, mask: Tensor) -> float:
    """Mean over heads and real text rows of the entropy of (B, H, L, K) attention rows,
    divided by ln K."""
    p = cross_attn.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1).mean(1)  # (B, L)
    real = mask.bool()
    return float(entropy[real].mean() / math.log(cross_attn.shape[-1]))


class Probe:
    """A fixed set of test images with their true, random, ITC-hard and swapped captions."""

    def __init__(self, tr: Trainer, size: int) -> None:
        items = load_negative_items(tr.sources.negatives_file)[:size]
        self.kinds = negative_kinds(items)
        image_size = tr.cfg.eval.image_size or tr.cfg.model.vision.image_size
        self.images = load_images(items, tr.sources.image_root,
                                   build_transform("test", image_size)).to(tr.dist.device)
        texts, self.present = caption_groups(items, self.kinds)
        tok = build_tokenizer(tr.sources)(texts, max_length=EVAL_MAX_LENGTH, padding="longest")
        self.ids = tok["input_ids"].to(tr.dist.device)
        self.mask = tok["attention_mask"].to(tr.dist.device)
        self.per_image = 1 + len(self.kinds)
        self.layer = tr.cfg.softmask.layer

    @torch.no_grad()
    def measure(self, model: ALBEF) -> dict[str, float]:
        with eval_mode(model):
            image = model.encode_image(self.images)
            text = model.encode_text(self.ids, self.mask)
            true = slice(0, None, self.per_image)
            # ITC-hard: the other probe image's true caption with the highest ITC similarity.
            sim = image.feat @ text.feat[true].T
            sim.fill_diagonal_(-float("inf"))
            hard = sim.argmax(dim=1)
            tokens = image.tokens.repeat_interleave(self.per_image, dim=0)
            fused = model.fuse(text.states, self.mask, tokens, attn_layer=self.layer)
            match = model.itm_logits(fused.hidden).argmax(dim=1).view(-1, self.per_image) == 1
            hard_fused = model.fuse(text.states[true][hard], self.mask[true][hard],
                                    image.tokens).hidden
            hard_match = model.itm_logits(hard_fused).argmax(dim=1) == 1
        out = {"acc/pos": 100.0 * match[:, 0].float().mean().item(),
               "acc/itc_hard": 100.0 * (~hard_match).float().mean().item(),
               "xattn_entropy": attention_entropy(fused.cross_attn, self.mask)}
        swaps = [k for k, kind in enumerate(self.kinds) if kind != "random"]
        for name, columns in (("random", [self.kinds.index("random")] if "random" in self.kinds
                               else []), ("swap", swaps)):
            if columns:
                cols = torch.tensor(columns) + 1
                right = ~match[:, cols] & self.present[:, cols - 1].to(match.device)
                out[f"acc/{name}"] = 100.0 * right.sum().item() / self.present[:, cols - 1].sum(
                ).item()
        return out


def run_variant(name: str, sets: Sequence[str], preset: str, steps: int, every: int,
                probe_size: int, workdir: Path) -> list[dict[str, Any]]:
    """Train one variant for ``steps`` steps and measure it every ``every`` steps."""
    cfg = load_experiment(preset=preset, sets=[*sets, f"train.max_steps={steps}",
                                               "data.num_workers=0"])
    tr = setup(cfg, workdir / name, device="cpu" if not torch.cuda.is_available() else None)
    probe = Probe(tr, probe_size)
    tr.model.train()
    rows: list[dict[str, Any]] = []
    while tr.state.global_step < steps:
        tr.data.set_epoch(tr.state.epoch, start_batch=tr.state.batch)
        for batch in tr.data.loader:
            out, _ = run_step(tr, batch)  # the trainer's own step: schedule, lr, queue, hardness
            st = tr.state
            if st.global_step % every == 0 or st.global_step == 1:
                rows.append({"variant": name, "step": st.global_step,
                             "loss/itm": float(out.losses["itm"]),
                             **grad_norms(tr.objective.student),
                             **probe.measure(tr.objective.student)})
                log.info("%s step %d: %s", name, st.global_step, rows[-1])
            if st.global_step >= steps:
                break
        tr.state.epoch, tr.state.batch = tr.state.epoch + 1, 0
    return rows


PANELS = ("loss/itm", "acc/pos", "acc/random", "acc/itc_hard", "acc/swap", "xattn_entropy",
          "grad/fusion_encoder", "grad/itm_head")


def plot(frame: pd.DataFrame, path: Path) -> None:
    """One panel per measured quantity, one line per variant."""
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), layout="constrained")
    for ax, key in zip(axes.flat, PANELS, strict=True):
        for variant, rows in frame.groupby("variant", sort=False):
            if key in rows:
                ax.plot(rows["step"], rows[key], label=variant, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].axhline(-(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3), color="0.5",
                         linestyle=":", linewidth=1, label="1:2 prior")
    axes.flat[0].legend(fontsize=8, frameon=False)
    fig.suptitle("ITM dynamics by negative-sampling recipe (probe of test images)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(frame: pd.DataFrame, steps: Sequence[int]) -> str:
    """The measured quantities at a few steps, one row per (variant, step)."""
    shown = frame[frame["step"].isin(steps)][["variant", "step", *PANELS]]
    return shown.to_markdown(index=False, floatfmt=".3g") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.itm_dynamics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--probe", type=int, default=128, help="probe images")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra key=value for every variant (e.g. data.cache_dir=...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            rows += run_variant(name, [*VARIANTS[name], *args.sets], args.preset, args.steps,
                                args.every, args.probe, Path(tmp))
    frame = pd.DataFrame(rows)
    with open(args.out / "dynamics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    plot(frame, args.out / "dynamics.png")
    marks = sorted({1, args.every * 2, args.steps // 2, args.steps} & set(frame["step"]))
    (args.out / "dynamics.md").write_text(markdown(frame, marks))
    print(markdown(frame, marks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
