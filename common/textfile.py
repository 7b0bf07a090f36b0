"""Text files read whole as UTF-8, refused with the line and byte offset of a bad byte.

The one decoder of bertpool's input text files: MRPC TSVs (:mod:`.data`) and vocab.txt
files (:mod:`.vocab`). Each counts lines as its own reader splits them, so the line an
error names is the line the user's editor shows and, in a vocab.txt, the token's id + 1.
"""

from __future__ import annotations

from .errors import BertpoolError, ConfigError


def decode_utf8(raw: bytes, name: str, error: type[BertpoolError] = ConfigError,
                lf_only: bool = False) -> str:
    """``raw`` (the bytes of file ``name``) as UTF-8, or ``error`` naming ``name:LINE`` and the byte
    offset of the first bad byte.

    LINE counts the line ends the file's reader splits at: ``"\\r\\n"``, ``"\\r"`` and ``"\\n"``
    (csv's, the default), or with ``lf_only`` ``"\\n"`` alone (google's ``load_vocab``, where a lone
    ``"\\r"`` is inside a token).

    Decoded whole, not streamed: reading line by line, the decoder's offset is within its 8 KiB
    chunk, so a bad byte past the first chunk was reported at a wrong position, and at no line.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start]
        # bytes.splitlines ends lines at "\r\n", "\r" and "\n", as csv counts them; the "x" makes
        # a prefix that ends in a line break count the line after it.
        line = before.count(b"\n") + 1 if lf_only else len((before + b"x").splitlines())
        raise error(f"{name}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at file offset {exc.start}: "
                    f"{exc.reason}); save the file as UTF-8") from exc
