"""The package root: the client API importable as ``from bertpool import ...``, loaded lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_client_api_imports_from_the_root_in_a_fresh_process():
    proc = run_python(
        "import sys\n"
        "import bertpool\n"
        "assert 'zmq' not in sys.modules and 'numpy' not in sys.modules, 'import bertpool must stay light'\n"
        "from bertpool import Client, ServerBusy, RequestTimeout, Prediction, RequestError, RemoteError\n"
        "from bertpool.clients.client import Client as C, Prediction as P\n"
        "from bertpool.common import errors\n"
        "assert Client is C and Prediction is P and ServerBusy is errors.ServerBusy\n"
        "assert issubclass(RequestTimeout, RequestError)\n"
        "print('ok')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_every_error_class_is_importable_from_the_root():
    # Covers error classes added later (e.g. a BrokerUnavailable) without listing them here.
    proc = run_python(
        "import bertpool\n"
        "from bertpool.common import errors\n"
        "names = [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.BertpoolError)]\n"
        "assert len(names) >= 10, names\n"
        "for n in names:\n"
        "    assert getattr(bertpool, n) is getattr(errors, n), n\n"
        "ns = {}\n"
        "exec('from bertpool import *', ns)\n"
        "assert {'Client', 'Prediction', 'RequestError', 'ServerBusy'} <= set(ns), sorted(ns)\n"
        "print('ok')\n")
    assert proc.returncode == 0, proc.stderr


def test_unknown_names_are_attribute_errors():
    import bertpool

    for name in ("Nope", "annotations", "importlib"):
        try:
            getattr(bertpool, name)
        except AttributeError as exc:
            assert name in str(exc)
        else:
            raise AssertionError(f"bertpool.{name} should not exist")


def _extras() -> dict[str, list[str]]:
    """setup.cfg's extras: name -> requirement names (lower case, without versions or extras)."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {name: [re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
                   for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]
            for name, value in cfg["options.extras_require"].items()}


def test_the_test_extra_installs_beside_the_neuron_extras():
    """README: pip install -e '.[neuron,test]'. The Neuron TensorFlow 2.10 needs protobuf < 3.20, so the
    test extra may ask for nothing that needs a newer protobuf (the gateway's test clients did)."""
    extras = _extras()
    newer_protobuf = {"protobuf", "grpcio-tools", "tritonclient"}
    assert not newer_protobuf & set(extras["test"]), extras["test"]
    assert {"grpcio-tools", "tritonclient"} <= set(extras["gateway-test"])
    # ... and the test command still installs them, so CI runs the gateway's tests.
    setup_line = next(line for line in (ROOT / "scripts" / "test").read_text().splitlines()
                      if "scripts/setup" in line and not line.lstrip().startswith("#"))
    assert "gateway-test" in setup_line.split()[1].split(","), setup_line
