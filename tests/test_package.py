"""The package root: the client API importable as ``from bertpool import ...``, loaded lazily."""

from __future__ import annotations

import subprocess
import sys


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
