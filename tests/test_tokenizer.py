"""bertpool.common.tokenizer against an independent reference of google-research/bert.

The reference (``google_reference_tokenization.py``) is plain Python written
from google's rules. Real-data tests use the shared MRPC dev set and uncased
vocabulary when present (``$BERTPOOL_SHARED_DATA`` or ``<repo>/../shared/data``)
and skip otherwise; everything else runs on small vocabularies written to tmp.
"""

from __future__ import annotations

import collections
import csv
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertpool.common import tokenizer as tokenizer_module
from bertpool.common.data import SHARED_MRPC_DEV_FILE, SHARED_VOCAB_FILE, shared_data_dir, shared_file
from bertpool.common.errors import ConfigError
from bertpool.common.tokenizer import FAST_PATH_CHARS, BertTokenizer, Features, _truncated_pair_lengths

try:  # tests/ may or may not be a package
    from . import google_reference_tokenization as ref
except ImportError:
    import google_reference_tokenization as ref

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP = 0, 1, 2, 3  # ids of SPECIALS in every tiny vocabulary below


# --- helpers and fixtures ---------------------------------------------------


def write_vocab(directory: Path, tokens: list[str], name: str = "vocab.txt") -> Path:
    path = directory / name
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


def char_vocab(texts: list[str], lower: bool) -> list[str]:
    """A vocabulary of single characters (c and ##c) seen in the reference words of ``texts``.

    With it every word becomes ``[w0, ##w1, ##w2, ...]``, so comparing
    wordpieces compares word boundaries and characters exactly.
    """
    chars = sorted({ch for text in texts for word in ref.basic_tokenize(text, lower) for ch in word})
    return SPECIALS + chars + ["##" + ch for ch in chars]


def reference_features(vocab: dict[str, int], lower: bool, pairs, seq: int) -> Features:
    rows = [ref.pair_features(a, b, vocab, lower, seq) for a, b in pairs]
    as_array = lambda k: np.array([r[k] for r in rows], np.int32).reshape(len(rows), seq)  # noqa: E731
    return Features(input_ids=as_array(0), input_mask=as_array(1), segment_ids=as_array(2))


