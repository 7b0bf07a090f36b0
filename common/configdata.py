"""Component configs as data: a frozen ``@dataclass`` to a JSON-able dict and back.

This is how a parent process hands a child its whole config (the supervisor its
workers): every field travels, nested dataclasses included, so a field added to
a config later needs no new command-line flag to reach the child. Fields marked
``metadata={"secret": True}`` (loaded key material) never travel: the child
loads them again from the file fields beside them.

Contract of :func:`from_dict`: every non-secret field must be present and of its
declared type; an unknown or missing field, or a value of the wrong type, raises
:class:`ConfigError` naming it; the dataclass's own ``__post_init__`` checks run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError

SECRET = "secret"  # field metadata key: this field's value never leaves the process


def data_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that travel (every one but the secret ones)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get(SECRET)]


def to_dict(config: Any) -> dict[str, Any]:
    """``config`` (a dataclass instance) as plain JSON-able data, nested dataclasses as dicts."""
    out: dict[str, Any] = {}
    for f in data_fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def from_dict(cls, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from :func:`to_dict`'s output (ConfigError on anything else)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    wanted = {f.name: f for f in data_fields(cls)}
    unknown = sorted(set(data) - set(wanted))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(set(wanted) - set(data))
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    values = {name: _convert(hints[name], data[name], f"{where}.{name}") for name in wanted}
    return cls(**values)


def _convert(tp: Any, value: Any, where: str) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) != 1:
            raise ConfigError(f"{where}: unsupported field type {tp}")
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def write_json(config: Any, path: str | Path) -> None:
    """Write ``config`` as JSON to ``path``, readable by this user only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(to_dict(config), f, indent=1)
        f.write("\n")


def read_json(cls, path: str | Path) -> Any:
    """Build dataclass ``cls`` from the JSON file ``path`` (ConfigError if unreadable or invalid)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    return from_dict(cls, data)
