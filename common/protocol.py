"""The bertpool wire protocol, version ``BP4``: every frame layout in one place.

Transport: ZeroMQ. Clients and workers are DEALER sockets; the broker has a
frontend ROUTER (clients) and a backend ROUTER (workers). Every message starts
with the version frame and a one-byte kind frame; bodies are msgpack maps.

Client -> broker (frontend)            [VERSION, kind, body]
    REQUEST  body {id, text_a, text_b, deadline_ms?}
                                                  a text pair (msgpack str each, as the client
                                                  sends them; bin is refused, bad_text), or
             body {id, input_ids, input_mask, segment_ids, deadline_ms?}
                                                  pre-tokenized features, each an encoded array [S] int32
             deadline_ms (optional): the time left to the request's deadline when the
                                                  client sent it, a positive number of milliseconds (a
                                                  duration, so no shared clock is needed); past it the
                                                  request is answered ERROR deadline_exceeded, not computed
    STATS    body {id}                            ask for pool statistics; id as a REQUEST's
    HEARTBEAT body {}                             "are you there?": the broker answers HEARTBEAT at once.
                                                  A client that waits on replies sends one after
                                                  heartbeat_interval_s without hearing from the broker,
                                                  and presumes the broker dead after heartbeat_liveness
                                                  silent intervals (any message counts as a beat)

Broker -> client (frontend)            [VERSION, kind, body]
    REPLY    body {id, label, probabilities, timings}
    ERROR    body {id, code, message}             id is None where the request had none readable; an
                                                  over-long str id comes back cut to MAX_ID_LEN
                                                  characters plus "…" (so no valid id equals it)
    BUSY     body {id, message}                   queue full; request not accepted
    STATS    body {id, stats}                     stats: see Broker.stats()
    HEARTBEAT body {}                             answer to a client's HEARTBEAT

    Every reply names the request it answers by id, STATS included, so a
    client settles each pending request with the reply that names it and
    drops (and counts) one that names none, such as a reply that comes after
    its request's deadline. Decoding a reply (split_reply, then
    parse_prediction / parse_error / parse_busy / parse_stats_reply) raises
    ProtocolError on anything malformed, never another exception.

Worker -> broker (backend)             [VERSION, kind, ...]
    READY     [VERSION, READY, body {worker, slot, incarnation, pid, capacity, backend, batch_size,
                                     model?, version?, requests_per_message?, batch_timeout_ms?}]
                                                  model (optional): {hash, dtype, target}, what the
                                                  worker serves, from the compiled model's manifest
                                                  (hash: the source weights' sha256) where it has one;
                                                  version (optional): the worker's bertpool version;
                                                  batch_timeout_ms (optional): how long it lets a batch
                                                  fill (a number >= 0; the broker reports it in STATS).
                                                  Each a str of at most MAX_LABEL_LEN characters; the
                                                  broker exports them as bertpool_model_info labels;
                                                  requests_per_message (optional int >= 1, default 1):
                                                  the most requests the worker takes in one REQUESTS
                                                  message (1: it is sent single REQUESTs only)
    REPLY     [VERSION, REPLY, token, body]       token: the broker's 8-byte request handle
    ERROR     [VERSION, ERROR, token, body]
    REPLIES   [VERSION, REPLIES, table, bodies]   several REPLYs and ERRORs in one message (a batch's
                                                  answers: one ZeroMQ message instead of one each).
                                                  table: per answer, 13 bytes: token (8), kind (1:
                                                  REPLY or ERROR), body length (4, big-endian);
                                                  bodies: the answers' bodies back to back, in table
                                                  order. At least 1, at most MAX_PER_MESSAGE answers
    STATS     [VERSION, STATS, body {inferences, batches, padded_rows, ..., epoch?, histograms?}]
                                                  cumulative integer counters since the worker process
                                                  started, each in [0, MAX_COUNT); among them
                                                  reconnects (optional, 0 when absent): times the
                                                  process registered afresh, so a stream first heard
                                                  with reconnects > 0 may hold work done for an earlier
                                                  broker (the broker takes it as a baseline, not as an
                                                  increase); epoch (optional): a str naming that process's
                                                  counter stream (random per process, kept across its
                                                  re-registrations), so the broker can total the counts
                                                  of a pool whose workers come and go without counting
                                                  any twice; histograms (optional): cumulative
                                                  {name: {counts: [int per bucket, +Inf last], sum:
                                                  float}}, at most MAX_HISTOGRAMS of MAX_BUCKETS buckets
                                                  (names and buckets: common.metrics_export), every
                                                  count and the sum in [0, MAX_COUNT). The broker adds
                                                  a STATS only from a registered socket, or one that
                                                  answered a request it handed out, or under an epoch
                                                  one of those sent
    HEARTBEAT [VERSION, HEARTBEAT, body {incarnation?}]
                                                  "I am alive"; sent every heartbeat_interval_s on the
                                                  worker's registration socket (the one READY left on).
                                                  On another of its sockets it names the registration's
                                                  incarnation, which the beat is then for (an inline
                                                  worker beats so while a long batch holds its
                                                  registration socket's thread)
    DISCONNECT[VERSION, DISCONNECT, body {worker, incarnation}]
                                                  worker is leaving; what it still holds is re-queued

    READY names the worker three ways: ``worker`` a label for logs and stats;
    ``incarnation`` random, unique to this registration of this worker process
    (new_incarnation; a worker that re-registers after a broker restart or a
    DISCONNECT picks a new one); ``slot`` (or None) the supervisor slot it fills,
    stable across restarts and unique to host, supervisor process and core. A
    READY for a slot that another socket registered is that slot's restart: the
    broker drops the old incarnation (it is dead) and re-dispatches what it held.
    Nothing else ever makes the broker drop a live worker: not a name, not a
    READY without slot. A worker may send REPLY, ERROR, STATS and DISCONNECT on
    a second DEALER socket (its compute thread's): the broker matches replies by
    token and DISCONNECT by incarnation (by the sending socket when it names
    none), never by name.

Broker -> worker (backend)             [VERSION, kind, ...]
    REQUEST  [VERSION, REQUEST, token, body, queued, deadline]
                                                  body exactly as the client sent it; queued:
                                                  8-byte big-endian microseconds it waited in the
                                                  broker's queue; deadline: empty (no deadline) or
                                                  8-byte big-endian microseconds left to the
                                                  request's deadline when the broker sent it (>= 1).
                                                  Both are durations, so no shared clock is needed
    REQUESTS [VERSION, REQUESTS, table, bodies]   several REQUESTs in one message, to a worker whose
                                                  READY said requests_per_message > 1 (at most that
                                                  many): the requests the broker hands that worker in
                                                  one dispatch round. table: per request, 28 bytes:
                                                  token (8), queued (8), deadline (8; 0 = none), body
                                                  length (4), all big-endian, queued and deadline in
                                                  microseconds as in REQUEST; bodies: the clients'
                                                  bodies back to back, in table order, at most the
                                                  broker's max_request_bytes in all (so a worker that
                                                  takes the largest REQUEST takes any REQUESTS)
    HEARTBEAT [VERSION, HEARTBEAT, body {}]       sent to every registered worker every
                                                  heartbeat_interval_s
    DISCONNECT [VERSION, DISCONNECT, body {reason}]
                                                  "you are not registered here": reason
                                                  "unknown_worker" (a beat from a socket the broker
                                                  does not know: e.g. a worker it presumed dead, or
                                                  one from before a broker restart) or
                                                  "shutting_down" (to each registered worker as the
                                                  broker exits, and to an unregistered socket's beat
                                                  while it drains; a READY then gets no answer at
                                                  all, so a worker that re-registers at once cannot
                                                  ping-pong with it). The worker drops what it held
                                                  (those tokens are void), reopens its sockets and
                                                  says READY again under a new incarnation.

Heartbeats on the backend (Majordomo / Paranoid Pirate): each side sends
HEARTBEAT every ``heartbeat_interval_s`` (default 1.0); any message counts as a
beat (for the broker: any message from the worker's registration socket, and
any REPLY or ERROR carrying a token the worker holds, so a worker answering on
its second socket is alive too). A peer silent for ``heartbeat_liveness``
(default 3) intervals is dead: the broker removes the worker and re-dispatches
what it held under a FRESH token (up to ``max_redispatch`` times, then ERROR
worker_lost), so a late reply under the old token matches nothing and is
dropped and counted, never delivered twice; the worker reconnects and says
READY again. Tokens start at a random 64-bit value per broker process, so a
reply from before a broker restart cannot match a token of the new broker.
The worker beats from its I/O thread, never from the thread that runs the
model, so a long batch never makes it look dead.

Arrays travel as ``{"__nd__": True, "dtype": str, "shape": [...], "data": bytes}``
(raw little-endian bytes, never Python lists). Reply ``probabilities`` is such
an array of float32 [2]; ``timings`` is a map of milliseconds:
``queue_ms`` (broker queue + worker inbox), ``batch_wait_ms`` (waiting for the
batch to fill), ``compute_ms`` (the model call for the whole batch).

BP4 changed from BP3, incompatibly: REQUESTS and REPLIES carry many requests or
answers in one message (fewer ZeroMQ calls and wake-ups per request on both
sides of the backend), READY may carry ``requests_per_message``, and the broker
reads READY's ``batch_size``: it hands a worker up to that many requests at a time.

BP3 changed from BP2, incompatibly: REQUEST may carry ``deadline_ms``; HEARTBEAT
is live on both links; ERROR codes ``deadline_exceeded``, ``worker_lost`` and
``shutting_down`` (new REQUESTs while the broker drains on SIGTERM); the
broker's REQUEST to a worker carries a sixth frame, the time left to the
deadline; the broker's DISCONNECT tells a worker to re-register (not to exit).

Decoding: the broker decodes with parse_from_client (frontend) and
parse_from_worker (backend), the worker with parse_from_broker; each raises
ProtocolError (with a stable code) on anything malformed, never another
exception. Encoders for every backend message are here too (request_frames,
reply_frames, ready_frames, ...).

BP2 changed from BP1, incompatibly: STATS requests and replies carry an id
(BP1 matched STATS replies first in, first out, so a late one answered the
next caller); READY carries ``slot`` and ``incarnation`` (BP1 replaced any
worker of the same name, live or not); DISCONNECT names its incarnation.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np

from .cli import check_host
from .errors import ConfigError, InputError, ProtocolError

VERSION = b"BP4"

# Message kinds: one byte each, so routing never decodes a body.
REQUEST = b"\x01"
REPLY = b"\x02"
ERROR = b"\x03"
BUSY = b"\x04"
READY = b"\x05"
STATS = b"\x06"
HEARTBEAT = b"\x07"
DISCONNECT = b"\x08"
REQUESTS = b"\x09"
REPLIES = b"\x0a"

KIND_NAMES = {
    REQUEST: "REQUEST", REPLY: "REPLY", ERROR: "ERROR", BUSY: "BUSY", READY: "READY",
    STATS: "STATS", HEARTBEAT: "HEARTBEAT", DISCONNECT: "DISCONNECT", REQUESTS: "REQUESTS",
    REPLIES: "REPLIES",
}

# Stable error codes carried by ERROR replies.
E_BAD_FRAMES = "bad_frames"          # wrong number of frames
E_BAD_VERSION = "bad_version"        # unknown protocol version
E_BAD_KIND = "bad_kind"              # message kind not valid here
E_BAD_ENCODING = "bad_encoding"      # body is not a msgpack map
E_BAD_FIELD = "bad_field"            # missing field or wrong type
E_BAD_TEXT = "bad_text"              # empty, non-UTF-8 or oversized text
E_TOO_LARGE = "too_large"            # body over the broker's size bound
E_INFERENCE = "inference_failed"     # the model call for this request's batch failed, or gave it no finite answer
E_SHUTDOWN = "shutting_down"         # worker or broker is stopping
E_DEADLINE = "deadline_exceeded"     # the request's deadline passed before it was computed
E_WORKER_LOST = "worker_lost"        # the workers that held it died, more times than the re-dispatch bound
ERROR_CODES = (E_BAD_FRAMES, E_BAD_VERSION, E_BAD_KIND, E_BAD_ENCODING, E_BAD_FIELD, E_BAD_TEXT, E_TOO_LARGE,
               E_INFERENCE, E_SHUTDOWN, E_DEADLINE, E_WORKER_LOST)

# Bounds on input, so one bad client cannot make a worker tokenize megabytes.
MAX_TEXT_CHARS = 20_000
MAX_FEATURE_LEN = 8192  # longest feature row a client sends (beyond any BERT's S; keeps a request
                        # far below every link's smallest message limit)
MAX_ID_LEN = 256
MAX_NAME_LEN = 256  # worker names, slots and incarnations in READY and DISCONNECT
MAX_LABEL_LEN = 128  # READY's model and version strings (metric labels)
MAX_HISTOGRAMS = 16  # histograms in one STATS
MAX_BUCKETS = 64     # buckets in one of them
# Bound on every STATS counter, bucket count and histogram sum: float64 (a Prometheus sample) holds
# each integer below it exactly, and no worker gets near it (2**53 rows at a million a second take
# 285 years), so a larger value is a bug or a forgery that would swamp the pool totals for good.
MAX_COUNT = 1 << 53

TOKEN_BYTES = 8
MAX_PER_MESSAGE = 4096  # most requests in one REQUESTS, or answers in one REPLIES

TRANSPORTS = ("tcp://", "ipc://", "inproc://")


INT32_MAX = (1 << 31) - 1  # ZeroMQ's (and gRPC's) int options: larger values overflow; features are int32


def fits_int32(array: np.ndarray) -> bool:
    """Every value of the integer ``array`` is one int32 holds (a cast would keep it as it is)."""
    return not array.size or (int(array.min()) >= -INT32_MAX - 1 and int(array.max()) <= INT32_MAX)


def tcp_host_port(endpoint: str) -> tuple[str, str] | None:
    """(HOST, PORT) of a ``tcp://`` endpoint as text, split at its last ':' (HOST "" without one);
    None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    return host, port


