"""BERT WordPiece features for sentence pairs, identical to google-research/bert.

:class:`BertTokenizer` turns ``(text_a, text_b)`` pairs into the three int32
arrays a BERT classifier takes, with exactly the rules of google-research/bert
``tokenization.FullTokenizer`` and ``run_classifier.convert_single_example``:

* BasicTokenizer: drop NUL, U+FFFD and control characters (categories Cc and
  Cf, as google's current ``_is_control``; unassigned and private-use code
  points are kept and usually end as ``[UNK]``, a lone surrogate always
  makes its word ``[UNK]``), map whitespace to
  spaces, put spaces around CJK ideographs, lower-case and strip accents (NFD,
  drop Mn) only when ``do_lower_case``, split on whitespace and punctuation.
* WordPiece: greedy longest-match-first with ``##`` continuation pieces;
  ``[UNK]`` for a word longer than 200 characters or one that cannot be split.
* Pair layout: ``[CLS] a [SEP] b [SEP]``; segment ids 0 up to and including
  the first ``[SEP]``, 1 after it; input mask 1 on real tokens; zero padding
  to ``max_seq_length``. Pairs that are too long are truncated with google's
  ``_truncate_seq_pair`` rule: drop the last wordpiece of the longer side
  (of b on a tie) until ``len(a) + len(b) <= max_seq_length - 3``.

The work is done by HuggingFace ``tokenizers`` (BertNormalizer,
BertPreTokenizer, WordPiece) for text whose characters all lie in
:data:`FAST_PATH_CHARS`, where its Unicode tables and google's (Python's
``unicodedata``) agree character by character. Other text (Greek, CJK,
unassigned code points, ...) goes through a plain-Python BasicTokenizer and
then HF's WordPiece model, because HF's character tables are older than
Python's and it lower-cases per character (no final-sigma rule), so the two
would differ there. Text of printable ASCII, tab, newline and carriage return
only (most English input) skips HF's normalizer and pre-tokenizer: ``str.lower``
and a regular expression give the same words, and each word's WordPiece ids
(HF's WordPiece model's) are cached, so a text is mostly dictionary lookups (a
third of HF's time on MRPC's texts; up to 64k words per tokenizer).

HF's own pair truncation is not used: its ``longest_first`` gives the extra
token of an odd budget to the second text on a tie, google's to the first.

One deliberate difference from ``convert_single_example``: google treats an
empty ``text_b`` as a single-sentence example; bertpool always serves pairs,
so an empty b gives ``[CLS] a [SEP] [SEP]``.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import unicodedata
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer, models, normalizers, pre_tokenizers

from .errors import ConfigError
from .vocab import REQUIRED_TOKENS, read_vocab

DEFAULT_MAX_SEQ_LENGTH = 128
MAX_CHARS_PER_WORD = 200  # google's max_input_chars_per_word (HF's default is 100)

# Characters for which HF's BertNormalizer + BertPreTokenizer were checked to
# behave exactly like google's BasicTokenizer, one character at a time (see
# tests/test_tokenizer.py::test_fast_path_chars_agree_with_reference): Basic
# Latin through Combining Diacritical Marks, General Punctuation (less the
# unassigned U+2065) and Currency Symbols up to U+20BF. None of them is Greek
# capital sigma, the one character Python lower-cases by context.
FAST_PATH_CHARS = "\u0000-\u036f\u2000-\u2064\u2066-\u206f\u20a0-\u20bf"
_SLOW_CHAR = re.compile(f"[^{FAST_PATH_CHARS}]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # slow-path characters: none is in FAST_PATH_CHARS
_UNK = "[UNK]"

# Text made only of printable ASCII, tab, newline and carriage return needs
# none of BertNormalizer's work but lower-casing: it has no control characters
# to drop, no accents, no CJK, and the three whitespace controls are split on
# by BertPreTokenizer exactly as the spaces clean_text would turn them into.
# Such text skips HF's normalizer (about a third of HF's time per text) and is
# lower-cased by str.lower, which equals HF's lower-casing on ASCII (see
# tests/test_tokenizer.py::test_lean_path_equals_full_pipeline).
_NOT_LEAN_CHAR = re.compile(r"[^\t\n\r\x20-\x7e]")
# The words BertPreTokenizer cuts lean text into: runs of ASCII letters and digits, and each other
# printable character alone (every one of them is punctuation to BERT: ASCII 33-47, 58-64, 91-96,
# 123-126); whitespace only separates. A lean text's WordPiece ids are its words' ids in order,
# which BertTokenizer caches per word (see BertTokenizer._lean_ids).
_LEAN_WORD = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
# A tokenizer's word cache is emptied when it would grow past this many words: about 20 MB when full
# (measured with 64k random 3-12-letter words), beside a model's hundreds.
MAX_CACHED_WORDS = 1 << 16
# Up to this many pairs, rows are filled one at a time (three slice assignments each); more, with one
# vectorized scatter, whose fixed cost (about ten numpy calls) only pays off for larger batches.
ROW_FILL_MAX = 8

# google's CJK ideograph ranges (Unified Ideographs + extensions A-E and the
# compatibility ideographs); Hangul, kana and CJK punctuation are not in it.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

# Vocabulary entries such as [CLS], [UNK], [unused0] are markers, not words:
# their capitals say nothing about whether the vocabulary is cased.
_MARKER = re.compile(r"\[[^\[\]]*\]")
_UPPER_ASCII = re.compile(r"[A-Z]")

# Character kinds for the plain-Python BasicTokenizer's cleaning pass
# (punctuation is decided later, after lower-casing and accent stripping).
_DROP, _SPACE, _CJK, _OTHER = range(4)


PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"  # HF tokenizers' switch for its own thread pool


def serial_tokenizers(env: MutableMapping[str, str] | None = None) -> None:
    """Set ``TOKENIZERS_PARALLELISM=false`` in ``env`` (None: this process's os.environ) unless it is
    already set (a value someone chose is kept). HF tokenizers reads it when it encodes: run this before
    the first encode.

    Why: a worker encodes small batches (a few pairs), one worker per core; HF's thread pool only
    adds hand-off latency there and oversubscribes the cores the other workers use. The one home of
    this setting for every process that runs workers (bertpool-worker, the supervisor's children,
    the benches' in-process workers)."""
    (os.environ if env is None else env).setdefault(PARALLELISM_ENV, "false")


@dataclass(frozen=True)
class Features:
    """Model inputs for N pairs: int32 arrays, each of shape ``[N, max_seq_length]``.

    ``input_ids`` are vocabulary ids (0 after the last real token),
    ``input_mask`` is 1 on real tokens and 0 on padding, ``segment_ids`` is 0
    for ``[CLS] a [SEP]`` and padding, 1 for ``b [SEP]``.
    """

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray


class BertTokenizer:
    """google-research/bert sentence-pair features from a WordPiece vocabulary file.

    ``vocab_path``: one token per line, id = 0-based line number, read by
    :func:`bertpool.common.vocab.read_vocab` (google's ``load_vocab`` rules; a
    later duplicate wins); it must contain ``[PAD]``, ``[UNK]``, ``[CLS]`` and ``[SEP]``.
    ``do_lower_case``: ``None`` decides from the vocabulary: lower-case unless
    some entry other than a bracketed marker like ``[CLS]`` or ``[unused0]``
    has an ASCII capital. ``max_seq_length``: length S of every feature row,
    at least 3.

    Raises :class:`~bertpool.common.errors.ConfigError` for an unreadable,
    empty or incomplete vocabulary and for a bad ``max_seq_length``.

    Thread safety: an instance is never mutated after ``__init__`` (HF
    truncation/padding are never enabled; truncation and layout are done here),
    and HF ``Tokenizer.encode_batch`` may be called from several threads at
    once, so concurrent :meth:`encode_pairs` / :meth:`tokenize` calls are safe.
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike,
        do_lower_case: bool | None = None,
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    ) -> None:
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 3:
            raise ConfigError(
                f"max_seq_length must be an integer >= 3 ([CLS] a [SEP] b [SEP] needs 3 slots), "
                f"got {max_seq_length!r}"
            )
        if do_lower_case is not None and not isinstance(do_lower_case, bool):
            raise ConfigError(f"do_lower_case must be True, False or None, got {do_lower_case!r}")
        vocab, size = _load_vocab(vocab_path)
        self._vocab_size = size
        self._max_seq_length = max_seq_length
        self._do_lower_case = _looks_uncased(vocab) if do_lower_case is None else do_lower_case
        self._cls_id = vocab["[CLS]"]
        self._sep_id = vocab["[SEP]"]
        self._full = _full_pipeline(vocab, self._do_lower_case)
        self._lean = _lean_pipeline(vocab)
        self._wordpiece_only = Tokenizer(_wordpiece_model(vocab))
        self._word_ids: dict[str, list[int]] = {}  # lean word -> its WordPiece ids (see _lean_ids)
        self._columns = np.arange(max_seq_length, dtype=np.int32)
        self._columns.flags.writeable = False

    @property
    def vocab_size(self) -> int:
        """Number of lines in the vocabulary file (= rows of the embedding table)."""
        return self._vocab_size

    @property
    def do_lower_case(self) -> bool:
        """Whether text is lower-cased and accent-stripped before WordPiece."""
        return self._do_lower_case

    @property
    def max_seq_length(self) -> int:
        """Length S of every feature row."""
        return self._max_seq_length

    @property
    def cls_id(self) -> int:
        """Vocabulary id of ``[CLS]`` (first token of every row)."""
        return self._cls_id

    @property
    def sep_id(self) -> int:
        """Vocabulary id of ``[SEP]`` (ends a and b)."""
        return self._sep_id

    def tokenize(self, text: str) -> list[str]:
        """The wordpieces of one text, without special tokens or truncation."""
        return self._encode_texts([_check_text(text)], with_tokens=True)[0].tokens

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> Features:
        """Features for ``pairs`` (N ``(text_a, text_b)`` tuples): arrays ``[N, S]``.

        Texts may be empty. Raises TypeError if a pair is not two ``str``.
        """
        input_ids, input_mask, segment_ids = self.encode_stacked(pairs)
        return Features(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids)

    def encode_stacked(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """:meth:`encode_pairs`' three arrays in one, int32 ``[3, N, S]`` (input_ids, input_mask,
        segment_ids): ``[:, i]`` is pair i's features, as a worker queues them, with no copy."""
        return self._assemble(self._text_ids(_pair_texts(pairs)))

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        """The WordPiece ids (no special tokens) of ``texts``, in order: lean texts from the word cache
        (:meth:`_lean_ids`), the others from HF's pipelines (:meth:`_encode_texts`).

        One character check over all texts per call; per text only when some text is not lean. Then
        each lean text still takes the lean path: sending the whole batch through the full pipeline
        because one text had an accent cost a 64-pair MRPC batch about half again."""
        if not _NOT_LEAN_CHAR.search("".join(texts)):
            return self._lean_ids(texts)
        ids: list[list[int] | None] = [None] * len(texts)
        lean = [i for i, text in enumerate(texts) if not _NOT_LEAN_CHAR.search(text)]
        for i, row in zip(lean, self._lean_ids([texts[i] for i in lean])):
            ids[i] = row
        rest = [i for i, row in enumerate(ids) if row is None]
        for i, encoding in zip(rest, self._encode_texts([texts[i] for i in rest])):
            ids[i] = encoding.ids
        return ids  # type: ignore[return-value]

    def _lean_ids(self, texts: list[str]) -> list[list[int]]:
        """The WordPiece ids of lean texts (no :data:`_NOT_LEAN_CHAR`), as the lean pipeline gives them.

        WordPiece works word by word, so a text's ids are its words' ids in order; each word's are
        cached (HF's WordPiece model is asked for the words not seen yet, all in one call). Words
        repeat, so most calls need no HF call: a third of the lean pipeline's time on MRPC's texts,
        and far less memory touched on a lone request, whose caches other processes have emptied
        meanwhile. The cache is emptied when it would pass MAX_CACHED_WORDS (ever-new words)."""
        if self._do_lower_case:
            texts = list(map(str.lower, texts))
        words = list(map(_LEAN_WORD.findall, texts))
        get = self._word_ids.get
        pieces = [list(map(get, text_words)) for text_words in words]
        if any(None in text_pieces for text_pieces in pieces):
            learned = self._learn_words(words, pieces)
            pieces = [[learned[word] if ids is None else ids for word, ids in zip(text_words, text_pieces)]
                      for text_words, text_pieces in zip(words, pieces)]
        return [list(itertools.chain.from_iterable(text_pieces)) for text_pieces in pieces]

    def _learn_words(self, words: list[list[str]], pieces: list[list[list[int] | None]]) -> dict[str, list[int]]:
        """The WordPiece ids of each word of ``words`` (per text) whose ``pieces`` entry is None (not
        cached), from HF's WordPiece model in one call; cached too."""
        new = list(dict.fromkeys(word for text_words, text_pieces in zip(words, pieces)
                                 for word, ids in zip(text_words, text_pieces) if ids is None))
        encodings = _encode_batch(self._wordpiece_only, [[word] for word in new], False, is_pretokenized=True)
        learned = {word: encoding.ids for word, encoding in zip(new, encodings)}
        if len(self._word_ids) + len(learned) > MAX_CACHED_WORDS:
            self._word_ids.clear()
        self._word_ids.update(learned)
        return learned

    def _encode_lean(self, texts: list[str], with_tokens: bool = False) -> list[Encoding]:
        """HF encodings of texts without a :data:`_NOT_LEAN_CHAR`: no normalizer, ``str.lower``."""
        if self._do_lower_case:
            texts = list(map(str.lower, texts))
        return _encode_batch(self._lean, texts, with_tokens)

    def _encode_texts(self, texts: list[str], with_tokens: bool = False) -> list[Encoding]:
        """HF encodings (no special tokens) of ``texts``, in order; ``.tokens`` only if ``with_tokens``."""
        encodings: list[Encoding | None] = [None] * len(texts)
        lean = [i for i, text in enumerate(texts) if not _NOT_LEAN_CHAR.search(text)]
        if lean:
            for i, enc in zip(lean, self._encode_lean([texts[i] for i in lean], with_tokens)):
                encodings[i] = enc
        slow = [i for i, text in enumerate(texts) if _SLOW_CHAR.search(text)]
        if slow:
            words = [_slow_words(texts[i], self._do_lower_case) for i in slow]
            for i, enc in zip(slow, _encode_batch(self._wordpiece_only, words, with_tokens, is_pretokenized=True)):
                encodings[i] = enc
        full = [i for i, enc in enumerate(encodings) if enc is None]
        if full:
            for i, enc in zip(full, _encode_batch(self._full, [texts[i] for i in full], with_tokens)):
                encodings[i] = enc
        return encodings  # type: ignore[return-value]

    def _assemble(self, ids: Sequence[list[int]]) -> np.ndarray:
        """Features ``[3, N, S]`` (ids, mask, segments) of rows ``[CLS] a [SEP] b [SEP]`` + padding,
        from the WordPiece ids of a0, b0, a1, b1, ... Each pair is truncated google's way
        (:func:`_truncated_pair_lengths`). Up to ROW_FILL_MAX rows are filled one by one, more by
        :meth:`_assemble_many`."""
        n = len(ids) // 2
        if n > ROW_FILL_MAX:
            return self._assemble_many(ids)
        seq = self._max_seq_length
        room, cls, sep = seq - 3, self._cls_id, self._sep_id
        out = np.zeros((3, n, seq), np.int32)
        pairs = iter(ids)
        for row, (a, b) in enumerate(zip(pairs, pairs)):
            len_a, len_b = len(a), len(b)
            if len_a + len_b > room:
                len_a, len_b = _truncated_pair_lengths(len_a, len_b, room)
                a, b = a[:len_a], b[:len_b]
            end = len_a + len_b + 3
            out[0, row, :end] = [cls, *a, sep, *b, sep]
            out[1, row, :end] = 1
            out[2, row, len_a + 2:end] = 1  # b and its [SEP]
        return out

    def _assemble_many(self, ids: Sequence[list[int]]) -> np.ndarray:
        """:meth:`_assemble` for many rows at once: one Python pass concatenates the kept ids of all
        rows (list concatenation runs in C); numpy then scatters them into the zero matrix through
        the input mask in one assignment, since a row's real tokens are exactly its first ``used``
        columns in row-major order."""
        seq = self._max_seq_length
        room = seq - 3
        cls, sep = [self._cls_id], [self._sep_id]
        flat: list[int] = []
        bounds: list[int] = []  # per row: first column of b, then number of real tokens
        pairs = iter(ids)
        for a, b in zip(pairs, pairs):
            len_a, len_b = len(a), len(b)
            if len_a + len_b > room:
                len_a, len_b = _truncated_pair_lengths(len_a, len_b, room)
                a, b = a[:len_a], b[:len_b]
            flat += cls
            flat += a
            flat += sep
            flat += b
            flat += sep
            bounds += (len_a + 2, len_a + len_b + 3)
        n = len(bounds) // 2
        bound = np.array(bounds, np.int32).reshape(n, 2, 1)
        real = self._columns < bound[:, 1]
        out = np.zeros((3, n, seq), np.int32)
        out[0][real] = np.fromiter(flat, np.int32, len(flat))
        out[1] = real
        # 1 on real tokens from b's first column on: the mask less the columns before b.
        np.subtract(out[1], self._columns < bound[:, 0], out=out[2])
        return out


def _truncated_pair_lengths(len_a: int, len_b: int, max_total: int) -> tuple[int, int]:
    """Lengths google's ``_truncate_seq_pair`` keeps of a pair, computed without its loop.

    The loop pops from the longer side (b on a tie) until ``a + b <= max_total``.
    A pair that fits is untouched. Otherwise b keeps ``m - a`` if a is short
    enough never to be popped (``a <= ceil(m/2)``), ``b`` itself if b is that
    short (``b <= floor(m/2)``), and else the two meet at ``ceil(m/2)`` for a
    and ``floor(m/2)`` for b (the tie rule leaves a the longer one); a keeps
    the rest. ``min(b, max(floor(m/2), m - a))`` covers all three cases.
    """
    if len_a + len_b <= max_total:
        return len_a, len_b
    keep_b = min(len_b, max(max_total // 2, max_total - len_a))
    return max_total - keep_b, keep_b


def _slow_words(text: str, lower: bool) -> list[str]:
    """The words of ``text`` for HF's WordPiece: :func:`_basic_tokenize`'s, each word holding a lone
    surrogate (U+D800-U+DFFF, category Cs, which google keeps) replaced by ``[UNK]``.

    HF cannot take such a word (it is not UTF-8; ``encode_batch`` raises a TypeError about its input
    type). google's WordPiece makes the whole word ``[UNK]``: a vocabulary is UTF-8 text, so no entry
    covers the surrogate. ``[UNK]`` itself is in every vocabulary, so WordPiece gives its id.
    """
    words = _basic_tokenize(text, lower)
    if _SURROGATE.search(text):
        words = [_UNK if _SURROGATE.search(word) else word for word in words]
    return words


def _basic_tokenize(text: str, lower: bool) -> list[str]:
    """google's BasicTokenizer in plain Python: the words and punctuation marks of ``text``.

    Used for text outside :data:`FAST_PATH_CHARS`; Python's ``unicodedata``
    defines the character classes and ``str.lower`` (with its final-sigma
    rule) is applied per whitespace-separated word, as google does.
    """
    spaced: list[str] = []
    for ch in text:
        kind = _char_kind(ch)
        if kind == _DROP:
            continue
        if kind == _SPACE:
            spaced.append(" ")
        elif kind == _CJK:
            spaced.append(f" {ch} ")
        else:
            spaced.append(ch)
    pieces: list[str] = []
    for word in "".join(spaced).split():
        if lower:
            word = _strip_accents(word.lower())
        pieces.extend(_split_punctuation(word))
    # google splits on whitespace once more: keep that, it is cheap.
    return " ".join(pieces).split()


@functools.lru_cache(maxsize=1 << 16)
def _char_kind(ch: str) -> int:
    """Drop, space, CJK or other, by google's rules (cached: text repeats characters)."""
    cp = ord(ch)
    if ch in "\t\n\r ":
        return _SPACE
    category = unicodedata.category(ch)
    # google's _is_control since 2019 ("support emojis"): only Cc and Cf are dropped;
    # unassigned (Cn), private-use (Co) and surrogate (Cs) code points stay in words.
    if cp == 0 or cp == 0xFFFD or category in ("Cc", "Cf"):
        return _DROP
    if category == "Zs":
        return _SPACE
    if any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
        return _CJK
    return _OTHER


def _is_punctuation(ch: str) -> bool:
    """ASCII 33-47, 58-64, 91-96, 123-126 (``$``, ``^``, ``` ` ``` too) or category P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _strip_accents(word: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    """``word`` cut before and after each punctuation character."""
    pieces: list[str] = []
    start = 0
    for i, ch in enumerate(word):
        if _is_punctuation(ch):
            if start < i:
                pieces.append(word[start:i])
            pieces.append(ch)
            start = i + 1
    if start < len(word):
        pieces.append(word[start:])
    return pieces


_PAIR_TYPES = frozenset((tuple, list))
_TEXT_TYPES = frozenset((str,))


def _pair_texts(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``[a0, b0, a1, b1, ...]`` of ``pairs``, or TypeError if a pair is not two ``str``.

    The common case (lists or tuples of exact ``str``) is checked by C-level
    passes over type and len; anything else gets the exact per-pair check.
    """
    if not isinstance(pairs, (list, tuple)):
        pairs = list(pairs)
    if _PAIR_TYPES.issuperset(map(type, pairs)) and all(map((2).__eq__, map(len, pairs))):
        texts = list(itertools.chain.from_iterable(pairs))
        if _TEXT_TYPES.issuperset(map(type, texts)):
            return texts
    texts = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"each pair must be a (text_a, text_b) tuple, got {type(pair).__name__}")
        texts.append(_check_text(pair[0]))
        texts.append(_check_text(pair[1]))
    return texts


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return text


def _encode_batch(
    tokenizer: Tokenizer, inputs: list, with_tokens: bool, is_pretokenized: bool = False
) -> list[Encoding]:
    # encode_batch_fast (tokenizers >= 0.20) skips offsets, which features never
    # use, but it also leaves Encoding.tokens empty, so tokenize() cannot use it.
    encode = tokenizer.encode_batch
    if not with_tokens:
        encode = getattr(tokenizer, "encode_batch_fast", encode)
    return encode(inputs, is_pretokenized=is_pretokenized, add_special_tokens=False)


def _load_vocab(path: str | os.PathLike) -> tuple[dict[str, int], int]:
    """(token -> id, number of lines) of a vocabulary file (:func:`.vocab.read_vocab`), or ConfigError."""
    tokens = read_vocab(path, error=ConfigError)
    vocab = {token: index for index, token in enumerate(tokens)}  # a later duplicate wins, as in google's
    missing = [token for token in REQUIRED_TOKENS if token not in vocab]
    if missing:
        raise ConfigError(f"vocabulary file {os.fspath(path)!r} lacks required token(s) {', '.join(missing)}")
    return vocab, len(tokens)


def _looks_uncased(vocab: dict[str, int]) -> bool:
    """True when no entry but bracketed markers has an ASCII capital letter."""
    return not any(_UPPER_ASCII.search(token) and not _MARKER.fullmatch(token) for token in vocab)


def _wordpiece_model(vocab: dict[str, int]) -> models.WordPiece:
    return models.WordPiece(
        vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=MAX_CHARS_PER_WORD
    )


def _lean_pipeline(vocab: dict[str, int]) -> Tokenizer:
    """HF pre-tokenizer + WordPiece, no normalizer: for text without a :data:`_NOT_LEAN_CHAR`."""
    tokenizer = Tokenizer(_wordpiece_model(vocab))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _full_pipeline(vocab: dict[str, int], lower: bool) -> Tokenizer:
    """HF normalizer + pre-tokenizer + WordPiece with google's settings: the lean pipeline with a
    normalizer in front."""
    tokenizer = _lean_pipeline(vocab)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower
    )
    return tokenizer
