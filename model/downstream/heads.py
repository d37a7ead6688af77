"""Task heads on top of a pre-trained ALBEF (docs/DOWNSTREAM.md): architecture only.

* :class:`ClassifierHead` - ALBEF's MLP on the fused [CLS] (SNLI-VE: 3 classes, NLVR2: 2).
* :class:`PairFusionEncoder` - NLVR2's two-image fusion: every pre-trained fusion layer becomes two
  consecutive layers, the first cross-attending to image 0, the second to image 1, with the
  cross-attention key and value projections shared inside each pair.
* :class:`AnswerDecoder` - VQA's answer decoder: BERT layers with causal self-attention and
  cross-attention over the question states, its own embeddings and an LM head tied to them.

Loss math lives in ``model/downstream/losses.py``; the task models in
``model/downstream/models.py``.
"""

from __future__ import annotations

import copy
from functools import partial

from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertEmbeddings

from model.bert import (
    BertLayer,
    FusionEncoder,
    MLMHead,
    TextEncoder,
    causal_extended_mask,
    extended_mask,
    init_bert_weights,
)


class ClassifierHead(nn.Sequential):
    """Linear(D, D) -> ReLU -> Linear(D, n): the head ALBEF puts on the fused [CLS] for SNLI-VE
    and NLVR2 (PyTorch's default Linear init, as there)."""

    def __init__(self, hidden: int, n_classes: int) -> None:
        super().__init__(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


class PairFusionEncoder(nn.Module):
    """2F fusion layers over two images; layer j cross-attends to image ``j % 2``.

    Built from a pre-trained F-layer :class:`FusionEncoder`: layers 2i and 2i+1 both start as
    copies of pre-trained layer i (ALBEF's NLVR2 loading maps layer 6+i to 6+2i and 7+2i), and
    share one cross-attention ``key`` and ``value`` projection (the images are encoded by the
    same ViT, so the pair reads them through the same keys; queries, outputs, self-attention and
    FFN stay separate).
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        if len(layers) % 2:
            raise ValueError(f"PairFusionEncoder needs an even number of layers, got {len(layers)}")
        self.layer = layers
        self.tie_pairs()

    @classmethod
    def from_fusion(cls, fusion: FusionEncoder) -> PairFusionEncoder:
        """Duplicate every layer of a (pre-trained) fusion encoder into an adjacent pair."""
        layers = nn.ModuleList()
        for layer in fusion.layer:
            layers.append(copy.deepcopy(layer))
            layers.append(copy.deepcopy(layer))
        return cls(layers)

    def tie_pairs(self) -> None:
        """Layer 2i's cross-attention key/value become layer 2i+1's modules (one parameter)."""
        for i in range(0, len(self.layer), 2):
            first, second = self.layer[i].crossattention.self, self.layer[i + 1].crossattention.self
            first.key = second.key
            first.value = second.value

    def forward(self, text_states: Tensor, attention_mask: Tensor, image0: Tensor,
                image1: Tensor) -> Tensor:
        """text_states: (B, L, D); image0, image1: (B, 1+N, Dv) -> last hidden states (B, L, D)."""
        hidden = text_states
        mask = extended_mask(attention_mask, hidden.dtype)
        images = (image0, image1)
        for j, layer in enumerate(self.layer):
            hidden, _ = layer(hidden, mask, images[j % 2])
        return hidden


class AnswerDecoder(nn.Module):
    """The VQA answer decoder: BERT embeddings, ``n`` causal layers that cross-attend to the
    question states, and an LM head whose decoder is the decoder's own word embeddings.

    ALBEF initialises it from the pre-trained model: embeddings from the text encoder's, layer i
    from fusion layer i (self-attention weights trained bidirectionally, now run causally), the
    LM head from the MLM head (:meth:`from_pretrained`).
    """

    def __init__(self, config, num_layers: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(
            BertLayer(config, cross_width=config.hidden_size) for _ in range(num_layers))
        self.head = MLMHead(config)
        self.apply(partial(init_bert_weights, std=config.initializer_range))

    @classmethod
    def from_pretrained(cls, config, text: TextEncoder, fusion: FusionEncoder,
                        mlm_head: MLMHead) -> AnswerDecoder:
        """A decoder with as many layers as ``fusion``, initialised as ALBEF's VQA loader does."""
        decoder = cls(config, len(fusion.layer))
        decoder.embeddings.load_state_dict(text.embeddings.state_dict())
        for mine, pretrained in zip(decoder.layer, fusion.layer, strict=True):
            theirs = pretrained.state_dict()
            wanted = mine.state_dict()
            wrong = [k for k in wanted if theirs[k].shape != wanted[k].shape]
            if wrong:
                raise ValueError(
                    "the answer decoder cross-attends to question states (width "
                    f"{config.hidden_size}); the fusion layers' cross-attention reads image "
                    f"tokens of another width, so {wrong[0]} cannot initialise it. ALBEF's "
                    "VQA needs model.vision.width == model.text.hidden")
            mine.load_state_dict(theirs)
        decoder.head.load_state_dict(mlm_head.state_dict())
        return decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, question_states: Tensor,
                question_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, La) answers starting with [CLS] (BOS);
        question_states: (B, Lq, D), question_mask: (B, Lq) -> vocabulary logits (B, La, V)."""
        hidden = self.embeddings(input_ids=input_ids)
        mask = causal_extended_mask(attention_mask, hidden.dtype)
        cross = extended_mask(question_mask, hidden.dtype)
        for layer in self.layer:
            hidden, _ = layer(hidden, mask, question_states, cross_mask=cross)
        return self.head(hidden, self.embeddings.word_embeddings.weight)