def check_endpoint(name: str, endpoint: str) -> str:
    """Return ``endpoint`` if it names a ZeroMQ transport bertpool uses, else ConfigError; a tcp
    endpoint needs a fixed port 1..65535 (ZeroMQ would wrap a larger one, and ``*`` or 0, a port
    chosen at bind, is one no peer could know) and a HOST that is ``*`` (bind: every interface), an
    IPv4 address or a name, checked as every HOST:PORT flag's (cli.check_host): ZeroMQ itself would
    take ``999.1.1.1`` and fail later with "No such device". IPv6 is refused: bertpool's sockets do
    not set ZeroMQ's IPV6 option, without which every bracketed host fails the same way.
    (``inproc://`` passes, for sockets of one process; the command-line flags refuse it.)"""
    if not isinstance(endpoint, str) or not endpoint.startswith(TRANSPORTS):
        raise ConfigError(f"{name} {endpoint!r} must start with tcp:// or ipc://")
    tcp = tcp_host_port(endpoint)
    if tcp is not None:
        host, port = tcp
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name} {endpoint!r} must be tcp://HOST:PORT with PORT in 1..65535")
        if host.startswith("[") or ":" in host:
            raise ConfigError(f"{name} {endpoint!r}: IPv6 is not supported on bertpool's ZeroMQ links; "
                              f"give an IPv4 address or a host name")
        if host != "*":
            check_host(name, endpoint, host)
    return endpoint


