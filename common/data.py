"""Sentence pairs for benchmarks and tests: GLUE MRPC files, generated pairs, samples.

* :func:`read_mrpc_tsv` reads the GLUE MRPC TSV format (the dev set as the
  AWS Neuron BERT demo ships it, or the bundled ``sample_pairs.tsv``).
* :func:`generate_pairs` makes any number of deterministic English-like pairs
  with no files and no network.
* :func:`default_pairs` is what the bench sends when given no ``--tsv``.
* :func:`shared_data_dir` finds the optional shared data directory (MRPC dev
  and train sets, BERT vocabulary) that tests and benchmarks use when it is
  present; :func:`shared_file` is one of its ``SHARED_*_FILE`` files, where present.
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ConfigError, InputError
from .protocol import check_text_arg
from .textfile import decode_utf8

MRPC_HEADER = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
SHARED_DATA_ENV = "BERTPOOL_SHARED_DATA"
SAMPLE_PAIRS_FILE = "sample_pairs.tsv"
# Files of the shared data directory (scripts/demo, being shell, names its MRPC files itself).
SHARED_VOCAB_FILE = "uncased_L-24_H-1024_A-16.vocab.txt"  # the uncased BERT vocabulary (30,522 lines)
SHARED_MRPC_DEV_FILE = "glue_mrpc_dev.tsv"  # GLUE MRPC dev: 408 labelled pairs


@dataclass(frozen=True)
class Pair:
    """One sentence pair; ``label`` is 1 = paraphrase, 0 = not, None = unknown."""

    text_a: str
    text_b: str
    label: int | None


def read_mrpc_tsv(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a GLUE MRPC TSV file, in file order.

    Format: UTF-8 (a leading BOM is allowed), a header line
    ``Quality  #1 ID  #2 ID  #1 String  #2 String`` and then one tab-separated
    row per pair with Quality ``0`` or ``1``. Fields are taken verbatim: the
    strings contain quote characters, which are not CSV quoting here. Blank
    lines are skipped. Raises ConfigError naming the file (and the line number
    for a bad line) if the file is missing, unreadable, has another header, a
    row without exactly 5 fields, a Quality other than 0/1, or a string the pool
    would refuse (:func:`check_pair_text`: empty, whitespace only, or longer than
    ``protocol.MAX_TEXT_CHARS``), so that no tool trains, proves or benchmarks on it.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise ConfigError(f"MRPC file {name!r} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read MRPC file {name!r}: {exc}") from exc
    text = decode_utf8(raw, name).removeprefix("\ufeff")
    # newline="": csv sees "\r\n", "\r" and "\n" line ends as they are, as with open(newline="").
    return _parse_mrpc(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE), name)


def _parse_mrpc(reader, name: str) -> list[Pair]:
    """Pairs from a csv reader positioned at the header line."""
    try:
        header = next(reader, None)
        if header is None or tuple(header) != MRPC_HEADER:
            raise ConfigError(f"{name}:1: expected MRPC header {'<TAB>'.join(MRPC_HEADER)!r}, got {header!r}")
        pairs = []
        for row in reader:
            if row:  # csv yields [] for a blank line
                pairs.append(_mrpc_row(row, name, reader.line_num))
        return pairs
    except csv.Error as exc:  # e.g. a field over csv's size limit
        raise ConfigError(f"{name}:{reader.line_num}: {exc}") from exc


def _mrpc_row(row: list[str], name: str, line: int) -> Pair:
    if len(row) != len(MRPC_HEADER):
        raise ConfigError(f"{name}:{line}: expected {len(MRPC_HEADER)} tab-separated fields, got {len(row)}")
    if row[0] not in ("0", "1"):
        raise ConfigError(f"{name}:{line}: Quality must be 0 or 1, got {row[0]!r}")
    for field, text in zip(MRPC_HEADER[3:], row[3:]):
        check_pair_text(text, f"{name}:{line}: {field}")
    return Pair(text_a=row[3], text_b=row[4], label=int(row[0]))


def check_pair_text(text: str, where: str) -> None:
    """ConfigError (``where``: what names the text, e.g. ``file:line: #1 String``) for a text a pool
    refuses with bad_text: empty or whitespace only, or longer than MAX_TEXT_CHARS (the worker's
    ``protocol._check_text``; the length through the client's own check, ``protocol.check_text_arg``)."""
    if not text.strip():
        raise ConfigError(f"{where}: empty text (a pool refuses it)" if not text
                          else f"{where}: only whitespace (a pool refuses it as empty text)")
    try:
        check_text_arg(where, text)
    except InputError as exc:
        raise ConfigError(f"{exc} (a pool refuses it)") from None


def default_pairs() -> list[Pair]:
    """The 64 bundled sample pairs (``common/sample_pairs.tsv``, MRPC format, labelled).

    Written for bertpool, not taken from MRPC; one pair is long enough to be
    truncated at 128 wordpieces.
    """
    with resources.as_file(resources.files(__package__).joinpath(SAMPLE_PAIRS_FILE)) as path:
        return read_mrpc_tsv(path)


def shared_data_dir() -> Path | None:
    """The shared data directory: ``$BERTPOOL_SHARED_DATA`` if set (not checked),
    else ``<repo root>/../shared/data`` if it is a directory, else None."""
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return Path(override)
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def shared_file(name: str) -> Path | None:
    """The file ``name`` (a ``SHARED_*_FILE``) of :func:`shared_data_dir`, or None where it is not there."""
    data = shared_data_dir()
    path = None if data is None else data / name
    return path if path is not None and path.is_file() else None


# --- generated pairs --------------------------------------------------------

_SUBJECTS = (
    "the company", "the city council", "the new manager", "a spokesman for the airline", "the research team",
    "local officials", "the school board", "investors", "the museum", "the football club", "the hospital",
    "the software maker", "the union", "the mayor", "the bank", "Dr. Ramírez", "the café owner",
    "the state 's attorney general", "the shipping firm", "the government",
)
_VERBS = (
    ("said", "stated"), ("announced", "revealed"), ("expects", "anticipates"), ("plans", "intends"),
    ("warned", "cautioned"), ("reported", "disclosed"), ("confirmed", "acknowledged"), ("hopes", "wants"),
)
_OBJECTS = (
    ("profits", "earnings"), ("sales", "revenue"), ("prices", "costs"), ("jobs", "positions"),
    ("delays", "setbacks"), ("visitors", "guests"), ("flights", "routes"), ("shares", "stock"),
    ("orders", "bookings"), ("classes", "courses"),
)
_CHANGES = (
    ("rose", "climbed"), ("fell", "dropped"), ("gained", "added"), ("slipped", "declined"),
    ("jumped", "surged"), ("edged up", "crept up"),
)
_ADVERBIALS = (
    "in the first quarter", "last year", "over the summer", "after a long debate", "despite the storm",
    "since the merger", "during the strike", "for the third month in a row", "in early trading",
    "before the holiday weekend",
)
_UNRELATED = (
    "the river flooded several streets near the old mill",
    "a rare bird was spotted in the hills above the town",
    "the orchestra will play works by Dvořák and Brahms",
    "heavy snow closed the mountain pass on Friday",
    "the library extended its opening hours for exam week",
    "engineers finished repairs on the unaffable old bridge",
    "the recipe calls for two cups of flour and a pinch of salt",
    "tickets for the final sold out within an hour",
    "the satellite sent back its first photographs of the comet",
    "volunteers planted more than 5,000 trees along the riverbank",
)


def check_seed(seed: object, flag: str = "--seed") -> None:
    """A random seed is an integer >= 0 (numpy's default_rng refuses negatives); ConfigError naming
    ``flag`` otherwise. The one check behind every seeded tool (compile, demo-model, finetune)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{flag} must be an integer >= 0, got {seed!r}")


def generate_pairs(n: int, seed: int = 0) -> list[Pair]:
    """``n`` deterministic English-like pairs: the same ``(n, seed)`` gives the same list.

    About two thirds are paraphrases (label 1: b rewords a with synonyms and
    moves the adverbial), the rest are unrelated (label 0). Lengths vary, and
    every eighth pair joins several clauses so that a + b exceed 128
    wordpieces and truncation is exercised. Uses only the built-in word lists.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"number of pairs must be an integer >= 0, got {n!r}")
    check_seed(seed, "seed")
    rng = random.Random(seed)
    return [_generate_pair(rng, long=(i % 8 == 7)) for i in range(n)]


def _generate_pair(rng: random.Random, long: bool) -> Pair:
    clauses = rng.randint(7, 9) if long else rng.randint(1, 2)
    parts = [_clause_parts(rng) for _ in range(clauses)]
    text_a = _sentence([_original(p) for p in parts])
    if rng.random() < 0.68:
        return Pair(text_a, _sentence([_reworded(p) for p in parts]), 1)
    unrelated = [rng.choice(_UNRELATED) for _ in range(clauses)]
    return Pair(text_a, _sentence(unrelated), 0)


def _clause_parts(rng: random.Random) -> tuple:
    """Random choices for one clause, shared by its original and reworded forms."""
    return (
        rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_CHANGES),
        rng.randint(2, 95), rng.choice(_ADVERBIALS),
    )


def _original(parts: tuple) -> str:
    subject, verb, obj, change, amount, adverbial = parts
    return f"{subject} {verb[0]} {obj[0]} {change[0]} {amount} percent {adverbial}"


def _reworded(parts: tuple) -> str:
    subject, verb, obj, change, amount, adverbial = parts
    return f"{adverbial} , {subject} {verb[1]} that {obj[1]} {change[1]} {amount} %"


def _sentence(clauses: list[str]) -> str:
    """Clauses joined MRPC-style (spaced punctuation), first letter capitalised."""
    text = " ; ".join(clauses) + " ."
    return text[0].upper() + text[1:]
