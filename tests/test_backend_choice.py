"""Which backend a worker runs: --model without --backend serves the model, echo only when asked or modelless."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bertpool.common.errors import ConfigError, ModelFormatError
from bertpool.workers.backends import choose_backend


def compiled_dir(tmp_path, target: str):
    """Just enough of a bertpool-compile output for the choice (the manifest)."""
    from bertpool.compile.runtime import MANIFEST, MANIFEST_VERSION, REQUIRED_KEYS

    manifest = {key: None for key in REQUIRED_KEYS}
    manifest.update(format_version=MANIFEST_VERSION, target=target, batch_size=4, seq_length=128, model={},
                    dtype="float32", gelu="erf")
    directory = tmp_path / target
    directory.mkdir()
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return str(directory)


def model_path(tmp_path, kind: str | None) -> str | None:
    """None, a bare SavedModel directory, or a compiled directory for target ``kind``."""
    if kind is None:
        return None
    if kind == "savedmodel":
        (tmp_path / "sm").mkdir()
        (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
        return str(tmp_path / "sm")
    return compiled_dir(tmp_path, kind)


@pytest.mark.parametrize("requested, model, expected", [
    (None, None, "echo"),
    (None, "cpu", "tf"),
    (None, "gpu", "tf"),
    (None, "neuron", "neuron"),
    (None, "savedmodel", "tf"),
    ("tf", "cpu", "tf"),
    ("echo", None, "echo"),
])
def test_choice(tmp_path, requested, model, expected):
    assert choose_backend(requested, model_path(tmp_path, model)) == expected


@pytest.mark.parametrize("requested, model, error, message", [
    ("echo", "dir", ConfigError, "--backend echo serves no model"),
    ("tf", None, ConfigError, "needs --model"),
    ("neuron", None, ConfigError, "needs --model"),
    (None, "missing", ConfigError, "not a directory"),
    (None, "empty", ModelFormatError, "nothing to serve"),
])
def test_contradictions_are_errors_not_fallbacks(tmp_path, requested, model, error, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty").mkdir()
    path = None if model is None else str(tmp_path / model)
    with pytest.raises(error, match=message):
        choose_backend(requested, path)


def test_serve_announces_echo_loudly(start_pool):
    pool = start_pool(parallel=1)
    assert "1 x echo workers" in pool.log()
    assert "WARNING: echo backend: answers are NOT a model's" in pool.log()
    assert [w["backend"] for w in pool.stats()["workers"].values()] == ["echo"]


def test_serve_refuses_a_directory_that_holds_no_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bertpool.pool.serve", "--model", str(tmp_path),
                           "--address", f"ipc://{tmp_path}/f", "--worker-address", f"ipc://{tmp_path}/b"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing to serve" in proc.stderr and "Traceback" not in proc.stderr