def ipc_path(endpoint: str) -> str | None:
    """The socket file an ``ipc://`` endpoint names, made absolute with links and ``//`` resolved (two
    spellings of one file are one endpoint); None for other transports and Linux's abstract ``ipc://@``."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return os.path.realpath(endpoint[len("ipc://"):])


def same_endpoint(a: str, b: str) -> bool:
    """Whether endpoints ``a`` and ``b`` name one place (ipc paths compared by :func:`ipc_path`)."""
    if a == b:
        return True
    path = ipc_path(a)
    return path is not None and path == ipc_path(b)


def local_endpoint(bound: str) -> str:
    """Where a process on this host connects to reach ``bound``, an endpoint bound here: a tcp
    wildcard host (``*``, ``0.0.0.0``, ``[::]``) becomes loopback (ZeroMQ cannot connect to ``*``);
    anything else is itself."""
    tcp = tcp_host_port(bound)
    if tcp is not None:
        host, port = tcp
        loopback = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "[*]": "[::1]"}.get(host)
        if loopback:
            return f"tcp://{loopback}:{port}"
    return bound


def check_heartbeat(interval_s: float, liveness: int) -> None:
    """ConfigError unless the heartbeat settings (broker's or worker's) can detect anything: the
    liveness window (interval x liveness, how long a silent peer still passes for alive) is at most
    MAX_TIMEOUT_S, the bound every other wait and deadline has (check_timeout), so a dead peer is
    noticed, and what it held re-dispatched, within the longest any request may wait (a liveness of
    10**20 passed and turned detection off). A lower cap would refuse slow links' settings for no
    bound the rest of the pool keeps."""
    # Under 10 ms a beat is due before a busy peer can answer: live workers are presumed dead in a loop.
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0.01 <= interval_s <= 3600:
        raise ConfigError(f"heartbeat_interval_s must be in [0.01, 3600], got {interval_s!r}")
    if isinstance(liveness, bool) or not isinstance(liveness, int) or liveness < 1:
        raise ConfigError(f"heartbeat_liveness must be an int >= 1, got {liveness!r}")
    if interval_s * liveness > MAX_TIMEOUT_S:
        raise ConfigError(f"heartbeat_liveness x heartbeat_interval_s must be at most {MAX_TIMEOUT_S:g} s (a day), "
                          f"got {liveness} x {interval_s:g} s: a peer dead that long would never be noticed")


def _queued_us(seconds: float) -> int:
    """A queue time in whole microseconds, never negative (REQUEST's frame, REQUESTS' table)."""
    return max(0, int(seconds * 1e6))


def encode_queue_time(seconds: float) -> bytes:
    """The ``queued`` frame: a non-negative duration as 8-byte big-endian microseconds."""
    return _queued_us(seconds).to_bytes(8, "big")


def decode_queue_time(frame: bytes) -> float:
    """Inverse of encode_queue_time, in milliseconds (0.0 for a malformed frame)."""
    return int.from_bytes(frame, "big") / 1000.0 if len(frame) == 8 else 0.0


# --------------------------------------------------------------------- bodies

def pack(body: dict[str, Any]) -> bytes:
    """Encode a body map with msgpack (binary-safe, bytes stay bytes)."""
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode a body; raise ProtocolError(bad_encoding) unless it is a msgpack map."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(E_BAD_ENCODING, f"body is not valid msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(E_BAD_ENCODING, f"body must be a msgpack map, got {type(body).__name__}")
    return body


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """An ndarray as raw little-endian bytes + dtype + shape."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return {"__nd__": True, "dtype": array.dtype.str.lstrip("<|="), "shape": list(array.shape),
            "data": array.tobytes()}


_ALLOWED_DTYPES = {"i4", "i8", "f4", "f2", "f8", "u1", "b1"}
# Each allowed dtype name's little-endian numpy dtype, built once (decode_array runs per reply).
_DTYPES = {name: np.dtype(name if name in ("u1", "b1") else "<" + name) for name in _ALLOWED_DTYPES}


