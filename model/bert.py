"""BERT text encoder and cross-attention fusion encoder (ALBEF's split BERT, docs/ALBEF.md §1.2).

ALBEF cuts a 12-layer BERT at ``fusion_layer``: layers ``[0, k)`` encode text alone, layers
``[k, n)`` add a cross-attention sub-block over the image tokens. Stock ``transformers`` BERT cannot
express that split without decoder (causal) semantics, so the layer is assembled here from
transformers' own building blocks (``BertEmbeddings``, ``BertSelfOutput``, ``BertIntermediate``,
``BertOutput``) plus a small attention core that runs fused SDPA and, for one chosen layer only,
an explicit softmax whose probabilities (post-softmax, pre-dropout) are returned to the caller.
Sub-module names equal BERT's, so checkpoint key mapping is a prefix rename
(model/checkpoints/keymap.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

# ALBEF's xbert builds the self-attention mask as (1 - m) * -10000 (docs/ALBEF.md C23).
MASK_FILL = -10000.0


def make_bert_config(
    vocab_size: int,
    hidden: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    hidden_dropout: float,
    attn_dropout: float,
    pad_token_id: int = 0,
    init_std: float = 0.02,
) -> BertConfig:
    """A transformers ``BertConfig`` with ALBEF's fixed choices (exact GELU, LN eps 1e-12)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=attn_dropout,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        initializer_range=init_std,
    )


def extended_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 0/1 padding mask -> additive (B, 1, 1, L) mask with ALBEF's -10000 fill."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_FILL


def causal_extended_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) padding mask -> additive (B, 1, L, L) decoder mask: position i sees j <= i that
    are not padding (BERT's decoder mask, with the same -10000 fill)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, device=attention_mask.device).tril()
    allowed = causal[None, None] * attention_mask[:, None, None, :].to(causal.dtype)
    return (1.0 - allowed.to(dtype)) * MASK_FILL


class AttentionCore(nn.Module):
    """Multi-head attention projections (``query``/``key``/``value`` as in BERT).

    Keys/values may come from a different width (image tokens): ``kv_width``.
    """

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.dropout_p = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``kv`` (B, Lk, Dkv), split into heads: (B, H, Lk, hd) each."""
        return self._split(self.key(kv)), self._split(self.value(kv))

    def forward(
        self, x: Tensor, kv: Tensor | tuple[Tensor, Tensor], mask: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, Lq, D); kv: (B, Lk, Dkv), or its keys and values already projected
        (``project_kv``: re-ranking reuses one image's for every caption it is paired with);
        mask: additive (B, 1, 1, Lk) or None.

        Returns the context (B, Lq, D) and, if ``need_probs``, the attention probabilities
        (B, H, Lq, Lk) after softmax and before dropout (what Grad-CAM explains, docs/ALBEF.md C23).
        """
        q = self._split(self.query(x))
        k, v = kv if isinstance(kv, tuple) else self.project_kv(kv)
        p = self.dropout_p if self.training else 0.0
        probs = None
        if need_probs:
            scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, p=p, training=self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, -1), probs


class AttentionBlock(nn.Module):
    """Attention + BERT's residual ``output`` (dense, dropout, LayerNorm(x + .))."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.self = AttentionCore(
            config.hidden_size, config.num_attention_heads, kv_width,
            config.attention_probs_dropout_prob,
        )
        self.output = BertSelfOutput(config)

    def forward(
        self, x: Tensor, kv: Tensor | tuple[Tensor, Tensor], mask: Tensor | None,
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        ctx, probs = self.self(x, kv, mask, need_probs)
        return self.output(ctx, x), probs


class BertLayer(nn.Module):
    """Post-LN BERT layer; with ``cross_width`` it gains ALBEF's cross-attention sub-block."""

    def __init__(self, config: BertConfig, cross_width: int | None = None) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        self.crossattention = AttentionBlock(config, cross_width) if cross_width else None
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor,
        image: Tensor | tuple[Tensor, Tensor] | None = None,
        need_probs: bool = False,
        cross_mask: Tensor | None = None,
        rows: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``cross_mask``: additive mask over the cross-attended tokens. ALBEF's image tokens are
        never padded (all-ones mask, so None); the answer decoder attends to padded questions.
        ``rows``: compute only the first ``rows`` output positions (every position still serves
        as a key and value): a layer whose other outputs nobody reads skips their queries,
        cross-attention and feed-forward."""
        queries = hidden if rows is None else hidden[:, :rows]
        hidden, _ = self.attention(queries, hidden, mask)
        probs = None
        if self.crossattention is not None:
            hidden, probs = self.crossattention(hidden, image, cross_mask, need_probs)
        return self.output(self.intermediate(hidden), hidden), probs


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init: N(0, 0.02) weights, zero biases, LayerNorm (1, 0), zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def run_layer(layer: nn.Module, checkpointing: bool, *args: object, **kwargs: object
              ) -> tuple[Tensor, Tensor | None]:
    """``layer(*args, **kwargs)``, with activation checkpointing when asked and a gradient is
    being recorded: the layer's activations are recomputed in the backward pass instead of
    kept (non-reentrant ``torch.utils.checkpoint``; the RNG state is restored, so dropout draws
    the same masks). Returned attention probabilities stay differentiable (SoftMask's Grad-CAM
    takes their gradient)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return layer(*args, **kwargs)


