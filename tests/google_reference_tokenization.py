"""Plain-Python reference of google-research/bert's tokenization rules (test helper).

Written from the published rules (``tokenization.py`` + ``run_classifier``'s
``_truncate_seq_pair`` / ``convert_single_example``), not from the library under
test, so that :mod:`bertpool.common.tokenizer` can be checked against it. It is
deliberately slow and literal: one character at a time, Python ``unicodedata``
for every character class, a Python loop for truncation.

Rules, in order:

1. Clean: drop NUL, U+FFFD and control characters (categories Cc and Cf
   only, except tab, newline and carriage return: google's ``_is_control``
   since its 2019 "support emojis" change); map whitespace (space, tab, newline, CR and
   category Zs) to a space.
2. Put spaces around every CJK ideograph.
3. Split on whitespace (Python ``str.split()``). For each word: when lower
   casing, ``str.lower()`` it, NFD-decompose it and drop nonspacing marks (Mn);
   then cut it before and after every punctuation character (ASCII 33-47,
   58-64, 91-96, 123-126, or category P*).
4. WordPiece each piece: greedy longest match first from the left, later pieces
   prefixed with ``##``; a word of more than 200 characters, or one that cannot
   be covered by vocabulary pieces, becomes a single ``[UNK]``.
5. Pair features: truncate (pop from the end of the longer list, from b on a
   tie) until ``len(a) + len(b) <= max_seq_length - 3``; lay out
   ``[CLS] a [SEP] b [SEP]`` with segment 0 up to and including the first
   ``[SEP]``, 1 after; mask 1 on real tokens; zero-pad to ``max_seq_length``.

One deliberate difference from ``convert_single_example``: google treats an
empty ``text_b`` as "no second sentence" (``[CLS] a [SEP]``, a truncated to
``max_seq_length - 2``). bertpool always serves pairs, so here, as in the
tokenizer under test, an empty b still gives ``[CLS] a [SEP] [SEP]``.
"""

from __future__ import annotations

import os
import unicodedata

MAX_CHARS_PER_WORD = 200

# Code point ranges google counts as CJK ideographs (the CJK Unified Ideographs
# blocks and extensions A-E plus the compatibility ideographs); Hangul, kana
# and CJK punctuation are *not* included.
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

ASCII_PUNCT_RANGES = ((33, 47), (58, 64), (91, 96), (123, 126))


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Token -> id, one token per line; the id is the 0-based line number.

    Each line is stripped of surrounding whitespace; a later duplicate wins.
    """
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()  # the text after the final newline is not a line
    return {line.strip(): index for index, line in enumerate(lines)}


def is_whitespace(ch: str) -> bool:
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def is_control(ch: str) -> bool:
    if ch in ("\t", "\n", "\r"):
        return False  # these count as whitespace, not control
    return unicodedata.category(ch) in ("Cc", "Cf")


def is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in ASCII_PUNCT_RANGES):
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def clean_text(text: str) -> str:
    out = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or is_control(ch):
            continue
        out.append(" " if is_whitespace(ch) else ch)
    return "".join(out)


def space_cjk(text: str) -> str:
    return "".join(f" {ch} " if is_cjk(ch) else ch for ch in text)


def strip_accents(word: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")


def split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current = ""
    for ch in word:
        if is_punctuation(ch):
            if current:
                pieces.append(current)
                current = ""
            pieces.append(ch)
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def basic_tokenize(text: str, lower: bool) -> list[str]:
    """Words and punctuation marks of ``text`` (google's BasicTokenizer)."""
    words = space_cjk(clean_text(text)).split()
    pieces: list[str] = []
    for word in words:
        if lower:
            word = strip_accents(word.lower())
        pieces.extend(split_punctuation(word))
    # Re-split: lower casing / NFD may, in principle, have produced whitespace.
    return " ".join(pieces).split()


def wordpiece(word: str, vocab: dict[str, int], unk: str = "[UNK]") -> list[str]:
    """Greedy longest-match-first WordPiece of one whitespace-free word."""
    if len(word) > MAX_CHARS_PER_WORD:
        return [unk]
    pieces: list[str] = []
    start = 0
    while start < len(word):
        end = len(word)
        match = None
        while end > start:
            candidate = word[start:end] if start == 0 else "##" + word[start:end]
            if candidate in vocab:
                match = candidate
                break
            end -= 1
        if match is None:
            return [unk]
        pieces.append(match)
        start = end
    return pieces


def tokenize(text: str, vocab: dict[str, int], lower: bool) -> list[str]:
    """All wordpieces of ``text`` (google's FullTokenizer.tokenize)."""
    out: list[str] = []
    for word in basic_tokenize(text, lower):
        for sub in word.split():
            out.extend(wordpiece(sub, vocab))
    return out


def truncate_pair(a: list, b: list, max_total: int) -> None:
    """Pop from the end of the longer list (b on a tie) until they fit, in place."""
    while len(a) + len(b) > max_total:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()


def pair_features(
    text_a: str, text_b: str, vocab: dict[str, int], lower: bool, max_seq_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, input_mask, segment_ids) of one pair, each ``max_seq_length`` long."""
    a = tokenize(text_a, vocab, lower)
    b = tokenize(text_b, vocab, lower)
    truncate_pair(a, b, max_seq_length - 3)
    tokens = ["[CLS]"] + a + ["[SEP]"] + b + ["[SEP]"]
    segments = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    ids = [vocab[t] for t in tokens]
    mask = [1] * len(ids)
    pad = max_seq_length - len(ids)
    return ids + [0] * pad, mask + [0] * pad, segments + [0] * pad
