"""The arrows between bertpool's packages point down: each role depends only on the layers below it.

common  <-  broker, clients, compile, workers (+ compile.runtime, which loads compiled models)
clients <-  gateway (+ compile.runtime, which reads the served model's manifest)
common, broker, workers, gateway  <-  pool (bertpool-serve composes broker + workers + gateway)
all     <-  bench (benches that start pools or load models through several roles)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["common", "broker", "clients", "workers", "compile", "gateway", "pool", "bench"]

# Every edge allowed, explicitly: package -> the packages it may import (besides itself).
ALLOWED = {
    "common": set(),
    "broker": {"common"},
    "clients": {"common"},
    "workers": {"common", "compile"},   # backends load compiled models through compile's runtime
    "compile": {"common"},
    "gateway": {"common", "clients", "compile"},  # the served model's version: its manifest
    "pool": {"common", "broker", "workers", "gateway"},
    "bench": {"common", "broker", "clients", "workers", "gateway", "pool", "compile"},
}
# The finer edge: of compile/, the serving path (workers, gateway) touches only the runtime that
# loads and describes compiled models, never the build-time toolchain.
SERVING_FROM_COMPILE = {"compile.runtime"}


def _imports(path: Path, package: str) -> set[str]:
    """The bertpool modules ``path`` imports, as dotted names below bertpool (e.g. 'common.cli')."""
    module_parts = [package, *path.relative_to(ROOT / package).with_suffix("").parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module_parts[:len(module_parts) - node.level]
                head = ".".join(base + ([node.module] if node.module else []))
                names = [head] if node.module else [f"{head}.{a.name}" if head else a.name for a in node.names]
                found.update(n for n in names if n)
                continue
            names = [node.module or ""]
        else:
            continue
        found.update(n[len("bertpool."):] for n in names if n.startswith("bertpool."))
    return found


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" in path.relative_to(ROOT / package).parts[:-1]:
                continue  # generated gRPC modules import only protobuf/grpc
            yield package, path


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below_it(package):
    wrong = []
    for pkg, path in _modules():
        if pkg != package:
            continue
        for name in _imports(path, pkg):
            top = name.split(".")[0]
            if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                wrong.append(f"{path.relative_to(ROOT)} imports bertpool.{name}")
            if pkg in ("workers", "gateway") and top == "compile" \
                    and ".".join(name.split(".")[:2]) not in SERVING_FROM_COMPILE:
                wrong.append(f"{path.relative_to(ROOT)} imports bertpool.{name} (not the compile runtime)")
    assert not wrong, "arrows that run back up:\n" + "\n".join(wrong)


def test_the_walk_sees_relative_and_absolute_imports(tmp_path):
    """The checker itself: it must see the import styles the code uses, or the test above passes by accident."""
    found = _imports(ROOT / "pool" / "serve.py", "pool")
    assert {"broker.broker", "workers.supervisor", "gateway.launch"} <= found
    assert sum(1 for _ in _modules()) > 40