def assert_same_features(got: Features, want: Features) -> None:
    for field in ("input_ids", "input_mask", "segment_ids"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == np.int32, field
        assert g.shape == w.shape, field
        bad = np.flatnonzero((g != w).any(axis=1))
        assert bad.size == 0, f"{field} differs on rows {bad[:10].tolist()}: {g[bad[0]]} != {w[bad[0]]}"


@pytest.fixture(scope="module")
def real_vocab_path() -> Path:
    path = shared_file(SHARED_VOCAB_FILE)
    if path is None:
        pytest.skip(f"shared BERT vocabulary {SHARED_VOCAB_FILE} not found in {shared_data_dir()}")
    return path


@pytest.fixture(scope="module")
def mrpc_pairs() -> list[tuple[str, str]]:
    path = shared_file(SHARED_MRPC_DEV_FILE)
    if path is None:
        pytest.skip(f"shared GLUE MRPC dev set {SHARED_MRPC_DEV_FILE} not found in {shared_data_dir()}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row[3], row[4]) for row in rows[1:]]


TINY = SPECIALS + [
    "hello", "world", "the", "cafe", "café", "un", "##aff", "##able", "a", "b", "c", "x", "##x",
    ",", "!", ".", "$", "'", "—", "中", "ο", "##δ", "##ο", "##ς", "##σ",
]  # fmt: skip


@pytest.fixture
def tiny(tmp_path: Path) -> BertTokenizer:
    return BertTokenizer(write_vocab(tmp_path, TINY))


# --- real data: GLUE MRPC dev set with the uncased vocabulary --------------


@pytest.mark.parametrize("seq", [128, 24])
def test_mrpc_dev_matches_reference(real_vocab_path: Path, mrpc_pairs, seq: int) -> None:
    assert len(mrpc_pairs) == 408
    vocab = ref.load_vocab(real_vocab_path)
    tok = BertTokenizer(real_vocab_path, max_seq_length=seq)
    assert tok.do_lower_case is True and tok.vocab_size == 30522
    got = tok.encode_pairs(mrpc_pairs)
    assert_same_features(got, reference_features(vocab, True, mrpc_pairs, seq))
    if seq == 24:  # every MRPC pair is longer than 21 wordpieces: all truncated
        assert (got.input_mask.sum(axis=1) == seq).all()


def test_mrpc_wordpieces_match_reference(real_vocab_path: Path, mrpc_pairs) -> None:
    vocab = ref.load_vocab(real_vocab_path)
    tok = BertTokenizer(real_vocab_path)
    for a, b in mrpc_pairs[:50]:
        assert tok.tokenize(a) == ref.tokenize(a, vocab, True)
        assert tok.tokenize(b) == ref.tokenize(b, vocab, True)


def test_real_vocab_known_ids(real_vocab_path: Path) -> None:
    tok = BertTokenizer(real_vocab_path, max_seq_length=8)
    assert (tok.cls_id, tok.sep_id) == (101, 102)
    f = tok.encode_pairs([("Hello", "world")])
    assert f.input_ids.tolist() == [[101, 7592, 102, 2088, 102, 0, 0, 0]]
    # Special-token text is ordinary text, as in google's tokenizer.
    assert tok.tokenize("[CLS] unaffable") == ["[", "cl", "##s", "]", "una", "##ffa", "##ble"]


# --- hand-checked cases on a tiny vocabulary --------------------------------


def test_accents_stripped_and_lowercased_when_uncased(tiny: BertTokenizer) -> None:
    assert tiny.do_lower_case is True
    assert tiny.tokenize("Café") == ["cafe"]
    assert tiny.tokenize("CAFE\u0301") == ["cafe"]  # decomposed accent too
    assert tiny.tokenize("HeLLo") == ["hello"]


def test_punctuation_split(tiny: BertTokenizer) -> None:
    assert tiny.tokenize("hello,world!") == ["hello", ",", "world", "!"]
    assert tiny.tokenize("a$b") == ["a", "$", "b"]  # ASCII symbols count as punctuation
    assert tiny.tokenize("hello—world") == ["hello", "—", "world"]  # Unicode Pd
    assert tiny.tokenize("a'b.") == ["a", "'", "b", "."]


def test_wordpiece_continuations_and_unk(tiny: BertTokenizer) -> None:
    assert tiny.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tiny.tokenize("unaffablez hello") == ["[UNK]", "hello"]  # whole word, not a piece
    assert tiny.tokenize("zzz") == ["[UNK]"]


def test_word_longer_than_200_chars_is_unk(tiny: BertTokenizer) -> None:
    assert tiny.tokenize("x" * 200) == ["x"] + ["##x"] * 199
    assert tiny.tokenize("x" * 201) == ["[UNK]"]
    assert tiny.tokenize("x" * 201 + " a") == ["[UNK]", "a"]


def test_control_chars_dropped_and_whitespace_normalized(tiny: BertTokenizer) -> None:
    assert tiny.tokenize("hel\x00lo\twor\x07ld\ufffd") == ["hello", "world"]
    assert tiny.tokenize("hel\u200blo\u00a0a\r\nb\u3000c") == ["hello", "a", "b", "c"]


def test_cjk_chars_are_spaced(tiny: BertTokenizer) -> None:
    assert tiny.tokenize("a中b") == ["a", "中", "b"]
    assert tiny.tokenize("a한b") == ["[UNK]"]  # Hangul is not CJK for google: one word


def test_final_sigma_lowercased_per_word(tiny: BertTokenizer) -> None:
    # Python's str.lower (google) writes a word-final capital sigma as ς.
    assert tiny.tokenize("ΟΔΟΣ") == ["ο", "##δ", "##ο", "##ς"]
    assert tiny.tokenize("ΟΔΟΣΟ") == ["ο", "##δ", "##ο", "##σ", "##ο"]


def test_pair_layout_exact_arrays(tiny: BertTokenizer, tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=10)
    ids = {t: i for i, t in enumerate(TINY)}
    f = tok.encode_pairs([("Hello world", "the cafe"), ("", "")])
    assert f.input_ids.tolist() == [
        [CLS, ids["hello"], ids["world"], SEP, ids["the"], ids["cafe"], SEP, 0, 0, 0],
        [CLS, SEP, SEP, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert f.input_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert f.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    for arr in (f.input_ids, f.input_mask, f.segment_ids):
        assert arr.dtype == np.int32 and arr.shape == (2, 10)


def test_empty_b_keeps_second_sep(tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=6)
    f = tok.encode_pairs([("hello", "")])
    assert f.input_ids.tolist() == [[CLS, TINY.index("hello"), SEP, SEP, 0, 0]]
    assert f.segment_ids.tolist() == [[0, 0, 0, 1, 0, 0]]


@pytest.mark.parametrize(
    ("seq", "a_len", "b_len", "kept"),
    [
        (7, 3, 3, (2, 2)),  # room 4, tie: pop b, then a (now longer)
        (8, 3, 3, (3, 2)),  # room 5, tie: pop b once; a keeps the extra one
        (7, 5, 1, (3, 1)),  # a longer: only a is cut
        (7, 1, 5, (1, 3)),  # b longer: only b is cut
        (7, 2, 2, (2, 2)),  # fits: untouched
        (3, 2, 2, (0, 0)),  # room 0
    ],
)
def test_truncation_pops_longer_then_b_on_tie(tmp_path: Path, seq, a_len, b_len, kept) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=seq)
    a_id, b_id = TINY.index("a"), TINY.index("b")
    f = tok.encode_pairs([(" ".join(["a"] * a_len), " ".join(["b"] * b_len))])
    row = f.input_ids[0].tolist()
    assert (row.count(a_id), row.count(b_id)) == kept
    ka, kb = kept
    assert row[: ka + kb + 3] == [CLS] + [a_id] * ka + [SEP] + [b_id] * kb + [SEP]


def test_truncated_lengths_equal_google_loop() -> None:
    for max_total in range(0, 16):
        for la in range(0, 14):
            for lb in range(0, 14):
                a, b = list(range(la)), list(range(lb))
                ref.truncate_pair(a, b, max_total)
                assert _truncated_pair_lengths(la, lb, max_total) == (len(a), len(b)), (max_total, la, lb)


def test_cased_vocab_detected_and_keeps_case(tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, SPECIALS + ["Hello", "hello", "Café", "cafe", "[unused0]"]))
    assert tok.do_lower_case is False
    assert tok.tokenize("Hello hello Café") == ["Hello", "hello", "Café"]
    assert tok.tokenize("HELLO") == ["[UNK]"]


def test_markers_do_not_make_a_vocab_cased(tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, SPECIALS + ["[unused0]", "[UNUSED_X]", "hello"]))
    assert tok.do_lower_case is True
    assert tok.tokenize("HELLO") == ["hello"]


def test_explicit_do_lower_case_overrides_detection(tmp_path: Path) -> None:
    path = write_vocab(tmp_path, SPECIALS + ["Hello", "hello", "cafe"])
    assert BertTokenizer(path, do_lower_case=True).tokenize("HELLO Café") == ["hello", "cafe"]
    assert BertTokenizer(path, do_lower_case=False).tokenize("HELLO Café") == ["[UNK]", "[UNK]"]
    uncased = write_vocab(tmp_path, SPECIALS + ["hello"], name="uncased.txt")
    assert BertTokenizer(uncased, do_lower_case=False).do_lower_case is False


def test_vocab_lines_are_stripped_and_later_duplicates_win(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\r\n[UNK]\n[CLS]\n[SEP]\n  hello  \nworld\nhello\n", encoding="utf-8")
    tok = BertTokenizer(path, max_seq_length=5)
    assert tok.vocab_size == 7
    assert tok.encode_pairs([("hello", "world")]).input_ids.tolist() == [[2, 6, 3, 5, 3]]


def test_empty_input_list(tiny: BertTokenizer) -> None:
    f = tiny.encode_pairs([])
    assert f.input_ids.shape == f.input_mask.shape == f.segment_ids.shape == (0, 128)


def test_non_str_text_is_type_error(tiny: BertTokenizer) -> None:
    with pytest.raises(TypeError):
        tiny.encode_pairs([("hello", None)])
    with pytest.raises(TypeError):
        tiny.encode_pairs([(b"hello", "world")])
    with pytest.raises(TypeError):
        tiny.encode_pairs(["hello"])
    with pytest.raises(TypeError):
        tiny.tokenize(123)


# --- configuration errors ---------------------------------------------------


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.txt"):
        BertTokenizer(tmp_path / "nope.txt")


def test_vocab_path_is_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        BertTokenizer(tmp_path)


def test_empty_vocab(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        BertTokenizer(write_vocab(tmp_path, []))


def test_vocab_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n\xff\xfe\n")
    with pytest.raises(ConfigError):
        BertTokenizer(path)



@pytest.mark.parametrize("error", ["ConfigError", "ModelFormatError"])
def test_a_vocab_that_is_not_utf8_is_refused_at_its_line_and_offset(tmp_path: Path, error: str) -> None:
    """A non-UTF-8 vocab.txt was refused without a place ("'utf-8' codec can't decode byte 0xe9 in
    position ..."), while an MRPC TSV's error names line and file offset: now both do, through one
    decoder. Lines are counted at "\n" only, as the reader splits them (a lone "\r" is inside a
    token), so the line is the token's id + 1; "\r\n" endings count once. The error is the type the
    caller asks for (ModelFormatError for a model directory's vocabulary)."""
    from bertpool.common import errors
    from bertpool.common.vocab import read_vocab

    head = ("[PAD]\r\n[UNK]\n[CLS]\n[SEP]\nhel\rlo\n" + "".join(f"tok{i}\n" for i in range(2000)) + "caf").encode()
    path = tmp_path / "vocab.txt"
    path.write_bytes(head + b"\xe9\n")
    where = rf"vocabulary file {re.escape(str(path))}:2006: not UTF-8 \(byte 0xe9 at file offset {len(head)}\b"
    with pytest.raises(getattr(errors, error), match=where):
        read_vocab(path, error=getattr(errors, error))
    with pytest.raises(ConfigError, match=where):
        BertTokenizer(path)

@pytest.mark.parametrize("token", ["[CLS]", "[SEP]", "[UNK]", "[PAD]"])
def test_vocab_without_required_token(tmp_path: Path, token: str) -> None:
    tokens = [t for t in SPECIALS if t != token] + ["hello"]
    with pytest.raises(ConfigError, match=token.replace("[", r"\[").replace("]", r"\]")):
        BertTokenizer(write_vocab(tmp_path, tokens))


@pytest.mark.parametrize("seq", [2, 0, -1, 3.5, True])
def test_bad_max_seq_length(tmp_path: Path, seq) -> None:
    with pytest.raises(ConfigError, match="max_seq_length"):
        BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=seq)


def test_max_seq_length_3_is_only_specials(tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=3)
    assert tok.encode_pairs([("hello world", "the cafe")]).input_ids.tolist() == [[CLS, SEP, SEP]]


# --- agreement with the reference over Unicode ------------------------------


def _fast_path_chars() -> list[str]:
    """Every character of the ``lo-hi`` ranges in FAST_PATH_CHARS."""
    ranges = re.findall(r"(.)-(.)", FAST_PATH_CHARS, flags=re.S)
    assert ranges and "".join(lo + "-" + hi for lo, hi in ranges) == FAST_PATH_CHARS
    return [chr(cp) for lo, hi in ranges for cp in range(ord(lo), ord(hi) + 1)]


def _probe_texts(chars: list[str], extra: str = "") -> list[str]:
    # Each character inside a word, alone, and next to a capital and an accent.
    return [f"x{c}y {c} A{c}\u0301{extra}" for c in chars]


@pytest.mark.parametrize("lower", [True, False])
def test_fast_path_chars_agree_with_reference(tmp_path: Path, lower: bool) -> None:
    """Every character the HF fast path handles gives google's words (both casings)."""
    texts = _probe_texts(_fast_path_chars())
    assert all(re.fullmatch(f"[{FAST_PATH_CHARS}]*", t) for t in texts)  # all on the HF path
    tokens = char_vocab(texts, lower)
    vocab = ref.load_vocab(write_vocab(tmp_path, tokens))
    tok = BertTokenizer(tmp_path / "vocab.txt", do_lower_case=lower, max_seq_length=64)
    got = tok.encode_pairs([(t, "") for t in texts])
    assert_same_features(got, reference_features(vocab, lower, [(t, "") for t in texts], 64))


TRICKY = (
    "\u0378\u2065\U000e0001\U0010fffd\ue000"  # unassigned, tag (Cf), private use: google keeps Cn/Co
    "\u166d\u1734\u061d\u2e55\U00010ead\U00011938"  # category differs between Unicode versions
    "\U0002b820\U0002ceaf\u9fff\uf900\u3400"  # CJK (incl. extension E)
    "ΣσςΟΔİıßﬁ\u037e\u0387\u1fef\u1ffd\u0345"  # case and NFD oddities
    "\u2028\u2029\x1c\x1f\x85\u180e\u200b\u00ad\ufeff"  # separators and formats
    "한ー・。、\U0001f600\u0e3f\u0e01\u0e48"
)


@pytest.mark.parametrize("lower", [True, False])
def test_sampled_unicode_agrees_with_reference(tmp_path: Path, lower: bool) -> None:
    """Tricky characters plus a stride sample of all code points, through either path."""
    chars = list(TRICKY) + [chr(cp) for cp in range(0, 0x110000, 97) if not 0xD800 <= cp <= 0xDFFF]
    texts = _probe_texts(chars, extra="Σ") + ["ΑΣ ΑΣ. ΑΣΑ Σ", "x\u0301\u0327y", "Ǆ ǅ ǆ"]
    tokens = char_vocab(texts, lower)
    vocab = ref.load_vocab(write_vocab(tmp_path, tokens))
    tok = BertTokenizer(tmp_path / "vocab.txt", do_lower_case=lower, max_seq_length=64)
    pairs = list(zip(texts, reversed(texts)))
    assert_same_features(tok.encode_pairs(pairs), reference_features(vocab, lower, pairs, 64))
    for text in texts[:: max(1, len(texts) // 200)]:
        assert tok.tokenize(text) == ref.tokenize(text, vocab, lower), ascii(text)


# --- hypothesis property: random text pairs agree with the reference ------

WORDS = ["hello", "world", "The", "cafe", "Café", "unaffable", "don't", "U.S.", "3.5%", "re-run", "naïve"]
INTERESTING = list(TRICKY + " \t\n\r\x00\ufffd\u00a0\u3000aZé É\u0301¿¡—–“”‘’…$^`~|<>=+#[]中文")


def _property_vocab(directory: Path) -> tuple[Path, bool]:
    """The real uncased vocabulary when present (lower case), else a small synthetic one."""
    real = shared_file(SHARED_VOCAB_FILE)
    if real is not None:
        return real, True
    ascii_chars = [chr(c) for c in range(33, 127)]
    pieces = ["hello", "world", "the", "cafe", "un", "##aff", "##able", "don", "re", "run", "naive", "##s"]
    tokens = SPECIALS + ascii_chars + ["##" + c for c in ascii_chars] + pieces + list("éσςο中文")
    return write_vocab(directory, tokens), False


@pytest.fixture(scope="module")
def property_setup(tmp_path_factory: pytest.TempPathFactory):
    path, lower = _property_vocab(tmp_path_factory.mktemp("vocab"))
    vocab = ref.load_vocab(path)
    tokenizers = {seq: BertTokenizer(path, do_lower_case=lower, max_seq_length=seq) for seq in (3, 8, 24, 128)}
    return vocab, lower, tokenizers


texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(INTERESTING), max_size=60),
    st.lists(st.sampled_from(WORDS + INTERESTING), max_size=60).map(" ".join),
    st.lists(st.sampled_from(WORDS), min_size=20, max_size=80).map(" ".join),  # forces truncation
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=4), seq=st.sampled_from([3, 8, 24, 128]))
def test_random_pairs_agree_with_reference(property_setup, pairs, seq) -> None:
    vocab, lower, tokenizers = property_setup
    got = tokenizers[seq].encode_pairs(pairs)
    assert_same_features(got, reference_features(vocab, lower, pairs, seq))


# --- the lean path (printable ASCII skips HF's normalizer) ----------------

LEAN_CHARS = "\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F))


@pytest.mark.parametrize("lower", [True, False])
def test_lean_path_equals_full_pipeline(tmp_path: Path, lower: bool) -> None:
    """Every lean character gives the full HF pipeline's ids, and google's features, in both casings."""
    texts = [f"x{c}y {c} A{c}B{c}{c}z{c}" for c in LEAN_CHARS] + ["  Hello,\tWORLD!\r\n", "", " ", "DON'T U.S.A."]
    assert not any(tokenizer_module._NOT_LEAN_CHAR.search(t) for t in texts)
    for bad in ("\x00", "\x01", "\x0b", "\x0c", "\x1f", "\x7f", "\x85", "\xa0", "é"):
        assert tokenizer_module._NOT_LEAN_CHAR.search(f"a{bad}b"), ascii(bad)
    tokens = char_vocab(texts, lower)
    vocab = ref.load_vocab(write_vocab(tmp_path, tokens))
    tok = BertTokenizer(tmp_path / "vocab.txt", do_lower_case=lower, max_seq_length=64)
    lean = [e.ids for e in tok._encode_lean(texts)]
    full = [e.ids for e in tok._full.encode_batch(texts, add_special_tokens=False)]
    assert lean == full
    assert tok._lean_ids(texts) == full  # the word cache's words, learned now
    assert tok._lean_ids(texts) == full  # and served from it
    pairs = list(zip(texts, reversed(texts)))
    assert_same_features(tok.encode_pairs(pairs), reference_features(vocab, lower, pairs, 64))
    for text in texts:
        assert tok.tokenize(text) == ref.tokenize(text, vocab, lower), ascii(text)


def test_mrpc_lean_path_equals_full_pipeline(real_vocab_path: Path, mrpc_pairs) -> None:
    texts = [t for pair in mrpc_pairs for t in pair if not tokenizer_module._NOT_LEAN_CHAR.search(t)]
    assert len(texts) > len(mrpc_pairs)  # most MRPC texts are plain ASCII
    tok = BertTokenizer(real_vocab_path)
    lean = [e.ids for e in tok._encode_lean(texts)]
    assert lean == [e.ids for e in tok._full.encode_batch(texts, add_special_tokens=False)]
    assert tok._lean_ids(texts) == lean and tok._lean_ids(texts[::-1]) == lean[::-1]


def test_batch_mixing_lean_full_and_slow_texts(tmp_path: Path) -> None:
    """One call whose texts take all three routes keeps every text in its row and place."""
    texts = ["Hello, World!", "Café  naïve", "ΟΔΟΣ ΑΣ", "", "a\x01b\x7fc", "中文 and ASCII"]
    pairs = [(a, b) for a in texts for b in texts]
    tokens = char_vocab(texts, True)
    vocab = ref.load_vocab(write_vocab(tmp_path, tokens))
    tok = BertTokenizer(tmp_path / "vocab.txt", max_seq_length=24)
    assert_same_features(tok.encode_pairs(pairs), reference_features(vocab, True, pairs, 24))
    for i in range(0, len(pairs), 7):  # and each pair alone equals its row in the batch
        np.testing.assert_array_equal(tok.encode_pairs([pairs[i]]).input_ids[0], tok.encode_pairs(pairs).input_ids[i])


def test_one_accented_text_leaves_the_rest_of_its_batch_on_the_lean_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with one non-ASCII text sent every text through HF's normalizer (about half again the
    time of a 64-pair MRPC batch, 9 in 10 of which hold such a text); only that text needs it. The
    rest take the word cache: after the first call (which learned their words) no HF call at all."""
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=16)
    pairs = [("Hello world", "the cafe")] * 31 + [("Hello world", "the café")]
    want = tok.encode_pairs(pairs)
    sent = []
    real_encode_batch = tokenizer_module._encode_batch

    def spy(pipeline, inputs, *args, **kwargs):
        sent.append((pipeline, list(inputs)))
        return real_encode_batch(pipeline, inputs, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "_encode_batch", spy)
    got = tok.encode_pairs(pairs)
    assert sent == [(tok._full, ["the café"])]
    assert_same_features(got, want)
    assert got.input_ids[-1].tolist()[:6] == [CLS, TINY.index("hello"), TINY.index("world"), SEP,
                                              TINY.index("the"), TINY.index("cafe")]


lean_texts = st.one_of(
    st.text(alphabet=st.sampled_from(LEAN_CHARS), max_size=60),
    st.lists(st.sampled_from(WORDS[:8] + list(" \t\n\r.,'!?-$^`~")), max_size=60).map(" ".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(lean_texts, lean_texts), min_size=1, max_size=6), seq=st.sampled_from([3, 8, 24]))
def test_random_lean_pairs_agree_with_reference(property_setup, pairs, seq) -> None:
    vocab, lower, tokenizers = property_setup
    assert_same_features(tokenizers[seq].encode_pairs(pairs), reference_features(vocab, lower, pairs, seq))


long_words = st.text(alphabet=st.sampled_from("abAB1"), min_size=198, max_size=202)  # [UNK] past 200 characters


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.lists(st.one_of(lean_texts, long_words), min_size=1, max_size=5), min_size=1, max_size=4))
def test_word_cache_equals_the_lean_pipeline(property_setup, monkeypatch, calls) -> None:
    """The word cache gives HF's lean pipeline's ids for every lean text, whether its words are new,
    cached by an earlier call, or lost when a full cache was emptied (a bound of 6 words here)."""
    _, _, tokenizers = property_setup
    tok = tokenizers[128]
    monkeypatch.setattr(tokenizer_module, "MAX_CACHED_WORDS", 6)
    tok._word_ids.clear()  # what earlier examples left
    bound = 6  # the cache holds at most the bound, or what one call learned if that is more
    for texts in calls:
        texts = [t for t in texts if not tokenizer_module._NOT_LEAN_CHAR.search(t)]  # WORDS has a few that are not
        assert tok._lean_ids(texts) == [e.ids for e in tok._encode_lean(texts)]
        words = [tokenizer_module._LEAN_WORD.findall(t.lower() if tok.do_lower_case else t) for t in texts]
        bound = max(bound, len({w for ws in words for w in ws}))
        assert len(tok._word_ids) <= bound


# --- row assembly against a plain per-row layout ------------------------------


def plain_rows(ids: list[list[int]], seq: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """google's convert_single_example layout, one row at a time, truncating with google's loop."""
    input_ids, input_mask, segment_ids = [], [], []
    for a, b in zip(ids[0::2], ids[1::2]):
        a, b = list(a), list(b)
        ref.truncate_pair(a, b, seq - 3)
        tokens = [CLS] + a + [SEP] + b + [SEP]
        pad = [0] * (seq - len(tokens))
        input_ids.append(tokens + pad)
        input_mask.append([1] * len(tokens) + pad)
        segment_ids.append([0] * (len(a) + 2) + [1] * (len(b) + 1) + pad)
    return input_ids, input_mask, segment_ids


@pytest.fixture(scope="module")
def assemblers(tmp_path_factory: pytest.TempPathFactory) -> dict[int, BertTokenizer]:
    path = write_vocab(tmp_path_factory.mktemp("asm"), TINY)
    return {seq: BertTokenizer(path, max_seq_length=seq) for seq in (3, 4, 5, 6, 9, 16)}


lengths = st.one_of(st.integers(0, 3), st.integers(0, 20))  # small values make ties and empties common


@settings(max_examples=300, deadline=None)
@given(
    lens=st.lists(st.tuples(lengths, lengths), min_size=0, max_size=17).map(lambda ls: [n for p in ls for n in p]),
    seq=st.sampled_from([3, 4, 5, 6, 9, 16]),
    data=st.data(),
)
def test_assembly_equals_plain_rows(assemblers, lens, seq, data) -> None:
    ids = [data.draw(st.lists(st.integers(4, 30000), min_size=n, max_size=n)) for n in lens]
    got = assemblers[seq]._assemble(ids)  # up to ROW_FILL_MAX rows one by one, more at once: both drawn
    want = plain_rows(ids, seq)
    for field, arr, rows in zip(("input_ids", "input_mask", "segment_ids"), got, want):
        assert arr.dtype == np.int32 and arr.shape == (len(lens) // 2, seq), field
        assert arr.tolist() == rows, field


@pytest.mark.parametrize("n", [0, 1, tokenizer_module.ROW_FILL_MAX, tokenizer_module.ROW_FILL_MAX + 1, 40])
def test_encode_stacked_holds_encode_pairs_arrays(tiny: BertTokenizer, n: int) -> None:
    """encode_stacked is encode_pairs' three arrays in one [3, N, S] int32 block, filled row by row or
    all at once; [:, i] is pair i's features (what a worker queues, without a copy)."""
    pairs = [(f"hello {'world ' * i}", "the cafe" if i % 2 else "") for i in range(n)]
    stacked = tiny.encode_stacked(pairs)
    features = tiny.encode_pairs(pairs)
    assert stacked.dtype == np.int32 and stacked.shape == (3, n, tiny.max_seq_length)
    for got, want in zip(stacked, (features.input_ids, features.input_mask, features.segment_ids)):
        np.testing.assert_array_equal(got, want)
    for i in range(n):
        np.testing.assert_array_equal(stacked[:, i], tiny.encode_stacked([pairs[i]])[:, 0])


