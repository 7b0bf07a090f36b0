"""Benches that start whole pools; what their command lines share is here."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from ..common.cli import child_env
from ..common.data import SHARED_VOCAB_FILE, shared_file

ECHO_VOCAB_BUILT_IN = "built-in character vocabulary"

def start_serve(args: list[str], log: IO[bytes]) -> subprocess.Popen:
    """``bertpool-serve ARGS`` as a bench's child, its output to ``log``: in a session of its own (the
    bench stops it and its workers as a group) and ending with the bench, however the bench ends
    (child_env: serve then stops on its parent's death, through common.cli.exit_with_parent)."""
    return subprocess.Popen([sys.executable, "-m", "bertpool.pool.serve", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)


def add_vocab_argument(parser: argparse.ArgumentParser) -> None:
    """``--vocab FILE`` for the workers a bench starts; a FILE that does not exist is a usage error."""
    parser.add_argument("--vocab", metavar="FILE", type=_existing_file,
                        help="the workers' WordPiece vocabulary, e.g. a real BERT vocab.txt (default: the model's "
                             "own; for the echo backend the uncased BERT vocabulary of the shared data directory "
                             "where it is present, else the backend's built-in character vocabulary, which "
                             "splits every word into characters and so costs more to tokenize)")


def echo_vocab(given: str | None) -> tuple[str | None, str]:
    """The vocabulary echo workers of a bench use, and how its report names it.

    A model comes with a real vocabulary; the echo backend's built-in one tokenizes each word into
    characters, several times the work. So a bench's echo workers take ``given``, else the shared
    uncased BERT vocabulary where present, and fall back to the built-in one (None) only without it.
    """
    path = given or shared_file(SHARED_VOCAB_FILE)
    return (None, ECHO_VOCAB_BUILT_IN) if path is None else (str(path), str(path))


def median(values: list[float]) -> float | None:
    """The median of ``values`` rounded to 3 decimals (None when empty): a bench's many-round figure."""
    return round(statistics.median(values), 3) if values else None


def median_tree(records: list[Any]) -> Any:
    """Records of the same shape (one per round) as one: the median of each number over the records
    that have it (None if none does), nested dicts key by key; anything else (a string, a list) is the
    first record's. Each number is its own median, so the medians may come from different rounds."""
    present = [r for r in records if r is not None]
    if not present:
        return None
    if all(isinstance(r, dict) for r in present):
        keys = dict.fromkeys(k for r in present for k in r)  # first seen first
        return {k: median_tree([r[k] for r in present if k in r]) for k in keys}
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in present):
        return median(present)
    return present[0]


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value
