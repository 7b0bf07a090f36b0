"""The exception tree drawn in common/errors.py is the tree of its classes, both ways."""

from __future__ import annotations

import inspect
import re

from bertpool.common import errors

# A drawn node: tree guides ("│", spaces, "├── " or "└── ") and then a class name.
_NODE = re.compile(r"^(?P<guides>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z][A-Za-z]+)\b")


def drawn_parents() -> dict[str, str | None]:
    """{class name: parent class name} as the module docstring draws it (the root's parent is None)."""
    lines = [line[4:] for line in errors.__doc__.splitlines() if line.startswith("    ") and line.strip()]
    parents: dict[str, str | None] = {}
    stack: list[str] = []  # stack[d] = the last class drawn at depth d
    for line in lines:
        match = _NODE.match(line)
        if not match:
            continue  # a description continued on the next line
        depth = len(match["guides"]) // 4 + (1 if line[len(match["guides"]):].startswith(("├", "└")) else 0)
        del stack[depth:]
        parents[match["name"]] = stack[-1] if stack else None
        stack.append(match["name"])
    return parents


def actual_parents() -> dict[str, str | None]:
    """{class name: its BertpoolError base} for every error class the module defines."""
    out: dict[str, str | None] = {}
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ != errors.__name__ or not issubclass(cls, errors.BertpoolError):
            continue
        bases = [b.__name__ for b in cls.__bases__ if issubclass(b, errors.BertpoolError)]
        assert len(bases) <= 1, f"{name} has two bertpool bases {bases}: the drawing cannot show that"
        out[name] = bases[0] if bases else None
    return out


def test_drawing_parses_to_a_tree():
    parents = drawn_parents()
    assert parents["BertpoolError"] is None
    assert parents["InputError"] == "ProtocolError"
    assert parents["DeadlineExceeded"] == "RequestTimeout"
    assert parents["MalformedReply"] == "RemoteError"


def test_drawing_matches_the_classes():
    assert drawn_parents() == actual_parents()
