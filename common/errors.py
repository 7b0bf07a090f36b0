"""The bertpool exception tree.

Everything bertpool raises on purpose derives from :class:`BertpoolError`, so
callers can catch one type. Wire and user input get typed errors; ``assert``
only guards internal invariants.

    BertpoolError
    ├── ConfigError            bad CLI flag, config value or file path (also a ValueError)
    ├── ProtocolError          a message that breaks the wire protocol (has ``.code``)
    │   └── InputError         a well-formed request whose content is invalid (same ``.code`` path:
    │                          the worker answers it with an ERROR reply, like any protocol error)
    ├── ModelError             a model directory that cannot be read or served
    │   ├── ModelFormatError   missing tensor, wrong shape, bad vocabulary, unknown format, wrong Neuron host
    │   ├── EquivalenceError   rebuilt model differs from the original beyond tolerance
    │   ├── PlacementError     the Neuron compiler left the encoder (or too much) on the CPU
    │   └── BinaryMismatchError  a loaded compiled binary disagrees with its reference pairs
    ├── BackendUnavailable     the requested backend's runtime is not installed
    ├── BenchError             a benchmark's own machinery failed (clients did not start or finish)
    ├── UsageError             an API called where it cannot work: a blocking Client call from a Future's
    │                          done-callback, which would deadlock (also a RuntimeError)
    └── RequestError           a client request did not produce a prediction
        ├── RequestTimeout     no reply within the deadline (also a TimeoutError)
        │   └── DeadlineExceeded  the request's deadline passed, at the client or the server
        ├── ServerBusy         the broker's queue stayed full through every retry
        ├── BrokerUnavailable  no broker answered at the address (after reconnecting and resending)
        │   └── HandshakeFailed  the server at the address refused or broke the security handshake
        ├── RemoteError        the server answered ERROR (has ``.code``)
        │   └── MalformedReply the server's reply to the request could not be decoded
        └── ClientClosed       the client was closed while the request was pending

tests/test_errors.py parses this drawing and checks it against the classes, both ways.
"""

from __future__ import annotations


class BertpoolError(Exception):
    """Base class of every error bertpool raises on purpose."""


class ConfigError(BertpoolError, ValueError):
    """A configuration value, CLI flag or path given by the user is invalid."""


class ProtocolError(BertpoolError):
    """A message violates the wire protocol (framing, version, encoding, fields).

    ``code`` is the stable error code sent back on the wire (see
    :mod:`bertpool.common.protocol`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InputError(ProtocolError):
    """A well-formed request whose content cannot be served (empty text, too long...)."""


class ModelError(BertpoolError):
    """A model directory cannot be loaded or served."""


class ModelFormatError(ModelError):
    """A model's files are not what they claim, or not for this host: missing tensor, wrong shape, bad
    vocab, a Neuron binary for another NeuronCore generation."""


class EquivalenceError(ModelError):
    """The rebuilt model's outputs differ from the original's beyond tolerance."""


class PlacementError(ModelError):
    """tensorflow-neuron compiled too little: the encoder (or too many ops) would run on the CPU."""


class BinaryMismatchError(ModelError):
    """A loaded compiled model's outputs differ from the reference pairs stored beside it."""


class BackendUnavailable(BertpoolError):
    """The requested backend's runtime (e.g. tensorflow-neuron) cannot be imported."""


class BenchError(BertpoolError):
    """A benchmark could not run or finish for reasons of its own machinery (its client
    processes did not start, did not finish in time, or crashed; the peer is not a bertpool
    broker), as opposed to a request's RequestError, which the bench counts."""


class UsageError(BertpoolError, RuntimeError):
    """The API was called where it cannot work: a bug in the calling code, not a failed request.
    A blocking Client call (predict, predict_many, stats) from a Future's done-callback runs on the
    thread that delivers replies, so it would wait for itself; it raises this instead of hanging."""


class RequestError(BertpoolError):
    """A client request did not produce a prediction."""


class RequestTimeout(RequestError, TimeoutError):
    """No reply arrived before the request's deadline."""


class DeadlineExceeded(RequestTimeout):
    """The request's deadline passed: the client waited it out, or the broker or worker
    answered ERROR ``deadline_exceeded`` instead of computing it."""


class ServerBusy(RequestError):
    """The broker's queue is full; the request was not accepted (the client already retried
    it ``busy_retries`` times, or had no time left to). Retry later."""


class BrokerUnavailable(RequestError):
    """No broker answered at the client's address: the broker was presumed dead (silent for
    ``heartbeat_liveness`` heartbeat intervals, or its connection closed) and the request was
    resent as often as ``lost_retries`` allows. The message names the address."""


class HandshakeFailed(BrokerUnavailable):
    """The server at the address ended ZeroMQ's connection handshake: the broker refused our CURVE
    key (not in its allow-list), our --curve-server-key is not its key, one side uses CURVE and
    the other not, or the peer does not speak ZeroMQ. Retrying cannot help until the
    configuration changes; the message says which."""


class RemoteError(RequestError):
    """The server answered with an ERROR reply; ``code`` is stable, ``message`` human."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MalformedReply(RemoteError):
    """The reply naming this request could not be decoded (missing or mistyped field, bad
    array, a kind that does not answer it); ``code`` is the protocol error code."""


class ClientClosed(RequestError):
    """The client was closed while the request was still pending."""
