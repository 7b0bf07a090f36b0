"""bertpool.common.data: MRPC reading, generated pairs, bundled samples, shared dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertpool.common import data
from bertpool.common.data import (SHARED_MRPC_DEV_FILE, SHARED_VOCAB_FILE, Pair, default_pairs, generate_pairs,
                                  read_mrpc_tsv, shared_data_dir, shared_file)
from bertpool.common.errors import ConfigError
from bertpool.common.protocol import MAX_TEXT_CHARS

HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def write(tmp_path: Path, text: str, name: str = "pairs.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- read_mrpc_tsv ------------------------------------------------------------


def test_real_mrpc_dev_set() -> None:
    path = shared_file(SHARED_MRPC_DEV_FILE)
    if path is None:
        pytest.skip(f"shared GLUE MRPC dev set {SHARED_MRPC_DEV_FILE} not found in {shared_data_dir()}")
    pairs = read_mrpc_tsv(path)
    assert len(pairs) == 408
    assert sum(p.label == 1 for p in pairs) == 279
    assert sum(p.label == 0 for p in pairs) == 129
    assert pairs[0] == Pair(
        text_a="He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
        text_b='" The foodservice pie business does not fit our long-term growth strategy .',
        label=1,
    )


def test_quotes_tabs_and_bom_handling(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER + '1\t11\t12\t" Quoted , "\tHe said " hi\n0\t21\t22\t""\t\'single\' "\n\n',
    )
    assert read_mrpc_tsv(path) == [
        Pair('" Quoted , "', 'He said " hi', 1),
        Pair('""', "'single' \"", 0),
    ]


def test_header_without_bom_and_empty_file_body(tmp_path: Path) -> None:
    assert read_mrpc_tsv(write(tmp_path, HEADER.lstrip("\ufeff"))) == []


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.tsv"):
        read_mrpc_tsv(tmp_path / "missing.tsv")


def test_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        read_mrpc_tsv(tmp_path)


def test_wrong_header(tmp_path: Path) -> None:
    path = write(tmp_path, "label\tsentence1\tsentence2\n1\ta\tb\n")
    with pytest.raises(ConfigError, match=r"pairs\.tsv:1: expected MRPC header"):
        read_mrpc_tsv(path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=":1:"):
        read_mrpc_tsv(write(tmp_path, ""))


def test_wrong_column_count_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1\t1\t2\ta\tb\n0\t3\t4\tonly a\n")
    with pytest.raises(ConfigError, match=r"pairs\.tsv:3: expected 5 tab-separated fields, got 4"):
        read_mrpc_tsv(path)


def test_extra_column_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "1\t1\t2\ta\tb\tc\n")
    with pytest.raises(ConfigError, match=r":2: expected 5 tab-separated fields, got 6"):
        read_mrpc_tsv(path)


@pytest.mark.parametrize("quality", ["2", "", "yes", " 1", "1.0"])
def test_bad_quality_names_line(tmp_path: Path, quality: str) -> None:
    path = write(tmp_path, HEADER + "1\t1\t2\ta\tb\n\n" + f"{quality}\t3\t4\tc\td\n")
    with pytest.raises(ConfigError, match=r"pairs\.tsv:4: Quality must be 0 or 1"):
        read_mrpc_tsv(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes(HEADER.encode() + b"1\t1\t2\t\xff\tb\n")
    with pytest.raises(ConfigError, match="pairs.tsv"):
        read_mrpc_tsv(path)


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_bad_byte_past_the_first_8_kib_is_named_at_its_line_and_offset(tmp_path: Path, ending: str) -> None:
    """Read line by line, the error gave the decoder's offset within its 8 KiB chunk (a byte 20,046
    bytes in was "position 3662") and no line number."""
    head = (HEADER + "1\t1\t2\ta\tb\n" * 2000 + "0\t3\t4\tcaf").replace("\n", ending).encode()
    path = tmp_path / "pairs.tsv"
    path.write_bytes(head + b"\xe9\td\n")
    offset = len(head)
    with pytest.raises(ConfigError, match=rf"pairs\.tsv:2002: not UTF-8 \(byte 0xe9 at file offset {offset}\b"):
        read_mrpc_tsv(path)


def test_crlf_a_bare_cr_and_a_bom_are_read_alike(tmp_path: Path) -> None:
    body = HEADER + "1\t1\t2\ta\tb\n0\t3\t4\tc\td\n"
    want = [Pair("a", "b", 1), Pair("c", "d", 0)]
    for text in (body, body.replace("\n", "\r\n"), body.replace("\n", "\r"), body.lstrip("\ufeff")):
        assert read_mrpc_tsv(write(tmp_path, text)) == want, ascii(text[:60])


@pytest.mark.parametrize("row, says", [
    ("1\t1\t2\t\tb", r":3: #1 String: empty text"),  # the audit's emptytext.tsv: trained on, proved on
    ("1\t1\t2\ta\t", r":3: #2 String: empty text"),
    ("0\t1\t2\t \u3000 \tb", r":3: #1 String: only whitespace"),  # str.strip's whitespace, as the pool's
    ("1\t1\t2\ta\t" + "x" * (MAX_TEXT_CHARS + 1), rf":3: #2 String: {MAX_TEXT_CHARS + 1} characters, "
                                                      rf"more than {MAX_TEXT_CHARS}"),
])
def test_a_text_the_pool_would_refuse_is_refused_when_the_file_is_read(tmp_path: Path, row: str, says: str) -> None:
    """The pool answers bad_text for an empty, blank or over-long text; read_mrpc_tsv took them, so
    finetune trained on an empty pair, compile "proved" on one and the bench sent only refused
    requests. Now the file is refused at its line."""
    path = write(tmp_path, HEADER + "1\t1\t2\tfine\tfine too\n" + row + "\n")
    with pytest.raises(ConfigError, match=r"pairs\.tsv" + says):
        read_mrpc_tsv(path)


def test_a_text_of_exactly_the_pools_limit_is_read(tmp_path: Path) -> None:
    longest = "x" * MAX_TEXT_CHARS
    path = write(tmp_path, HEADER + f"1\t1\t2\t {longest[1:]}\t.\n")
    assert read_mrpc_tsv(path) == [Pair(" " + longest[1:], ".", 1)]


# --- generate_pairs -------------------------------------------------------


def test_generate_pairs_is_deterministic() -> None:
    assert generate_pairs(50) == generate_pairs(50)
    assert generate_pairs(50, seed=7) == generate_pairs(50, seed=7)
    assert generate_pairs(50, seed=7) != generate_pairs(50, seed=8)
    assert generate_pairs(20) == generate_pairs(50)[:20]  # a prefix of a longer run
    assert generate_pairs(0) == []


@pytest.mark.parametrize("n, seed, message", [
    (-1, 0, "number of pairs must be an integer >= 0, got -1"),
    (1, -1, "seed must be an integer >= 0, got -1"),
    (1, True, "seed must be an integer >= 0, got True"),
    (1, 1.5, "seed must be an integer >= 0, got 1.5"),
])
def test_generate_pairs_refuses_what_is_not_a_count_or_a_seed(n, seed, message) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_pairs(n, seed=seed)


def test_generate_pairs_content() -> None:
    pairs = generate_pairs(200, seed=3)
    assert all(isinstance(p, Pair) and p.text_a and p.text_b for p in pairs)
    assert {p.label for p in pairs} == {0, 1}
    assert 0.5 < sum(p.label for p in pairs) / len(pairs) < 0.85
    # Every word is at least one wordpiece, so > 128 words means truncation at 128.
    lengths = [len(p.text_a.split()) + len(p.text_b.split()) for p in pairs]
    assert sum(n > 128 for n in lengths) >= 10
    assert min(lengths) < 40


@pytest.mark.parametrize("n", [-1, 2.0, True])
def test_generate_pairs_rejects_bad_n(n) -> None:
    with pytest.raises(ConfigError):
        generate_pairs(n)


# --- default_pairs / sample file -------------------------------------------


def test_default_pairs_parse() -> None:
    pairs = default_pairs()
    assert len(pairs) == 64
    assert {p.label for p in pairs} == {0, 1}
    assert all(p.text_a.strip() and p.text_b.strip() for p in pairs)
    assert max(len(p.text_a.split()) + len(p.text_b.split()) for p in pairs) > 128
    assert pairs == read_mrpc_tsv(Path(data.__file__).with_name(data.SAMPLE_PAIRS_FILE))


# --- shared_data_dir ---------------------------------------------------------


def test_shared_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BERTPOOL_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert shared_data_dir() == tmp_path / "elsewhere"


def test_shared_data_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Default: ``shared/data`` beside the clone (the repo root is the package), only if it exists."""
    monkeypatch.delenv("BERTPOOL_SHARED_DATA", raising=False)
    module = tmp_path / "work" / "clone" / "common" / "data.py"  # as if the clone lived at work/clone
    module.parent.mkdir(parents=True)
    monkeypatch.setattr(data, "__file__", str(module))
    assert shared_data_dir() is None  # work/shared/data does not exist yet
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)
    assert shared_data_dir() == tmp_path / "work" / "shared" / "data"


@pytest.mark.parametrize("present", [True, False])
def test_shared_file_only_where_the_file_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           present: bool) -> None:
    monkeypatch.setenv("BERTPOOL_SHARED_DATA", str(tmp_path))
    if present:
        (tmp_path / SHARED_VOCAB_FILE).write_text("[PAD]\n")
    (tmp_path / SHARED_MRPC_DEV_FILE).mkdir()  # a directory of that name is not the file
    assert shared_file(SHARED_VOCAB_FILE) == (tmp_path / SHARED_VOCAB_FILE if present else None)
    assert shared_file(SHARED_MRPC_DEV_FILE) is None
