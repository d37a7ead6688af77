"""Text tokenisation with ALBEF's conventions on top of a Hugging Face BERT tokenizer.

ALBEF's tokenizer writes ``[CLS] w1 ... wn`` with **no trailing [SEP]** (its own copy of the BERT
tokenizer drops it). An off-the-shelf BERT tokenizer appends [SEP], which changes sequence lengths,
the MLM candidate set and every downstream number, so :class:`TextTokenizer` defaults to ALBEF's
form and offers the standard BERT form only on request (``add_sep=True``).

Lengths are the caller's choice; ALBEF uses

* pre-training: ``padding="longest", truncation=True, max_length=25`` ([CLS] + at most 24 pieces);
* retrieval training: ``padding="longest", truncation=False`` (a caption may exceed 30 tokens);
* retrieval evaluation: ``padding="max_length", truncation=True, max_length=30``.

``build_wordpiece_vocab`` makes a small BERT ``vocab.txt`` from local captions, so tests and the
synthetic benchmark never need a model download.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import BatchEncoding, BertTokenizer

logger = logging.getLogger(__name__)

# Order matters: BERT checkpoints and our local vocabularies both expect these names, and a local
# vocabulary puts them first so that their ids are 0..4.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Same default size as bert-base-uncased; local caption sets are far smaller, so in practice the
# vocabulary holds every word that was seen.
DEFAULT_VOCAB_SIZE = 30522
# transformers uses a huge integer as model_max_length when a tokenizer has no known limit.
_NO_MODEL_LIMIT = 1_000_000


def _caption_words(captions: Iterable[str]) -> Counter[str]:
    """Count the words BERT's normaliser and pre-tokeniser produce for ``captions``."""
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    # Caption sets repeat captions a lot (templates); tokenise each distinct caption once.
    for caption, repeats in Counter(captions).items():
        if not isinstance(caption, str):
            raise TypeError(f"build_wordpiece_vocab: captions must be str, got {type(caption)!r}")
        for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
            counts[word] += repeats
    return counts


def build_wordpiece_vocab(
    captions: Iterable[str],
    path: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 1,
) -> Path:
    """Build a BERT WordPiece ``vocab.txt`` from captions, deterministically.

    The words come from the ``tokenizers`` library's BERT normaliser (lower-casing) and BERT
    pre-tokeniser (split on whitespace and punctuation). The vocabulary is: the five special
    tokens (ids 0..4: [PAD] [UNK] [CLS] [SEP] [MASK]), every character seen, as a word start and
    as a ``##`` continuation (so any word made of seen characters tokenises without [UNK]), then
    whole words by decreasing frequency (ties alphabetical) until ``vocab_size`` is reached.

    Why not ``tokenizers.trainers.WordPieceTrainer``: its merge order breaks ties by hash order,
    which changes from one process to the next (measured with tokenizers 0.23: the same captions
    gave different vocabularies in different processes), and cached datasets and checkpoints need
    a byte-identical vocabulary. A whole-word vocabulary also suits caption sets with a small
    closed vocabulary: every word is one token, so "pick a word" means "pick a token".

    Args:
        captions: The captions (raw or already cleaned).
        path: Output file (parent directories are created).
        vocab_size: Maximum number of entries, special tokens and characters included.
        min_frequency: Words seen fewer times are left out (characters are always kept).

    Returns:
        The path written.

    Raises:
        ValueError: If no word was found or ``vocab_size`` cannot hold the specials and characters.
    """
    counts = _caption_words(captions)
    if not counts:
        raise ValueError(f"build_wordpiece_vocab({path}): the captions contain no words")
    chars = sorted({char for word in counts for char in word})
    entries = list(SPECIAL_TOKENS) + chars + [f"##{char}" for char in chars]
    if vocab_size < len(entries):
        raise ValueError(
            f"build_wordpiece_vocab({path}): vocab_size={vocab_size} is smaller than the "
            f"{len(entries)} entries needed for the special tokens and characters"
        )
    seen = set(entries)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    for word, count in ranked:
        if len(entries) >= vocab_size or count < min_frequency:
            break
        if word not in seen:
            entries.append(word)
            seen.add(word)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{entry}\n" for entry in entries), encoding="utf-8")
    logger.debug("wrote %d-entry vocabulary to %s", len(entries), out)
    return out