def test_pair_containers_and_text_subclasses_are_accepted(tiny: BertTokenizer) -> None:
    class Text(str):
        pass

    Pair = collections.namedtuple("Pair", "a b")
    want = tiny.encode_pairs([("hello", "world"), ("the", "cafe")]).input_ids
    for pairs in (
        [["hello", "world"], ("the", "cafe")],
        (("hello", "world"), ("the", "cafe")),
        iter([("hello", "world"), ("the", "cafe")]),
        [Pair("hello", "world"), (Text("the"), "cafe")],
    ):
        np.testing.assert_array_equal(tiny.encode_pairs(pairs).input_ids, want)


@pytest.mark.parametrize("pairs", [
    [("a", "b", "c"), ("d",)],  # four texts for two pairs, but not two per pair
    [("a", "b"), "ab"],  # a str is a sequence of two characters, not a pair
    [("a", "b"), ("c", 1)],
    [("a", "b"), None],
    [{"a": 1, "b": 2}],
])  # fmt: skip
def test_malformed_pairs_are_type_errors(tiny: BertTokenizer, pairs) -> None:
    with pytest.raises(TypeError):
        tiny.encode_pairs(pairs)


# --- concurrency and speed ---------------------------------------------------


def test_concurrent_encode_pairs_is_consistent(tmp_path: Path) -> None:
    tok = BertTokenizer(write_vocab(tmp_path, TINY), max_seq_length=16)
    batches = [[(f"hello {'a ' * i}world", f"the cafe {'b ' * (i % 5)}中")] * 4 for i in range(40)]
    expected = [tok.encode_pairs(b).input_ids for b in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(5):
            results = list(pool.map(lambda b: tok.encode_pairs(b).input_ids, batches))
            for got, want in zip(results, expected):
                np.testing.assert_array_equal(got, want)


def test_ascii_pairs_take_the_word_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against falling off the fast path (the speed itself is the benchmarks' to measure, not a
    test's): ASCII pairs, upper case included, take the word cache: HF's WordPiece is asked once, in
    one call, for the words not seen yet (each once), and not at all when every word was seen; none
    goes through the plain-Python basic tokenizer or HF's normalizer."""
    tok = BertTokenizer(write_vocab(tmp_path, TINY))
    sentence = "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy ."
    pairs = [(sentence, sentence.upper())] * 4
    sent = []
    real_encode_batch = tokenizer_module._encode_batch

    def spy(pipeline, inputs, *args, **kwargs):
        sent.append((pipeline, len(inputs)))
        return real_encode_batch(pipeline, inputs, *args, **kwargs)

    def no_python_path(*args):
        raise AssertionError("ASCII text went through the plain-Python basic tokenizer")

    monkeypatch.setattr(tokenizer_module, "_encode_batch", spy)
    monkeypatch.setattr(tokenizer_module, "_basic_tokenize", no_python_path)
    first = tok.encode_pairs(pairs)
    words = set(tokenizer_module._LEAN_WORD.findall(sentence.lower()))
    assert sent == [(tok._wordpiece_only, len(words))]
    again = tok.encode_pairs(pairs[:1] + [(sentence.upper(), sentence)])
    assert sent == [(tok._wordpiece_only, len(words))]  # nothing new to ask
    np.testing.assert_array_equal(again.input_ids[0], first.input_ids[0])


@pytest.mark.parametrize("char, kept", [
    ("\ue000", True),       # Co, private use
    ("\U0010fffd", True),   # Co, supplementary private use
    ("\u0378", True),       # Cn, unassigned
    ("\u2065", True),       # Cn, unassigned (inside General Punctuation)
    ("\u200b", False),      # Cf, zero width space
    ("\U000e0001", False),  # Cf, language tag
    ("\x07", False),        # Cc, bell
])
def test_only_cc_and_cf_are_dropped(tmp_path: Path, char: str, kept: bool) -> None:
    """google's current _is_control: a Cn/Co character stays inside its word (which then is [UNK])."""
    write_vocab(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "ab", "a", "##b"])
    tok = BertTokenizer(tmp_path / "vocab.txt", max_seq_length=16)
    expected = ["[UNK]"] if kept else ["ab"]
    assert tok.tokenize(f"a{char}b") == expected
    assert ref.clean_text(f"a{char}b") == (f"a{char}b" if kept else "ab")


@pytest.mark.parametrize("lower", [True, False])
def test_a_lone_surrogate_makes_its_word_unk(tmp_path: Path, lower: bool) -> None:
    """google keeps a lone surrogate (Cs) in its word, which then is [UNK]; HF refused the word with
    a TypeError about "PreTokenizedEncodeInput" (e.g. text from json.loads of "\\ud800")."""
    write_vocab(tmp_path, SPECIALS + ["ab", "c", "a", "##b", "ο"])
    vocab = ref.load_vocab(tmp_path / "vocab.txt")
    tok = BertTokenizer(tmp_path / "vocab.txt", do_lower_case=lower, max_seq_length=16)
    texts = ["\ud800", "a\udfffb c", "c \ud83d\ude00 ab", "ο\udc80.ab", "ab c"]
    for text in texts:
        assert tok.tokenize(text) == ref.tokenize(text, vocab, lower), ascii(text)
    assert tok.tokenize("a\udfffb c") == ["[UNK]", "c"]
    pairs = [(a, b) for a in texts for b in texts]  # with the lean "ab c" in the same batch
    assert_same_features(tok.encode_pairs(pairs), reference_features(vocab, lower, pairs, 16))


def test_reference_sanity() -> None:
    """The reference itself, on hand-worked examples."""
    assert ref.basic_tokenize("  Hi!yes\n\tNO?  ", True) == ["hi", "!", "yes", "no", "?"]
    assert ref.basic_tokenize("  Hi!yes\n\tNO?  ", False) == ["Hi", "!", "yes", "NO", "?"]
    assert ref.basic_tokenize("Ünïcödé", True) == ["unicode"]
    assert ref.basic_tokenize("ok\u4e2d\u6587ok", True) == ["ok", "\u4e2d", "\u6587", "ok"]
    vocab = {t: i for i, t in enumerate(["[UNK]", "play", "##ing", "##s", "pl", "##ay", "re"])}
    assert ref.wordpiece("playing", vocab) == ["play", "##ing"]
    assert ref.tokenize("Plays replaying", vocab, True) == ["play", "##s", "[UNK]"]
    assert unicodedata.category("\u00ad") == "Cf" and ref.clean_text("a\u00adb\x00c\u2003d") == "abc d"
    a, b = [1, 2, 3], [4, 5, 6]
    ref.truncate_pair(a, b, 4)
    assert (a, b) == ([1, 2], [4, 5])


# ------------------------------------------------------ the one vocabulary reader

# Where the two readers used to differ: "\r\n" endings, spaces or a tab around a token,
# and a lone "\r" inside a line (google's reader splits at "\n" only).
AWKWARD_VOCAB = "[PAD]\r\n[UNK]\n [CLS] \n[SEP]\t\nhel\rlo\nworld\n"


def test_serving_and_compile_read_a_vocabulary_alike(tmp_path: Path) -> None:
    """google's load_vocab rules, for the tokenizer and bertpool-compile's check alike."""
    from bertpool.common.vocab import read_vocab
    from bertpool.compile.vocab import check_vocab

    path = tmp_path / "vocab.txt"
    path.write_bytes(AWKWARD_VOCAB.encode())
    want = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hel\rlo", "world"]
    assert read_vocab(path) == want
    assert list(ref.load_vocab(path)) == want  # the independent reference agrees
    assert check_vocab(path, 6) == want  # 6 rows: the lone "\r" is no line break
    tok = BertTokenizer(path)
    assert (tok.vocab_size, tok.cls_id, tok.sep_id) == (6, 2, 3)
    assert tok.tokenize("world") == ["world"]


def test_a_byte_order_mark_is_no_part_of_the_first_token(tmp_path: Path) -> None:
    """A vocab.txt saved with a UTF-8 BOM was refused as lacking [PAD] (token 0 read "\\ufeff[PAD]")."""
    from bertpool.common.vocab import read_vocab

    path = tmp_path / "vocab.txt"
    path.write_bytes("[PAD]\n[UNK]\n[CLS]\n[SEP]\nworld\n".encode("utf-8-sig"))
    assert read_vocab(path) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "world"]
    tok = BertTokenizer(path)
    assert (tok.vocab_size, tok.cls_id, tok.sep_id, tok.tokenize("world")) == (5, 2, 3, ["world"])


def test_generated_vocabularies_share_googles_layout() -> None:
    from bertpool.common.vocab import HEAD, bert_vocab
    from bertpool.compile.vocab import generate_vocab

    for tokens in (generate_vocab(300), bert_vocab(["a", "[CLS]", "a", "##a"])):
        assert tokens[:104] == list(HEAD)
        assert (tokens[0], tokens[100], tokens[101], tokens[102], tokens[103]) == (
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        assert len(set(tokens)) == len(tokens)
    assert len(generate_vocab(300)) == 300
    assert bert_vocab(["a", "[CLS]", "a", "##a"])[104:] == ["a", "##a"]
    assert bert_vocab(["a"], 106)[104:] == ["a", "[unused99]"]
