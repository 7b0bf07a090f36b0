"""WordPiece vocabulary files: the one reader, the one writer and the one layout generator.

A vocab.txt holds one token per line; a token's id is its 0-based line number, and
the number of lines must equal the rows of the model's word embeddings. Reading
follows google-research/bert ``tokenization.load_vocab``, which every BERT vocab
file was written for:

* lines end at ``"\\n"`` only (its reader splits there; a lone ``"\\r"`` is not a
  line break, so it cannot shift every later id by one);
* each line is stripped of surrounding whitespace, so ``"\\r\\n"`` files and stray
  spaces or tabs around a token read as the bare token;
* text after the final ``"\\n"`` is a line only if it is not empty.

One departure: a UTF-8 byte-order mark at the start of the file (some editors write one) is
dropped, not read as part of token 0, so ``[PAD]`` stays ``[PAD]`` and no id moves.

Generated vocabularies (demo models, the echo backend) share Google's uncased
layout, so every BERT tokenizer handles them: ``[PAD]`` = 0, ``[unused0..98]`` =
1..99, ``[UNK]`` = 100, ``[CLS]`` = 101, ``[SEP]`` = 102, ``[MASK]`` = 103, then
the body, then ``[unusedK]`` filler up to the requested size.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import BertpoolError, ConfigError
from .textfile import decode_utf8

REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # what a tokenizer and a model need
HEAD = ("[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(path: str | os.PathLike, error: type[BertpoolError] = ConfigError) -> list[str]:
    """The tokens of a vocab.txt, in id order (module docstring: the rules).

    An unreadable, non-UTF-8 (naming the line and byte offset) or empty file raises ``error``:
    ConfigError where the user named the file, ModelFormatError where it belongs to a model directory.
    """
    try:
        with open(path, "rb") as f:  # bytes: no newline translation, we split on "\n" ourselves
            raw = f.read()
    except OSError as exc:
        raise error(f"cannot read vocabulary file {os.fspath(path)!r}: {exc}") from exc
    text = decode_utf8(raw, f"vocabulary file {os.fspath(path)}", error, lf_only=True)  # lines as split below
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()  # text after the final newline is not a line
    if not lines:
        raise error(f"vocabulary file {os.fspath(path)!r} is empty")
    return [line.strip() for line in lines]


def write_vocab(path: str | os.PathLike, tokens: Iterable[str]) -> Path:
    """Write one token per line (the vocab.txt format); returns the path."""
    path = Path(path)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def bert_vocab(body: Iterable[str], size: int | None = None) -> list[str]:
    """:data:`HEAD`, then ``body`` (each token once, first occurrence wins, head tokens skipped),
    cut or filled with ``[unusedK]`` to exactly ``size`` tokens (None: the whole body, no filler)."""
    seen = set(HEAD)
    unique = (t for t in body if not (t in seen or seen.add(t)))
    rest = unique if size is None else itertools.islice(unique, max(0, size - len(HEAD)))
    tokens = list(HEAD) + list(rest)
    filler = (f"[unused{i}]" for i in itertools.count(99))
    while size is not None and len(tokens) < size:
        tokens.append(next(filler))
    return tokens