def _check_vocabulary(tokenizer: BertTokenizer, source: str) -> None:
    """Fail loudly when a BERT tokenizer came back without a usable vocabulary.

    transformers 5 does not raise when a vocabulary file is missing: it builds a tokenizer whose
    vocabulary is only the five special tokens. Catch that here instead of training on [UNK]s.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer vocabulary from {source} lacks the special tokens {missing}")
    if len(tokenizer) <= len(SPECIAL_TOKENS):
        raise FileNotFoundError(
            f"no tokenizer vocabulary was found at {source} (only the {len(tokenizer)} special "
            "tokens); pass a local directory holding vocab.txt or the vocab.txt file itself"
        )


class TextTokenizer:
    """Batch tokenizer giving ALBEF's ``[CLS] w1 ... wn`` form (or BERT's form with ``add_sep``).

    Wraps a fast ``transformers.BertTokenizer`` and uses its batch API, so a batch is tokenised in
    Rust rather than caption by caption in Python. Outputs never include ``token_type_ids``: ALBEF
    never feeds them, and its own tokenizer returns them with a wrong length.
    """

    def __init__(
        self, hf_tokenizer: BertTokenizer, add_sep: bool = False, source: str = ""
    ) -> None:
        """Wrap an already-built Hugging Face tokenizer.

        Args:
            hf_tokenizer: A ``BertTokenizer`` (in transformers 5 this is the fast tokenizer).
            add_sep: False for ALBEF's form ``[CLS] w1 ... wn``; True for ``[CLS] w1 ... wn [SEP]``.
            source: Where the vocabulary came from, used in error messages.
        """
        self._hf = hf_tokenizer
        self.add_sep = add_sep
        self.source = source or getattr(hf_tokenizer, "name_or_path", "") or "<in-memory>"
        _check_vocabulary(hf_tokenizer, self.source)
        self._special_ids = frozenset(int(i) for i in hf_tokenizer.all_special_ids)

    @classmethod
    def from_vocab_file(cls, path: str | Path, add_sep: bool = False) -> TextTokenizer:
        """Build a lower-casing BERT tokenizer from a ``vocab.txt`` file."""
        vocab_path = Path(path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary file {vocab_path} does not exist")
        # BertTokenizer(vocab=...) reads the file; BertTokenizer(vocab_file=...) is silently
        # ignored in transformers 5 and yields a 5-token vocabulary.
        return cls(BertTokenizer(vocab=str(vocab_path)), add_sep=add_sep, source=str(vocab_path))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, add_sep: bool = False, local_files_only: bool = True
    ) -> TextTokenizer:
        """Load a BERT tokenizer from a vocab file, a local directory or (if allowed) the hub.

        Args:
            name_or_path: A ``vocab.txt`` file, a directory holding ``vocab.txt`` (and possibly
                ``tokenizer_config.json``), or a hub name such as ``bert-base-uncased``.
            add_sep: See :class:`TextTokenizer`.
            local_files_only: When True (the default) nothing is downloaded: a hub name only works
                if it is already in the local cache.

        Raises:
            FileNotFoundError: If no vocabulary can be found locally.
        """
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_vocab_file(path, add_sep=add_sep)
        where = "local directory" if path.is_dir() else "hub name"
        try:
            hf = BertTokenizer.from_pretrained(str(name_or_path), local_files_only=local_files_only)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load a tokenizer from {where} {name_or_path!r} "
                f"(local_files_only={local_files_only}); pass a local directory holding vocab.txt "
                "or the vocab.txt file itself"
            ) from err
        return cls(hf, add_sep=add_sep, source=str(name_or_path))

    @property
    def pad_id(self) -> int:
        """Id of [PAD]."""
        return int(self._hf.pad_token_id)

    @property
    def cls_id(self) -> int:
        """Id of [CLS]."""
        return int(self._hf.cls_token_id)

    @property
    def sep_id(self) -> int:
        """Id of [SEP] (present in the vocabulary even when ``add_sep`` is False)."""
        return int(self._hf.sep_token_id)

    @property
    def mask_id(self) -> int:
        """Id of [MASK]."""
        return int(self._hf.mask_token_id)

    @property
    def unk_id(self) -> int:
        """Id of [UNK]."""
        return int(self._hf.unk_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, i.e. the size the word-embedding table needs."""
        return len(self._hf)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special tokens ([PAD], [UNK], [CLS], [SEP], [MASK])."""
        return self._special_ids

    def __repr__(self) -> str:
        """Source, vocabulary size and form, for logs."""
        return (
            f"TextTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"add_sep={self.add_sep})"
        )

    def __call__(
        self,
        captions: Sequence[str],
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
        truncation: bool = True,
        return_word_ids: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of captions.

        Args:
            captions: The captions (already cleaned with ``pre_caption``).
            max_length: Total length including [CLS] (and [SEP] with ``add_sep``). Required for
                ``padding="max_length"``; with ``truncation`` it caps the length.
            padding: ``"longest"`` pads to the longest caption of the batch; ``"max_length"`` pads
                to ``max_length`` (longer captions stay longer when ``truncation`` is False).
            truncation: Cut captions to ``max_length`` tokens (if ``max_length`` is None, to the
                tokenizer's model maximum).
            return_word_ids: Also return ``word_ids`` (B, L) int64: the index of the word each
                token belongs to, -1 at [CLS], [SEP] and padding.

        Returns:
            ``input_ids`` and ``attention_mask``, both (B, L) int64, plus ``word_ids`` on request.

        Raises:
            TypeError: If ``captions`` is a single string.
            ValueError: If the batch is empty or the length settings are inconsistent.
        """
        if isinstance(captions, str):
            raise TypeError("TextTokenizer expects a sequence of captions, got a single str")
        if len(captions) == 0:
            raise ValueError("TextTokenizer got an empty batch of captions")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        # Without [SEP] the Hugging Face template cannot be used (it always appends [SEP]), so the
        # words are tokenised without special tokens in one batched call and [CLS] is prepended.
        enc = self._hf(
            list(captions),
            add_special_tokens=self.add_sep,
            padding=padding,
            truncation=truncation,
            max_length=self._backend_length(max_length, padding, truncation),
            return_tensors="pt",
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        input_ids = enc["input_ids"].long()
        attention_mask = enc["attention_mask"].long()
        if not self.add_sep:
            batch = input_ids.shape[0]
            input_ids = torch.cat([input_ids.new_full((batch, 1), self.cls_id), input_ids], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones((batch, 1)), attention_mask], dim=1)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_word_ids:
            out["word_ids"] = _word_id_tensor(enc, input_ids.shape, offset=0 if self.add_sep else 1)
        return out

    def _backend_length(self, max_length: int | None, padding: str, truncation: bool) -> int | None:
        """The ``max_length`` to pass to the Hugging Face call.

        Without [SEP], [CLS] is added afterwards, so every limit shrinks by one. With truncation
        and no explicit limit, the tokenizer's model maximum (e.g. 512 for BERT) still counts
        [CLS]; a huge placeholder maximum (plain vocab files) means no limit.
        """
        if padding == "longest" and not truncation:
            return None  # nothing would use it; passing it only triggers a warning
        limit = max_length
        if limit is None and truncation and self._hf.model_max_length < _NO_MODEL_LIMIT:
            limit = int(self._hf.model_max_length)
        if limit is None:
            return None
        n_special = 2 if self.add_sep else 1
        if limit <= n_special:
            raise ValueError(f"max_length={limit} leaves no room for words")
        return limit if self.add_sep else limit - 1

    def real_token_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Positions holding real word pieces: attended and not a special id.

        [CLS], [SEP], [PAD], [MASK] and [UNK] are all excluded ([UNK] carries no word identity and
        [MASK] only appears after text masking).

        Returns:
            A bool tensor shaped like ``input_ids``.
        """
        special = torch.tensor(
            sorted(self._special_ids), dtype=input_ids.dtype, device=input_ids.device
        )
        return attention_mask.bool() & ~torch.isin(input_ids, special)

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = False) -> str:
        """Turn one sequence of ids back into text (for visualisation and debugging)."""
        return self._hf.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Token strings of one sequence of ids, one per position (for per-token plots)."""
        return list(self._hf.convert_ids_to_tokens(_as_id_list(ids)))


def _word_id_tensor(enc: BatchEncoding, shape: torch.Size, offset: int) -> torch.Tensor:
    """(B, L) int64 word index per token from a fast-tokenizer encoding; -1 where there is none.

    ``offset`` shifts the columns right when [CLS] was prepended outside the tokenizer.
    """
    word_ids = torch.full(shape, -1, dtype=torch.long)
    for row in range(shape[0]):
        for col, word in enumerate(enc.word_ids(row)):
            if word is not None:
                word_ids[row, col + offset] = word
    return word_ids


def _as_id_list(ids: torch.Tensor | Sequence[int]) -> list[int]:
    """Accept a 1-D tensor or a sequence of ints and return a list of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]
