"""Under the test command, a missing required dependency fails the run instead of skipping it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# The same skip at collection (module level) and inside a test.
PROBES = {
    "module": 'import pytest\n\npytest.importorskip("json.no_such_module")\n\n\ndef test_never_runs():\n    pass\n',
    "test": 'import pytest\n\n\ndef test_skips():\n    pytest.importorskip("json.no_such_module")\n',
}


def run_probe(tmp_path: Path, require: str | None, where: str = "module") -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBES[where])
    env = {k: v for k, v in os.environ.items() if k != "BERTPOOL_REQUIRE"}
    if require is not None:
        env["BERTPOOL_REQUIRE"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "require_deps",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", sorted(PROBES))
def test_without_the_variable_a_missing_module_skips(tmp_path, where):
    proc = run_probe(tmp_path, None, where)
    ok = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)  # a module-level skip collects nothing
    assert proc.returncode in ok and "1 skipped" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("where", sorted(PROBES))
def test_a_required_module_skipped_past_fails_the_run(tmp_path, where):
    proc = run_probe(tmp_path, "json", where)  # json imports; json.no_such_module does not
    assert proc.returncode not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), proc.stdout
    assert "requires json" in proc.stdout + proc.stderr and "skipped" not in proc.stdout.splitlines()[-1]


def test_a_required_module_that_does_not_import_stops_the_run(tmp_path):
    proc = run_probe(tmp_path, "json,no_such_module_bertpool")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "no_such_module_bertpool" in proc.stderr


def test_the_test_command_requires_what_it_installs():
    script = (HERE.parent / "scripts" / "test").read_text()
    for module in ("tensorflow", "safetensors", "matplotlib", "aiohttp", "grpc", "tritonclient.http",
                   "tritonclient.grpc", "hypothesis"):
        assert module in script.split("BERTPOOL_REQUIRE=", 1)[1].split()[0].split(","), module