def decode_array(obj: Any, field: str = "array") -> np.ndarray:
    """Inverse of encode_array; raise ProtocolError(bad_field) on anything malformed."""
    if not isinstance(obj, dict) or not obj.get("__nd__"):
        raise ProtocolError(E_BAD_FIELD, f"{field}: expected an encoded array")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in _ALLOWED_DTYPES:
        raise ProtocolError(E_BAD_FIELD, f"{field}: unsupported dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 4
            or not all(isinstance(d, int) and 0 <= d <= 1 << 20 for d in shape)):
        raise ProtocolError(E_BAD_FIELD, f"{field}: bad shape {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(E_BAD_FIELD, f"{field}: data must be bytes")
    dt = _DTYPES[dtype]
    if len(data) != dt.itemsize * math.prod(shape):
        raise ProtocolError(E_BAD_FIELD, f"{field}: {len(data)} bytes do not match {dtype}{shape}")
    array = np.frombuffer(data, dtype=dt)
    return array if len(shape) == 1 else array.reshape(shape)  # 1-D (a reply's probabilities) needs none


# ------------------------------------------------------------------- requests

FEATURE_FIELDS = ("input_ids", "input_mask", "segment_ids")


# Longest deadline a request may carry (a day), so a typo cannot pin a request in the queue.
MAX_DEADLINE_MS = 86_400_000.0
MAX_TIMEOUT_S = MAX_DEADLINE_MS / 1000.0  # the longest timeout or wait any component takes: a day


def check_timeout(name: str, value: Any) -> None:
    """ConfigError unless ``value`` is a number of seconds in (0, MAX_TIMEOUT_S]: not NaN (a wait
    bounded by it would never end), not inf nor huge (threading and queue waits overflow on those)."""
    # numbers.Real, not (int, float): a NumPy scalar (np.float32(0.5), an np.int64 from a config
    # array) is a number of seconds as good as any; bool is not one.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"{name} must be > 0 and at most {MAX_TIMEOUT_S:g} s (a day), got {value!r}")


def text_request(request_id: Any, text_a: str, text_b: str, deadline_ms: float | None = None) -> bytes:
    """Body of a text-pair REQUEST; ``deadline_ms``: time left to its deadline (None: no deadline)."""
    return pack(_with_deadline({"id": request_id, "text_a": text_a, "text_b": text_b}, deadline_ms))


def features_request(request_id: Any, input_ids: np.ndarray, input_mask: np.ndarray,
                     segment_ids: np.ndarray, deadline_ms: float | None = None) -> bytes:
    """Body of a pre-tokenized REQUEST; each array is [S] int32."""
    return pack(_with_deadline({"id": request_id,
                                "input_ids": encode_array(np.asarray(input_ids, np.int32)),
                                "input_mask": encode_array(np.asarray(input_mask, np.int32)),
                                "segment_ids": encode_array(np.asarray(segment_ids, np.int32))},
                               deadline_ms))


def _with_deadline(body: dict[str, Any], deadline_ms: float | None) -> dict[str, Any]:
    if deadline_ms is not None:
        body["deadline_ms"] = float(deadline_ms)
    return body


def parse_deadline_ms(body: dict[str, Any]) -> float | None:
    """A REQUEST body's ``deadline_ms`` (None when absent); ProtocolError(bad_field) unless it is a
    number in (0, MAX_DEADLINE_MS]."""
    value = body.get("deadline_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE_MS:
        raise ProtocolError(E_BAD_FIELD, f"deadline_ms: must be a number of milliseconds in "
                                         f"(0, {MAX_DEADLINE_MS:.0f}], got {value!r}")
    return float(value)


def heartbeat_body(incarnation: str | None = None) -> bytes:
    """Body of a HEARTBEAT, on either link and in either direction; ``incarnation``: a worker's beat
    from a socket other than its registration's names the registration it is for."""
    return pack({} if incarnation is None else {"incarnation": incarnation})


def beat_incarnation(raw_body: bytes) -> str | None:
    """The incarnation a worker's raw HEARTBEAT body names (None: none, or not a valid body)."""
    try:
        return _name(unpack(raw_body), "incarnation")
    except ProtocolError:
        return None


def check_id(body: dict[str, Any]) -> Any:
    """The request id, a str or int; ProtocolError(bad_field) if it is missing or of another type."""
    rid = body.get("id")
    if rid is None or isinstance(rid, bool):
        raise ProtocolError(E_BAD_FIELD, "id: missing (need a str or int)")
    if isinstance(rid, int):
        if not -(1 << 63) <= rid < (1 << 64):
            raise ProtocolError(E_BAD_FIELD, "id: integer out of range")
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_ID_LEN:
        return rid
    raise ProtocolError(E_BAD_FIELD, f"id: must be a str (<= {MAX_ID_LEN} chars) or int")


def parse_request(body: dict[str, Any], seq_length: int) -> tuple[str, Any]:
    """Validate a REQUEST body.

    Returns ``("text", (text_a, text_b))`` or ``("features", (ids, mask, segs))``
    with int32 arrays of shape [seq_length]. Raises ProtocolError/InputError
    (with a stable code) on anything else.
    """
    if "text_a" in body or "text_b" in body:
        return "text", (_check_text(body, "text_a"), _check_text(body, "text_b"))
    if all(f in body for f in FEATURE_FIELDS):
        arrays = tuple(_check_feature(body, f, seq_length) for f in FEATURE_FIELDS)
        return "features", arrays
    raise ProtocolError(E_BAD_FIELD, "request needs text_a and text_b, or input_ids, input_mask "
                                     "and segment_ids")


def check_text_arg(field: str, text: Any) -> str:
    """A text a client may put in a request: a ``str`` (TypeError otherwise) of at most MAX_TEXT_CHARS
    that UTF-8 can encode (InputError bad_text otherwise: a lone surrogate, e.g. from
    ``errors="surrogateescape"``, cannot travel). Whether it is empty is the server's to judge."""
    if not isinstance(text, str):
        raise TypeError(f"{field} must be str, got {type(text).__name__}")
    _check_length(field, text)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(E_BAD_TEXT, f"{field}: not encodable as UTF-8 ({exc.reason} at "
                                         f"character {exc.start})") from None
    return text


def check_feature_arg(field: str, values: Any) -> np.ndarray:
    """A feature row a client may send, as int32 [S]: integer values (any integer dtype, or a list of
    ints) that int32 holds, one dimension, S <= MAX_FEATURE_LEN; InputError bad_field otherwise
    (never a silent cast: 2**32 + id or 0.9 + id must not become id)."""
    array = np.asarray(values)
    # The shape first: an empty list is float64 to NumPy, and "integer values required" misled.
    if array.ndim != 1 or not 0 < array.size <= MAX_FEATURE_LEN:
        raise InputError(E_BAD_FIELD, f"{field}: shape {list(array.shape)}, expected [S] with "
                                      f"1 <= S <= {MAX_FEATURE_LEN}")
    if array.dtype.kind not in "iub":
        raise InputError(E_BAD_FIELD, f"{field}: integer values required, got {array.dtype}")
    if not fits_int32(array):
        raise InputError(E_BAD_FIELD, f"{field}: values outside int32")
    return array.astype(np.int32)


def _check_text(body: dict[str, Any], field: str) -> str:
    text = body.get(field)
    if isinstance(text, bytes):
        # Text is a msgpack str: what the client refuses (TypeError: bytes are not a str) the server
        # refuses too, with the code a bin that is not UTF-8 always got (so valid UTF-8 no longer
        # passes on one side only).
        raise InputError(E_BAD_TEXT, f"{field}: msgpack bin, not UTF-8 text; send text as a msgpack str")
    if not isinstance(text, str):
        raise ProtocolError(E_BAD_FIELD, f"{field}: missing or not a string")
    if not text.strip():
        raise InputError(E_BAD_TEXT, f"{field}: empty text")
    _check_length(field, text)
    return text


def _check_length(field: str, text: str) -> None:
    """InputError bad_text for a text over MAX_TEXT_CHARS (checked by the client before sending, and by
    the worker, for senders that are not our client)."""
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(E_BAD_TEXT, f"{field}: {len(text)} characters, more than {MAX_TEXT_CHARS}")


def _check_feature(body: dict[str, Any], field: str, seq_length: int) -> np.ndarray:
    array = decode_array(body[field], field)
    if array.shape != (seq_length,):
        raise ProtocolError(E_BAD_FIELD, f"{field}: shape {list(array.shape)}, expected [{seq_length}]")
    if array.dtype.kind not in "iu":
        raise ProtocolError(E_BAD_FIELD, f"{field}: integer dtype required, got {array.dtype}")
    return array.astype(np.int32)


# -------------------------------------------------------------------- replies

def reply_body(request_id: Any, probabilities: np.ndarray, timings: dict[str, float]) -> bytes:
    """Body of a REPLY: label is the argmax of probabilities (float32 [2])."""
    return reply_bodies([request_id], [np.asarray(probabilities, dtype=np.float32).tolist()], [timings])[0]


@functools.lru_cache(maxsize=8)
def _f4_row(width: int) -> Callable[..., bytes]:
    """Packs ``width`` floats as little-endian float32, encode_array's layout of a float32 row."""
    return struct.Struct(f"<{width}f").pack


def reply_bodies(request_ids: list[Any], rows: list[list[float]], timings: list[dict[str, float]]) -> list[bytes]:
    """REPLY bodies for a batch: one per row of probabilities (``rows``: B lists of float32 values, a
    float32 [B, 2] array's ``tolist()``), each row an array in encode_array's layout, labelled with
    its argmax (the first of equal maxima). Plain Python on purpose: on a lone request's path each
    numpy call costs 5-20 us, its code long gone from the CPU's caches."""
    pack_row = _f4_row(len(rows[0]) if rows else 0)
    packb = msgpack.Packer(use_bin_type=True).pack
    return [packb({"id": rid, "label": row.index(max(row)),
                   "probabilities": {"__nd__": True, "dtype": "f4", "shape": [len(row)], "data": pack_row(*row)},
                   "timings": t})
            for rid, row, t in zip(request_ids, rows, timings)]


def error_body(request_id: Any, code: str, message: str) -> bytes:
    """Body of an ERROR reply."""
    return pack({"id": request_id, "code": code, "message": message})


def busy_body(request_id: Any, message: str) -> bytes:
    """Body of a BUSY reply."""
    return pack({"id": request_id, "message": message})


def stats_request(request_id: Any) -> bytes:
    """Body of a client's STATS request."""
    return pack({"id": request_id})


def parse_stats_request(data: bytes) -> Any:
    """The id of a raw STATS request body; ProtocolError when it has no valid id."""
    return check_id(unpack(data))


def stats_reply(request_id: Any, stats: dict[str, Any]) -> bytes:
    """Body of the broker's STATS reply to the STATS request ``request_id``."""
    return pack({"id": request_id, "stats": stats})


def peek_error_code(data: bytes) -> str | None:
    """Best-effort ``code`` of a raw ERROR body; None if unreadable."""
    try:
        code = unpack(data).get("code")
    except ProtocolError:
        return None
    return code if isinstance(code, str) else None


def peek_id(data: bytes) -> Any:
    """Best-effort request id of a raw body, for error replies; None if unreadable. A str id over
    MAX_ID_LEN comes back cut to MAX_ID_LEN characters plus "…": an ERROR echoed a 10,000-character
    id in full, and the marker keeps the cut one from equalling any valid id another request has."""
    try:
        rid = unpack(data).get("id")
    except ProtocolError:
        return None
    if isinstance(rid, str) and len(rid) > MAX_ID_LEN:
        return rid[:MAX_ID_LEN] + "…"
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


# ------------------------------------------------------- replies, client side

_MISSING = object()


def _field(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any = _MISSING) -> Any:
    """``body[name]`` if it has one of ``types`` (never bool for int), else ProtocolError(bad_field)."""
    value = body.get(name, default)
    if value is _MISSING or isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ProtocolError(E_BAD_FIELD, f"{name}: missing or not {' or '.join(t.__name__ for t in types)}")
    return value


_NUMBERS = frozenset((int, float))  # a timing's types (bool, an int subclass, is none)


def split_reply(frames: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """A broker-to-client message ``[VERSION, kind, body]`` as (kind, body map); ProtocolError otherwise."""
    if len(frames) != 3:
        raise ProtocolError(E_BAD_FRAMES, f"reply of {len(frames)} frames, expected [version, kind, body]")
    if frames[0] != VERSION:
        raise ProtocolError(E_BAD_VERSION, f"reply in protocol {frames[0][:16]!r}, expected {VERSION!r}")
    return frames[1], unpack(frames[2])


def parse_prediction(body: dict[str, Any]) -> tuple[int, np.ndarray, dict[str, float]]:
    """A REPLY body's (label, probabilities float [2], timings in ms); ProtocolError if malformed."""
    probabilities = decode_array(body.get("probabilities"), "probabilities")
    if probabilities.shape != (2,) or probabilities.dtype.kind != "f":
        raise ProtocolError(E_BAD_FIELD, f"probabilities: {probabilities.dtype}{list(probabilities.shape)}, "
                                         "expected float [2]")
    label = _field(body, "label", (int,))
    if not 0 <= label < len(probabilities):
        raise ProtocolError(E_BAD_FIELD, f"label: {label} is not 0 or 1")
    timings = _field(body, "timings", (dict,), default={})
    if not _NUMBERS.issuperset(map(type, timings.values())):  # one C pass (msgpack gives exact types)
        raise ProtocolError(E_BAD_FIELD, "timings: every value must be a number of milliseconds")
    return label, probabilities, dict(timings)


def parse_error(body: dict[str, Any]) -> tuple[str, str]:
    """An ERROR body's (code, message); ProtocolError if malformed."""
    return _field(body, "code", (str,)), _field(body, "message", (str,), default="")


def parse_busy(body: dict[str, Any]) -> str:
    """A BUSY body's message; ProtocolError if malformed."""
    return _field(body, "message", (str,), default="server busy")


def parse_stats_reply(body: dict[str, Any]) -> dict[str, Any]:
    """A STATS reply's statistics map; ProtocolError if malformed."""
    return _field(body, "stats", (dict,))


# --------------------------------------------------------- worker membership

@dataclass(frozen=True)
class Ready:
    """A decoded READY (see the module docstring for what each name is for)."""
    worker: str | None       # label for logs and stats
    slot: str | None         # supervisor slot, stable across restarts; None: never replaces anyone
    incarnation: str | None  # unique to the worker process
    pid: int | None
    capacity: int            # requests the broker may hand it at once
    backend: str | None      # what it serves (echo, tf, neuron)
    model_hash: str | None = None  # READY's model.hash (None: not sent)
    dtype: str | None = None       # READY's model.dtype
    target: str | None = None      # READY's model.target
    version: str | None = None     # the worker's bertpool version
    requests_per_message: int = 1  # most requests it takes in one REQUESTS (1: single REQUESTs only)
    batch_size: int = 1            # most requests in one of its model calls (the broker hands it that many
                                   # at a time, so a burst fills its batch instead of spreading thin)
    batch_timeout_ms: float | None = None  # how long it lets a batch fill (None: not sent)


def new_incarnation() -> str:
    """A fresh worker incarnation id: random, so no two processes on any host share one."""
    return secrets.token_hex(8)


def ready_body(worker: str, slot: str | None, incarnation: str, pid: int, capacity: int,
               backend: str, batch_size: int, model: dict[str, str] | None = None,
               version: str | None = None, requests_per_message: int = 1,
               batch_timeout_ms: float | None = None) -> bytes:
    """Body of a worker's READY; ``model``: {hash, dtype, target} (see the module docstring)."""
    body = {"worker": worker, "slot": slot, "incarnation": incarnation, "pid": pid,
            "capacity": capacity, "backend": backend, "batch_size": batch_size}
    if requests_per_message != 1:
        body["requests_per_message"] = requests_per_message
    if batch_timeout_ms is not None:
        body["batch_timeout_ms"] = batch_timeout_ms
    if model is not None:
        body["model"] = {k: model.get(k, "") for k in ("hash", "dtype", "target")}
    if version is not None:
        body["version"] = version
    return pack(body)


def parse_ready(body: dict[str, Any]) -> Ready:
    """Validate a READY body; ProtocolError(bad_field) if capacity or a name is malformed."""
    capacity = body.get("capacity")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ProtocolError(E_BAD_FIELD, f"READY capacity must be a positive int, got {capacity!r}")
    pid = body.get("pid")
    backend = body.get("backend")
    per_message = _count(body, "requests_per_message", MAX_PER_MESSAGE)
    batch_size = _count(body, "batch_size", 1 << 31)
    model = body.get("model")
    if model is None:
        model = {}
    if not isinstance(model, dict):
        raise ProtocolError(E_BAD_FIELD, "READY model must be a map {hash, dtype, target}")
    timeout_ms = body.get("batch_timeout_ms")
    if timeout_ms is not None and (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float))
                                   or not 0 <= timeout_ms < float("inf")):
        raise ProtocolError(E_BAD_FIELD, f"READY batch_timeout_ms must be a number >= 0, got {timeout_ms!r}")
    return Ready(worker=_name(body, "worker"), slot=_name(body, "slot"),
                 incarnation=_name(body, "incarnation"),
                 pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                 capacity=capacity, backend=backend[:32] if isinstance(backend, str) else None,
                 model_hash=_label(model, "hash"), dtype=_label(model, "dtype"),
                 target=_label(model, "target"), version=_label(body, "version"),
                 requests_per_message=per_message, batch_size=batch_size, batch_timeout_ms=timeout_ms)


def _count(body: dict[str, Any], field: str, most: int) -> int:
    """An optional count in [1, most] (1 when absent); ProtocolError(bad_field) if malformed."""
    value = body.get(field, 1)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ProtocolError(E_BAD_FIELD, f"READY {field} must be an int in [1, {most}], got {value!r}")
    return value


def _label(body: dict[str, Any], field: str) -> str | None:
    """An optional short string (a metric label value); ProtocolError(bad_field) if malformed."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_LEN:
        raise ProtocolError(E_BAD_FIELD, f"{field}: must be a str of at most {MAX_LABEL_LEN} characters")
    return value


def disconnect_body(worker: str, incarnation: str) -> bytes:
    """Body of a worker's DISCONNECT."""
    return pack({"worker": worker, "incarnation": incarnation})


def parse_disconnect(body: dict[str, Any]) -> str | None:
    """The incarnation a DISCONNECT names (None: the sending socket's worker)."""
    return _name(body, "incarnation")


def _name(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME_LEN:
        raise ProtocolError(E_BAD_FIELD, f"{field}: must be a str of at most {MAX_NAME_LEN} characters")
    return value


# ------------------------------------------------------- frames and decoders

DISCONNECT_UNKNOWN = "unknown_worker"   # broker -> worker DISCONNECT reasons
DISCONNECT_SHUTDOWN = "shutting_down"
_DISCONNECT_REASONS = (DISCONNECT_UNKNOWN, DISCONNECT_SHUTDOWN)
# Longest a duration frame may say (a day, as MAX_DEADLINE_MS), in microseconds.
_MAX_DURATION_US = int(MAX_DEADLINE_MS * 1000)


def _deadline_us(seconds_left: float) -> int:
    """Time left to a deadline in whole microseconds, in [1, _MAX_DURATION_US] (REQUEST's frame,
    REQUESTS' table, where 0 means none)."""
    return min(_MAX_DURATION_US, max(1, int(seconds_left * 1e6)))


def _deadline_ms(micros: int) -> float:
    """Inverse of _deadline_us, in milliseconds; ProtocolError(bad_field) outside its range."""
    if not 1 <= micros <= _MAX_DURATION_US:
        raise ProtocolError(E_BAD_FIELD, f"deadline of {micros} us, outside [1, {_MAX_DURATION_US}]")
    return micros / 1000.0


def encode_deadline(seconds_left: float | None) -> bytes:
    """The REQUEST's ``deadline`` frame: empty for none, else 8-byte big-endian microseconds (>= 1)."""
    if seconds_left is None:
        return b""
    return _deadline_us(seconds_left).to_bytes(8, "big")


def decode_deadline(frame: bytes) -> float | None:
    """Inverse of encode_deadline, in milliseconds; ProtocolError(bad_field) if malformed."""
    if frame == b"":
        return None
    if len(frame) != 8:
        raise ProtocolError(E_BAD_FIELD, f"deadline frame of {len(frame)} bytes, expected 0 or 8")
    return _deadline_ms(int.from_bytes(frame, "big"))


def request_deadline_ms(raw_body: bytes) -> float | None:
    """The ``deadline_ms`` of a raw REQUEST body (None when it has none); ProtocolError when the body
    names one that is malformed. Decodes the body only when it can hold the field, so the broker's
    request path stays decode-free for requests without a deadline."""
    if b"deadline_ms" not in raw_body:
        return None
    return parse_deadline_ms(unpack(raw_body))


@dataclass(slots=True)  # not frozen: a frozen init costs 3x, and this is per message
class FromClient:
    """A decoded client -> broker message (frontend)."""
    kind: bytes      # REQUEST, STATS or HEARTBEAT
    body: bytes      # raw: a REQUEST body travels to the worker untouched


def parse_from_client(frames: list[bytes]) -> FromClient:
    """``[VERSION, kind, body]`` (the ROUTER identity already removed) -> FromClient.

    ProtocolError with code bad_frames, bad_version or bad_kind otherwise (the
    body itself is validated by whoever reads it: STATS here, REQUEST by the worker).
    """
    if len(frames) < 2:
        raise ProtocolError(E_BAD_FRAMES, f"expected [version, kind, body], got {len(frames)} frames")
    if frames[0] != VERSION:
        raise ProtocolError(E_BAD_VERSION, f"unknown protocol version {frames[0][:16]!r}; this broker speaks "
                                           f"{VERSION.decode()}")
    if len(frames) != 3:
        raise ProtocolError(E_BAD_FRAMES, f"expected [version, kind, body], got {len(frames)} frames")
    kind = frames[1]
    if kind not in (REQUEST, STATS, HEARTBEAT):
        raise ProtocolError(E_BAD_KIND, f"clients may send REQUEST, STATS or HEARTBEAT, not {kind[:8]!r}")
    return FromClient(kind, frames[2])


@dataclass(slots=True)  # not frozen: a frozen init costs 3x, and this is per message
class FromWorker:
    """A decoded worker -> broker message (backend)."""
    kind: bytes                       # READY, REPLY, ERROR, STATS, HEARTBEAT or DISCONNECT
    token: bytes = b""                # REPLY, ERROR: the broker's handle
    body: bytes = b""                 # REPLY, ERROR: raw, forwarded to the client untouched; HEARTBEAT: raw
    replies: list[tuple[bytes, bytes, bytes]] | None = None  # REPLIES: (REPLY or ERROR, token, body) each
    ready: Ready | None = None        # READY
    stats: dict[str, int] | None = None  # STATS: the integer counters
    epoch: str | None = None          # STATS: the worker process's counter stream (None: not sent)
    histograms: dict[str, tuple[list[int], float]] | None = None  # STATS: name -> (bucket counts, sum)
    incarnation: str | None = None    # DISCONNECT: who leaves (None: the sending socket's worker)


def parse_from_worker(frames: list[bytes]) -> FromWorker:
    """A worker's message (the ROUTER identity already removed); ProtocolError if malformed."""
    if len(frames) < 3 or frames[0] != VERSION:
        raise ProtocolError(E_BAD_VERSION if frames and frames[0] != VERSION else E_BAD_FRAMES,
                            f"worker message of {len(frames)} frames, version {frames[:1]!r}")
    kind = frames[1]
    if kind in (REPLY, ERROR):
        if len(frames) != 4 or len(frames[2]) != TOKEN_BYTES:
            raise ProtocolError(E_BAD_FRAMES, f"{KIND_NAMES[kind]} needs [version, kind, token, body]")
        return FromWorker(kind, token=frames[2], body=frames[3])
    if kind == REPLIES:
        return FromWorker(kind, replies=_parse_replies(frames))
    if len(frames) != 3:
        raise ProtocolError(E_BAD_FRAMES, f"{KIND_NAMES.get(kind, kind[:8])} of {len(frames)} frames")
    if kind == HEARTBEAT:  # its body is read only when the beat is not from a registration socket
        return FromWorker(kind, body=frames[2])
    body = unpack(frames[2])
    if kind == READY:
        return FromWorker(kind, ready=parse_ready(body))
    if kind == STATS:
        counters = {k: v for k, v in body.items()
                    if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}
        bad = next((k for k, v in counters.items() if not 0 <= v < MAX_COUNT), None)
        if bad is not None:
            raise ProtocolError(E_BAD_FIELD, f"STATS counter {bad[:32]!r}: {counters[bad]} is outside [0, 2**53)")
        return FromWorker(kind, stats=counters, epoch=_label(body, "epoch"),
                          histograms=_parse_histograms(body.get("histograms")))
    if kind == DISCONNECT:
        return FromWorker(kind, incarnation=parse_disconnect(body))
    raise ProtocolError(E_BAD_KIND, f"workers may not send {kind[:8]!r}")


def _parse_histograms(value: Any) -> dict[str, tuple[list[int], float]] | None:
    """A STATS body's ``histograms`` (None when absent); ProtocolError(bad_field) if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_HISTOGRAMS:
        raise ProtocolError(E_BAD_FIELD, f"STATS histograms: must be a map of at most {MAX_HISTOGRAMS}")
    out = {}
    for name, h in value.items():
        counts = h.get("counts") if isinstance(h, dict) else None
        total = h.get("sum") if isinstance(h, dict) else None
        # Finite and below MAX_COUNT: a sum of inf (or 1e308, which doubles to inf) would stick in
        # the pool totals forever.
        if (not isinstance(name, str) or len(name) > MAX_LABEL_LEN or not isinstance(counts, list)
                or not 1 <= len(counts) <= MAX_BUCKETS
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_COUNT for c in counts)
                or isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total < MAX_COUNT):
            raise ProtocolError(E_BAD_FIELD, f"STATS histogram {str(name)[:32]!r}: need {{counts: [int in [0, 2**53)], "
                                             f"sum: number in [0, 2**53)}}, at most {MAX_BUCKETS} buckets")
        out[name] = (counts, float(total))
    return out


@dataclass(slots=True)  # not frozen: a frozen init costs 3x, and this is per message
class FromBroker:
    """A decoded broker -> worker message (backend)."""
    kind: bytes                    # REQUEST, HEARTBEAT or DISCONNECT
    token: bytes = b""             # REQUEST: the handle to answer under
    body: bytes = b""              # REQUEST: the client's body (validated by parse_request)
    queue_ms: float = 0.0          # REQUEST: time it waited in the broker's queue
    deadline_ms: float | None = None  # REQUEST: time left to its deadline when sent (None: none)
    reason: str | None = None      # DISCONNECT: DISCONNECT_UNKNOWN or DISCONNECT_SHUTDOWN
    requests: list[FromBroker] | None = None  # REQUESTS: each as a REQUEST


def parse_from_broker(frames: list[bytes]) -> FromBroker:
    """A broker's message to a worker; ProtocolError if malformed."""
    if len(frames) < 3 or frames[0] != VERSION:
        raise ProtocolError(E_BAD_VERSION if frames and frames[0] != VERSION else E_BAD_FRAMES,
                            f"broker message of {len(frames)} frames, version {frames[:1]!r}")
    kind = frames[1]
    if kind == REQUEST:
        if len(frames) != 6 or len(frames[2]) != TOKEN_BYTES or len(frames[4]) != 8:
            raise ProtocolError(E_BAD_FRAMES, "REQUEST needs [version, kind, token, body, queued, deadline]")
        return FromBroker(kind, token=frames[2], body=frames[3], queue_ms=decode_queue_time(frames[4]),
                          deadline_ms=decode_deadline(frames[5]))
    if kind == REQUESTS:
        return FromBroker(kind, requests=_parse_requests(frames))
    if len(frames) != 3:
        raise ProtocolError(E_BAD_FRAMES, f"{KIND_NAMES.get(kind, kind[:8])} of {len(frames)} frames")
    if kind == HEARTBEAT:
        return FromBroker(kind)
    if kind == DISCONNECT:
        reason = unpack(frames[2]).get("reason")
        return FromBroker(kind, reason=reason if reason in _DISCONNECT_REASONS else DISCONNECT_UNKNOWN)
    raise ProtocolError(E_BAD_KIND, f"brokers may not send workers {kind[:8]!r}")


# Encoders for every backend message, so no role builds frames by hand.

def request_frames(token: bytes, body: bytes, queued_s: float, deadline_left_s: float | None) -> list[bytes]:
    """Broker -> worker REQUEST."""
    return [VERSION, REQUEST, token, body, encode_queue_time(queued_s), encode_deadline(deadline_left_s)]


# REQUESTS and REPLIES tables: one fixed-size big-endian record per request or answer.
_REQUEST_ENTRY = struct.Struct(">8sQQI")  # token, queued us, deadline us (0: none), body length
_REPLY_ENTRY = struct.Struct(">8scI")     # token, kind (REPLY or ERROR), body length


def requests_frames(requests: list[tuple[bytes, bytes, float, float | None]]) -> list[bytes]:
    """Broker -> worker REQUESTS: ``(token, body, queued_s, deadline_left_s or None)`` each, in order."""
    assert 1 <= len(requests) <= MAX_PER_MESSAGE, "a REQUESTS message holds 1..MAX_PER_MESSAGE requests"
    table = b"".join([_REQUEST_ENTRY.pack(token, _queued_us(queued_s), 0 if left_s is None else _deadline_us(left_s),
                                          len(body))
                      for token, body, queued_s, left_s in requests])
    return [VERSION, REQUESTS, table, b"".join([body for _, body, _, _ in requests])]


def replies_frames(answers: list[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """Worker -> broker REPLIES: ``(REPLY or ERROR, token, body)`` each, in order."""
    assert 1 <= len(answers) <= MAX_PER_MESSAGE, "a REPLIES message holds 1..MAX_PER_MESSAGE answers"
    table = b"".join([_REPLY_ENTRY.pack(token, kind, len(body)) for kind, token, body in answers])
    return [VERSION, REPLIES, table, b"".join([body for _, _, body in answers])]


def _table(frames: list[bytes], entry: struct.Struct, name: str) -> tuple[list[tuple], bytes]:
    """The records and the bodies frame of a REQUESTS or REPLIES message; ProtocolError unless the
    table holds 1..MAX_PER_MESSAGE whole records whose body lengths add up to the bodies frame."""
    if len(frames) != 4:
        raise ProtocolError(E_BAD_FRAMES, f"{name} needs [version, kind, table, bodies], got {len(frames)} frames")
    table, bodies = frames[2], frames[3]
    count, rest = divmod(len(table), entry.size)
    if rest or not 1 <= count <= MAX_PER_MESSAGE:
        raise ProtocolError(E_BAD_FRAMES, f"{name} table of {len(table)} bytes: need 1..{MAX_PER_MESSAGE} "
                                          f"records of {entry.size} bytes")
    records = list(entry.iter_unpack(table))
    if sum(r[-1] for r in records) != len(bodies):
        raise ProtocolError(E_BAD_FRAMES, f"{name} body lengths do not add up to the {len(bodies)}-byte bodies frame")
    return records, bodies


def _parse_requests(frames: list[bytes]) -> list[FromBroker]:
    records, bodies = _table(frames, _REQUEST_ENTRY, "REQUESTS")
    out, start = [], 0
    for token, queued_us, deadline_us, length in records:
        out.append(FromBroker(REQUEST, token=token, body=bodies[start:start + length], queue_ms=queued_us / 1000.0,
                              deadline_ms=_deadline_ms(deadline_us) if deadline_us else None))
        start += length
    return out


def _parse_replies(frames: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    records, bodies = _table(frames, _REPLY_ENTRY, "REPLIES")
    out, start = [], 0
    for token, kind, length in records:
        if kind != REPLY and kind != ERROR:
            raise ProtocolError(E_BAD_KIND, f"REPLIES may hold REPLY and ERROR answers, not {kind!r}")
        out.append((kind, token, bodies[start:start + length]))
        start += length
    return out


def heartbeat_frames(incarnation: str | None = None) -> list[bytes]:
    """HEARTBEAT on the backend, either direction (``incarnation``: see :func:`heartbeat_body`)."""
    return [VERSION, HEARTBEAT, heartbeat_body(incarnation)]


def broker_disconnect_frames(reason: str) -> list[bytes]:
    """Broker -> worker DISCONNECT: re-register (reason: DISCONNECT_UNKNOWN or DISCONNECT_SHUTDOWN)."""
    return [VERSION, DISCONNECT, pack({"reason": reason})]


def reply_frames(token: bytes, body: bytes) -> list[bytes]:
    """Worker -> broker REPLY (body: reply_body)."""
    return [VERSION, REPLY, token, body]


def error_frames(token: bytes, body: bytes) -> list[bytes]:
    """Worker -> broker ERROR (body: error_body)."""
    return [VERSION, ERROR, token, body]


def ready_frames(worker: str, slot: str | None, incarnation: str, pid: int, capacity: int,
                 backend: str, batch_size: int, model: dict[str, str] | None = None,
                 version: str | None = None, requests_per_message: int = 1,
                 batch_timeout_ms: float | None = None) -> list[bytes]:
    """Worker -> broker READY."""
    return [VERSION, READY, ready_body(worker, slot, incarnation, pid, capacity, backend, batch_size,
                                       model, version, requests_per_message, batch_timeout_ms)]


def stats_frames(counters: dict[str, int], epoch: str | None = None,
                 histograms: dict[str, dict[str, Any]] | None = None) -> list[bytes]:
    """Worker -> broker STATS (cumulative integer counters; optional epoch and histograms)."""
    body: dict[str, Any] = dict(counters)
    if epoch is not None:
        body["epoch"] = epoch
    if histograms is not None:
        body["histograms"] = histograms
    return [VERSION, STATS, pack(body)]


def worker_disconnect_frames(worker: str, incarnation: str) -> list[bytes]:
    """Worker -> broker DISCONNECT."""
    return [VERSION, DISCONNECT, disconnect_body(worker, incarnation)]