class TextEncoder(nn.Module):
    """Embeddings + the first ``num_layers`` BERT layers (ALBEF ``mode='text'``)."""

    def __init__(self, config: BertConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(num_layers))
        self.apply(partial(init_bert_weights, std=config.initializer_range))
        self.checkpointing = False  # train.activation_checkpointing (run_layer)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> hidden states (B, L, D)."""
        hidden = self.embeddings(input_ids=input_ids)
        mask = extended_mask(attention_mask, hidden.dtype)
        for layer in self.layer:
            hidden, _ = run_layer(layer, self.checkpointing, hidden, mask)
        return hidden


@dataclass
class FusionOutput:
    """hidden: (B, L, D) last fusion layer; cross_attn: (B, H, L, 1+N) of the requested layer."""

    hidden: Tensor
    cross_attn: Tensor | None = None


class FusionEncoder(nn.Module):
    """The cross-attention BERT layers (ALBEF ``mode='fusion'``: no embedding layer)."""

    def __init__(self, config: BertConfig, num_layers: int, image_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, cross_width=image_width) for _ in range(num_layers)
        )
        self.apply(partial(init_bert_weights, std=config.initializer_range))
        self.checkpointing = False  # train.activation_checkpointing (run_layer)

    def image_keys_values(self, image_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values of ``image_tokens`` (B, 1+N, Dv): what
        a fusion pass recomputes for each (image, text) pair, computed once per image."""
        return [layer.crossattention.self.project_kv(image_tokens) for layer in self.layer]

    def forward(
        self,
        text_states: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor | Sequence[tuple[Tensor, Tensor]],
        attn_layer: int | None = None,
        cls_only: bool = False,
    ) -> FusionOutput:
        """text_states: (B, L, D), attention_mask: (B, L), image_tokens: (B, 1+N, Dv), or the
        per-layer keys and values of :meth:`image_keys_values` (indexed to the B rows).

        ``attn_layer`` (0-based within this stack) selects the layer whose cross-attention
        probabilities are returned; that one layer runs an explicit softmax, the rest use SDPA.
        ``cls_only``: the last layer computes only the [CLS] row (``hidden`` is (B, 1, D)), all
        the ITM head reads: the same [CLS] output, for a fraction of the last layer's cost.
        """
        hidden = text_states
        mask = extended_mask(attention_mask, hidden.dtype)
        cross_attn = None
        per_layer = isinstance(image_tokens, (list, tuple))
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            image = image_tokens[i] if per_layer else image_tokens
            hidden, probs = run_layer(layer, self.checkpointing, hidden, mask, image,
                                      need_probs=(i == attn_layer),
                                      rows=1 if cls_only and i == last else None)
            if probs is not None:
                cross_attn = probs
        return FusionOutput(hidden=hidden, cross_attn=cross_attn)


class MLMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings.

    The decoder weight is not stored here: it is passed in at call time (the word-embedding
    matrix), which is how ALBEF's tie (docs/ALBEF.md C22) survives the momentum copy and EMA
    unchanged.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.transform.apply(partial(init_bert_weights, std=config.initializer_range))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """hidden: (..., D) -> vocabulary logits (..., V)."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)
