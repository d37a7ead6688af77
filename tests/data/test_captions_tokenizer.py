"""Caption cleaning (ALBEF's pre_caption) and the ALBEF-convention tokenizer."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from model.data.captions import pre_caption
from model.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, build_wordpiece_vocab

CAPTIONS = [
    "a small red circle to the left of a large blue square",
    "there is a blue square to the right of a red circle",
    "the green triangle is above the purple circle",
    "a large yellow square",
    "A Man riding a bike!",
]
LONG_CAPTION = " ".join(["a small red circle to the left of a large blue square"] * 4)  # 48 words


@pytest.fixture()
def vocab_file(tmp_path: Path) -> Path:
    return build_wordpiece_vocab(CAPTIONS, tmp_path / "vocab.txt")


@pytest.fixture()
def tokenizer(vocab_file: Path) -> TextTokenizer:
    return TextTokenizer.from_vocab_file(vocab_file)


# --- pre_caption -------------------------------------------------------------------------------


def test_pre_caption_matches_albef_verified_example() -> None:
    raw = 'A man--riding/a <person> "bike"!!  Near   the (old) tree; at 5:30 p.m.~'
    assert pre_caption(raw) == "a man riding a person bike near the old tree at 530 pm"


def test_pre_caption_truncates_words_and_strips() -> None:
    assert pre_caption("  One two three four  \n", max_words=2) == "one two"
    assert pre_caption(LONG_CAPTION, max_words=30).count(" ") == 29
    assert pre_caption("Hello, World.\n") == "hello world"


def test_pre_caption_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError):
        pre_caption(["not", "a", "string"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a caption", max_words=0)


# --- vocabulary --------------------------------------------------------------------------------


def test_vocab_has_specials_first_and_every_word(vocab_file: Path) -> None:
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(SPECIAL_TOKENS)
    words = {w.lower().strip("!") for c in CAPTIONS for w in c.split()}
    chars = {ch for w in words | {"!"} for ch in w}
    assert set(lines) == set(SPECIAL_TOKENS) | words | chars | {f"##{c}" for c in chars}
    assert len(lines) == len(set(lines))


def test_vocab_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    a = build_wordpiece_vocab(CAPTIONS * 3, tmp_path / "a.txt")
    b = build_wordpiece_vocab(list(reversed(CAPTIONS * 3)), tmp_path / "b.txt")
    assert a.read_bytes() == b.read_bytes()


def test_vocab_size_limit_keeps_most_frequent_words(tmp_path: Path) -> None:
    path = build_wordpiece_vocab(["red red red blue blue green"], tmp_path / "v.txt", vocab_size=40)
    lines = path.read_text(encoding="utf-8").splitlines()
    n_base = 5 + 2 * len(set("redbluegreen"))
    assert len(lines) == min(40, n_base + 3)
    assert lines[n_base:] == ["red", "blue", "green"][: 40 - n_base]
    with pytest.raises(ValueError, match="vocab_size"):
        build_wordpiece_vocab(["red"], tmp_path / "w.txt", vocab_size=6)
    with pytest.raises(ValueError, match="no words"):
        build_wordpiece_vocab(["", "   "], tmp_path / "x.txt")


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_ids_and_vocab_size(tokenizer: TextTokenizer, vocab_file: Path) -> None:
    n_lines = len(vocab_file.read_text(encoding="utf-8").splitlines())
    # BertTokenizerFast(vocab_file=...) would silently give 5 here.
    assert tokenizer.vocab_size == n_lines > 5
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id) == (0, 1, 2)
    assert (tokenizer.sep_id, tokenizer.mask_id) == (3, 4)
    assert tokenizer.special_ids == frozenset(range(5))


def test_albef_form_has_cls_and_no_sep(tokenizer: TextTokenizer) -> None:
    out = tokenizer([pre_caption(c) for c in CAPTIONS])
    assert set(out) == {"input_ids", "attention_mask"}  # never token_type_ids
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64
    assert (ids[:, 0] == tokenizer.cls_id).all()
    assert not (ids == tokenizer.sep_id).any()
    lengths = mask.sum(1)
    # Whole-word vocabulary: [CLS] + one token per word.
    assert lengths.tolist() == [1 + len(pre_caption(c).split()) for c in CAPTIONS]
    assert ids.shape[1] == int(lengths.max())
    assert (ids[mask == 0] == tokenizer.pad_id).all()


def test_add_sep_gives_bert_form(vocab_file: Path) -> None:
    tok = TextTokenizer.from_vocab_file(vocab_file, add_sep=True)
    out = tok(["a red circle", "a large yellow square"])
    ids, mask = out["input_ids"], out["attention_mask"]
    last = mask.sum(1) - 1
    assert (ids[:, 0] == tok.cls_id).all()
    assert (ids[torch.arange(2), last] == tok.sep_id).all()
    assert ids.shape == (2, 6)
    assert tok(["a red circle"], max_length=3)["input_ids"].tolist()[0][-1] == tok.sep_id


def test_pretrain_lengths_longest_truncated_to_25(tokenizer: TextTokenizer) -> None:
    out = tokenizer([pre_caption(LONG_CAPTION), "a red circle"], max_length=25)
    assert out["input_ids"].shape == (2, 25)
    assert out["attention_mask"][0].sum() == 25
    assert out["attention_mask"][1].sum() == 4
    short = tokenizer(["a red circle", "a blue square"], max_length=25)
    assert short["input_ids"].shape == (2, 4)  # padded to the longest, not to 25


def test_eval_lengths_padded_to_exactly_30(tokenizer: TextTokenizer) -> None:
    out = tokenizer(
        [pre_caption(LONG_CAPTION), "a red circle"], max_length=30, padding="max_length"
    )
    assert out["input_ids"].shape == (2, 30)
    assert out["attention_mask"].sum(1).tolist() == [30, 4]


def test_no_truncation_can_exceed_max_length(tokenizer: TextTokenizer) -> None:
    # ALBEF's retrieval training: a 30-word caption gives 31 tokens.
    caption = pre_caption(LONG_CAPTION, max_words=30)
    out = tokenizer([caption], max_length=30, truncation=False)
    assert out["input_ids"].shape == (1, 31)


def test_model_max_length_counts_cls(vocab_file: Path) -> None:
    hf = TextTokenizer.from_vocab_file(vocab_file)._hf
    hf.model_max_length = 8  # as bert-base-uncased's 512, scaled down
    tok = TextTokenizer(hf)
    assert tok([pre_caption(LONG_CAPTION)])["input_ids"].shape == (1, 8)
    assert tok([LONG_CAPTION], truncation=False)["input_ids"].shape == (1, 49)


def test_bad_calls_raise(tokenizer: TextTokenizer) -> None:
    with pytest.raises(TypeError):
        tokenizer("a single string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        tokenizer([])
    with pytest.raises(ValueError, match="max_length"):
        tokenizer(["a red circle"], padding="max_length")
    with pytest.raises(ValueError, match="no room"):
        tokenizer(["a red circle"], max_length=1)


def test_word_ids_and_real_token_mask(tokenizer: TextTokenizer) -> None:
    out = tokenizer(["a red bred zebra", "a circle"], return_word_ids=True)
    ids, mask, word_ids = out["input_ids"], out["attention_mask"], out["word_ids"]
    # "bred" is not in the vocabulary: it becomes the pieces b ##r ##e ##d of one word; "zebra"
    # has a character never seen, so it is a single [UNK].
    assert tokenizer.convert_ids_to_tokens(ids[0]) == [
        "[CLS]",
        "a",
        "red",
        "b",
        "##r",
        "##e",
        "##d",
        "[UNK]",
    ]
    assert word_ids[0].tolist() == [-1, 0, 1, 2, 2, 2, 2, 3]
    assert word_ids[1].tolist() == [-1, 0, 1, -1, -1, -1, -1, -1]
    real = tokenizer.real_token_mask(ids, mask)
    assert real.dtype == torch.bool
    assert real[0].tolist() == [False] + [True] * 6 + [False]
    assert real[1].tolist() == [False, True, True] + [False] * 5


def test_decode_and_tokens(tokenizer: TextTokenizer) -> None:
    ids = tokenizer(["a red circle"])["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tokenizer.decode(ids.tolist()).startswith("[CLS]")


def test_tokenizer_pickles(tokenizer: TextTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    batch = ["a small red circle", "a blue square"]
    assert torch.equal(clone(batch)["input_ids"], tokenizer(batch)["input_ids"])


def test_from_pretrained_local_dir_and_file(vocab_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(vocab_file.read_bytes())
    from_dir = TextTokenizer.from_pretrained(folder)
    from_file = TextTokenizer.from_pretrained(vocab_file)
    assert from_dir.vocab_size == from_file.vocab_size > 5
    assert torch.equal(
        from_dir(["a red circle"])["input_ids"], from_file(["a red circle"])["input_ids"]
    )


def test_from_pretrained_without_local_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local directory"):
        TextTokenizer.from_pretrained("no-such-org/no-such-tokenizer", local_files_only=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        TextTokenizer.from_pretrained(empty)
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_vocab_file(tmp_path / "missing.txt")
