"""Retrieval features, computed once per (checkpoint, split) (docs/ALBEF.md §6.1-6.3): the full
ViT token sequence and projected feature of every image, the text-mode hidden states, mask and
projected feature of every caption (padded/truncated to exactly 30 tokens, docs/ALBEF.md C17),
cacheable to a file; and the ITC scores (cosine of the projected features, no temperature).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.albef import ALBEF
from model.atomic import signals_deferred
from model.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

EVAL_MAX_LENGTH = 30  # retrieval evaluation pads/truncates every caption to exactly 30 tokens
_FEATURE_FORMAT = 1


class RetrievalSplit(Protocol):
    """What evaluation needs from a dataset (``model.data.datasets.RetrievalEvalDataset``)."""

    texts: list[str]
    img2txt: Mapping[int, Sequence[int]]
    txt2img: Mapping[int, int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        with signals_deferred():  # a pre-emption exit inside the zip writer would fail the job
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
