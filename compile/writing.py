"""A failed write of a command's output, as the one error the commands report for it.

The compile-side commands write their output into :func:`bertpool.common.cli.replacing_dir`'s
staging directory, which turns an OSError about that directory into ConfigError "cannot write
OUTPUT: reason" (exit 2) and removes what was written, so the output is whole or as it was.
Two kinds of failed write escaped it as an untyped exception, a traceback and "a bug" (exit 3):

* TensorFlow reports a failed write (a SavedModel, a checkpoint) as an OpError of its own;
* a ``write()`` to a file already open (a full disk, a file-size limit) raises an OSError that
  names no file, and replacing_dir cannot tell it from an input's read error.

:func:`writing` wraps each write so that both leave as an OSError naming the path written. No
TensorFlow import here: the no-TensorFlow modules (:mod:`.selfcheck`) use it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator

# TensorFlow's codes for the errno of a failed file write (tsl's ErrnoToCode): ENOENT NotFound,
# EACCES/EPERM/EROFS PermissionDenied, ENOSPC/EDQUOT ResourceExhausted, EEXIST AlreadyExists, EFBIG
# OutOfRange. Not UnknownError or FailedPreconditionError: those also mean a bug in the graph.
_TF_WRITE_ERRORS = ("NotFoundError", "PermissionDeniedError", "ResourceExhaustedError", "AlreadyExistsError",
                    "OutOfRangeError")
# The op context TensorFlow wraps an eager op's message in: "{{function_node ...}} " and " [Op:SaveV2]".
_TF_OP_CONTEXT = re.compile(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\]")
# The lines of a graph-mode error that are not its reason: the header, where the failing op was defined
# (a traceback of File lines), its name, and what is left of "[[{{node NAME}}]]" once the context is gone.
_TF_WRAPPER_LINE = re.compile(r"Graph execution error:|Detected at node .*|File \".*|Node: .*|\[\[\]\]")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Run a block that writes ``path`` (a file or a directory of the output); if the write fails,
    leave with an OSError naming ``path``, the reason as its one-line strerror:

    * TensorFlow's error for a failed write (see _TF_WRITE_ERRORS) becomes ``OSError(None, reason, path)``;
    * an OSError that names no file gets ``path`` as its filename (errno and reason kept).

    Anything else passes unchanged, an OSError naming a file included (reading an input). Use it
    inside replacing_dir's block, which reports the OSError as "cannot write OUTPUT: reason".
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc
    except Exception as exc:
        if not _is_tf_write_error(exc):
            raise
        raise OSError(None, _one_line(exc.message) or type(exc).__name__, os.fspath(path)) from exc


def _is_tf_write_error(exc: Exception) -> bool:
    """Whether ``exc`` is TensorFlow's error for a failed write (TensorFlow not imported: it is not)."""
    tf = sys.modules.get("tensorflow")  # not imported, it raised nothing: importing it costs seconds
    errors = getattr(tf, "errors", None)
    return errors is not None and isinstance(exc, tuple(getattr(errors, name) for name in _TF_WRITE_ERRORS))


def _one_line(message: str) -> str:
    """The reason in TensorFlow's ``message``, as one line: its first line that is not the wrapper a
    graph-mode (Session) error comes in, without op context. A Session's error starts "Graph execution
    error:", then where the op was defined, and gives the reason (e.g. "PATH; File too large") after."""
    lines = [_TF_OP_CONTEXT.sub("", line).strip() for line in str(message).strip().splitlines()]
    reasons = [line for line in lines if line and not _TF_WRAPPER_LINE.match(line)]
    return reasons[0] if reasons else lines[0] if lines else ""
