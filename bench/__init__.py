"""Benches that start whole pools; what their command lines share is here."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_vocab_argument(parser: argparse.ArgumentParser) -> None:
    """``--vocab FILE`` for the workers a bench starts; a FILE that does not exist is a usage error."""
    parser.add_argument("--vocab", metavar="FILE", type=_existing_file,
                        help="the workers' WordPiece vocabulary, e.g. a real BERT vocab.txt (default: the model's "
                             "own; for the echo backend its built-in character vocabulary, which splits every "
                             "word into characters and so costs more to tokenize)")


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value
