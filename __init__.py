"""bertpool: serve BERT sentence-pair classification from a pool of accelerator workers.

The client API is importable from the package root:

    from bertpool import Client, RequestError
    with Client("tcp://127.0.0.1:5555") as client:
        print(client.predict("The cat sat.", "A cat was sitting.").label)

The names below load on first use (PEP 562), so ``import bertpool`` (which
every ``bertpool.*`` command runs first) imports neither ZeroMQ nor NumPy:
compile-only and tooling users pay for nothing they do not use. Every error
class in :mod:`bertpool.common.errors` is importable from here too.
"""

import importlib as _importlib

__version__ = "0.1.0"

# name -> module that defines it. Absolute names: tools such as pytest may import this file
# under another name (the repo root is the package), and a relative import would then recurse.
_LAZY = {
    "Client": "bertpool.clients.client",
    "ClientConfig": "bertpool.clients.client",
    "Prediction": "bertpool.clients.client",
}
_ERRORS = "bertpool.common.errors"
# The error classes a client user meets; any other class in common.errors is importable too.
_ERROR_NAMES = ("BertpoolError", "ConfigError", "ProtocolError", "InputError", "RequestError",
                "RequestTimeout", "DeadlineExceeded", "ServerBusy", "BrokerUnavailable", "HandshakeFailed",
                "RemoteError", "MalformedReply", "ClientClosed", "UsageError")

__all__ = ["__version__", *_LAZY, *_ERROR_NAMES]


def __getattr__(name: str):
    if name.startswith("_"):  # dunders and private names are never lazy (import machinery asks for some)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
    else:
        errors = _importlib.import_module(_ERRORS)
        value = getattr(errors, name, None)
        if not (isinstance(value, type) and issubclass(value, errors.BertpoolError)):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted({n for n in globals() if not n.startswith("_")} | set(__all__))
