"""Caption cleaning with ALBEF's exact rules.

ALBEF cleans every caption before tokenising it (``pre_caption`` in its ``dataset/utils.py``).
The cleaning changes which words reach the tokenizer, so it is part of the baseline: a different
cleaning changes token counts, MLM candidates and retrieval numbers.
"""

from __future__ import annotations

import re

# Characters ALBEF deletes outright (after lowercasing). Note that '<' and '>' survive, which is
# what lets the later '<person>' replacement still match.
_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
# Only runs of two or more whitespace characters are collapsed; a single tab or newline inside a
# caption is kept as it is, exactly as in ALBEF.
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption the way ALBEF does and keep at most ``max_words`` words.

    Steps, in ALBEF's order: lowercase and delete ``, . ' ! ? " ( ) * # : ; ~``; replace ``-``
    and ``/`` by a space and ``<person>`` by ``person``; collapse runs of two or more whitespace
    characters into one space; strip a trailing newline and surrounding spaces; keep the first
    ``max_words`` space-separated words.

    Args:
        caption: The raw caption.
        max_words: Maximum number of space-separated words kept (ALBEF uses 30).

    Returns:
        The cleaned caption (possibly empty if the caption held only deleted characters).

    Raises:
        TypeError: If ``caption`` is not a string.
        ValueError: If ``max_words`` is not positive.
    """
    if not isinstance(caption, str):
        raise TypeError(f"pre_caption expects a str caption, got {type(caption).__name__}")
    if max_words <= 0:
        raise ValueError(f"pre_caption: max_words must be positive, got {max_words}")
    text = _DELETED_CHARS.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
