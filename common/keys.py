"""bertpool-keys: make CURVE key pairs (ZeroMQ certificate files) for the broker, clients, workers.

    bertpool-keys keys/ broker client-1 worker-host-a

writes ``keys/NAME.key`` (public: copy it into the broker's allow-list
directory, or give the broker's to its peers) and ``keys/NAME.key_secret``
(both halves, mode 0600: it stays with its owner). See README, "Security".
"""

from __future__ import annotations

import argparse

from ..common.cli import add_exit_status, report_error
from ..common.errors import BertpoolError
from .security import generate_key_pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertpool-keys",
        description="Generate CURVE key pairs (NAME.key public, NAME.key_secret secret) in ZeroMQ's "
                    "certificate format, for bertpool's --curve-* flags.",
        epilog="example: bertpool-keys keys/ broker client-1 worker-1")
    parser.add_argument("directory", metavar="DIR",
                        help="where to write the files (created mode 0700 if missing)")
    parser.add_argument("names", metavar="NAME", nargs="+",
                        help="one key pair per name: letters, digits, '.', '_', '-', without the .key "
                             "suffix (writes NAME.key 0644 and NAME.key_secret 0600)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing key files (or symlinks) of these names")
    add_exit_status(parser, "0 written, 2 a bad name, a key file in the way (without --force), or DIR not writable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = generate_key_pairs(args.directory, args.names, force=args.force)
    except BertpoolError as exc:
        return report_error("bertpool-keys", exc)
    for public, secret in written:
        print(f"{public}  (public)\n{secret}  (secret: keep it private)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
