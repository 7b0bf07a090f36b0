"""The bertpool client library.

    with Client("tcp://127.0.0.1:5555") as client:
        result = client.predict("The cat sat.", "A cat was sitting.")
        print(result.label, result.probabilities, result.timings)
        results = client.predict_many(pairs)          # many requests in flight
        future = client.submit("a", "b")              # concurrent.futures.Future

Thread safety: a Client may be shared by any number of threads. One
background I/O thread owns the ZeroMQ DEALER socket (ZeroMQ sockets must not
be shared between threads); callers hand it requests through a thread-safe
queue and an inproc wake-up pipe, and it completes each request's Future
when the reply, an ERROR/BUSY, or the deadline comes. Every call has a finite
default timeout (``ClientConfig.timeout_s``). Every request settles: a reply
that names it but cannot be decoded fails it with MalformedReply (a
RemoteError); a reply that names no pending request is counted in
``Client.counters`` and dropped; close() fails what is left with ClientClosed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zmq

from ..common import protocol as P
from ..common import security
from ..common.errors import (BertpoolError, ClientClosed, ConfigError, MalformedReply, ProtocolError,
                             RemoteError, RequestTimeout, ServerBusy)

log = logging.getLogger("bertpool.client")


@dataclass(frozen=True)
class ClientConfig:
    address: str = "tcp://127.0.0.1:5555"  # the broker's client endpoint
    timeout_s: float = 30.0                # default deadline of every request
    max_in_flight: int = 64                # predict_many keeps at most this many pending
    curve: security.CurveClientConfig | None = None  # CURVE keys (files or loaded); None = plain text

    def __post_init__(self) -> None:
        P.check_endpoint("address", self.address)
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {self.max_in_flight}")


@dataclass(frozen=True)
class Prediction:
    """One answer: ``label`` 1 = paraphrase; ``probabilities`` float32 [2];
    ``timings`` server-side milliseconds (queue_ms, batch_wait_ms, compute_ms, ...)."""
    id: Any
    label: int
    probabilities: np.ndarray
    timings: dict[str, float]


@dataclass
class _Pending:
    future: Future
    deadline: float
    kind: bytes  # what was asked: REQUEST or STATS


@dataclass
class ClientCounters:
    """Replies the I/O thread dropped (it alone writes these; read them from any thread)."""
    late_replies: int = 0       # well-formed, but named no pending request (e.g. after its deadline)
    malformed_replies: int = 0  # named no readable request id, so no request could be settled


class Client:
    """A thread-safe connection to a bertpool broker (see module docstring)."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_s: float = 30.0,
                 max_in_flight: int = 64, context: zmq.Context | None = None,
                 curve: security.CurveClientConfig | None = None) -> None:
        self.config = ClientConfig(address, timeout_s, max_in_flight, curve)
        self.counters = ClientCounters()
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count()
        self._seq = itertools.count()  # tie-breaker for the deadline heap
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://bertpool-client-{uuid.uuid4().hex}"
        # Guards _closed, the outbox puts and the wake-up socket: once _closed is set under it,
        # no request can enter the outbox, so the I/O thread's last drain fails every one left.
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets_closed = False
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(self._wake_addr)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(self._wake_addr)
        self._sock = self._ctx.socket(zmq.DEALER)
        security.apply_client(self._sock, self.config.curve)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ConfigError(f"cannot connect to {address}: {exc}") from exc
        self._thread = threading.Thread(target=self._io_loop, name="bertpool-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def submit(self, text_a: str, text_b: str, timeout_s: float | None = None) -> Future:
        """Send one text pair; the Future resolves to a Prediction or raises a RequestError."""
        if not isinstance(text_a, str) or not isinstance(text_b, str):
            raise TypeError("text_a and text_b must be str")
        rid = self._new_id()
        return self._send(rid, P.text_request(rid, text_a, text_b), timeout_s)

    def submit_features(self, input_ids, input_mask, segment_ids,
                        timeout_s: float | None = None) -> Future:
        """Send pre-tokenized features (each [S] ints); the Future resolves to a Prediction."""
        rid = self._new_id()
        return self._send(rid, P.features_request(rid, input_ids, input_mask, segment_ids), timeout_s)

    def predict(self, text_a: str, text_b: str, timeout_s: float | None = None) -> Prediction:
        """Classify one pair, blocking; raises RequestTimeout, ServerBusy or RemoteError."""
        return self.submit(text_a, text_b, timeout_s).result()

    def predict_many(self, pairs: Iterable[tuple[str, str]], timeout_s: float | None = None,
                     max_in_flight: int | None = None) -> list[Prediction]:
        """Classify many pairs, keeping up to ``max_in_flight`` in flight; results in input order.

        Raises the first failure in input order (a RequestError); requests
        already sent still settle in the background and are then dropped.
        """
        window = max_in_flight or self.config.max_in_flight
        futures: list[Future] = []
        for a, b in pairs:
            if len(futures) >= window:
                futures[len(futures) - window].exception()  # wait for the oldest in the window
            futures.append(self.submit(a, b, timeout_s))
        return [f.result() for f in futures]

    def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The broker's pool statistics (counters, queue, per-worker STATS)."""
        rid = self._new_id()
        return self._send(rid, P.stats_request(rid), timeout_s, kind=P.STATS).result()

    def close(self) -> None:
        """Stop the I/O thread; pending requests fail with ClientClosed. Idempotent, thread-safe.

        A submit() racing with close() either raises ClientClosed or returns a
        Future that settles (with ClientClosed if it was not answered).
        """
        with self._lock:
            self._closed.set()
            self._wake_locked()
        self._thread.join()
        self._close_sockets()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def _send(self, rid: Any, body: bytes, timeout_s: float | None, kind: bytes = P.REQUEST) -> Future:
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout}")
        future: Future = Future()
        entry = _Pending(future, time.monotonic() + timeout, kind)
        with self._lock:
            if self._closed.is_set():
                raise ClientClosed("client is closed")
            self._outbox.put((rid, body, entry))
            self._wake_locked()
        return future

    def _wake_locked(self) -> None:
        """Nudge the I/O thread (caller holds _lock, which also keeps the socket open)."""
        if self._sockets_closed:
            return
        try:
            self._wake_send.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending; one is enough

    def _close_sockets(self) -> None:
        with self._lock:
            if not self._sockets_closed:
                self._sockets_closed = True
                for sock in (self._sock, self._wake_send, self._wake_recv):
                    sock.close(linger=0)

    def _io_loop(self) -> None:
        pending: dict[Any, _Pending] = {}             # request id -> its future (REQUEST and STATS)
        deadlines: list[tuple[float, int, Any]] = []  # heap of (deadline, seq, id) for pending
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                wait_ms = max(0, int((deadlines[0][0] - time.monotonic()) * 1000) + 1) if deadlines else None
                events = dict(poller.poll(wait_ms))
                if self._wake_recv in events:
                    while self._wake_recv.poll(0):
                        self._wake_recv.recv()
                    self._flush_outbox(pending, deadlines)
                if self._sock in events:
                    self._read_replies(pending)
                self._expire(pending, deadlines)
        finally:
            with self._lock:
                self._closed.set()  # from here on submit() refuses, so the drain below is the last
            self._fail_unsent()
            for entry in pending.values():
                _fail(entry.future, ClientClosed("client closed before the reply arrived"))

    def _flush_outbox(self, pending: dict, deadlines: list) -> None:
        while True:
            try:
                rid, body, entry = self._outbox.get_nowait()
            except queue.Empty:
                return
            pending[rid] = entry
            heapq.heappush(deadlines, (entry.deadline, next(self._seq), rid))
            try:
                self._sock.send_multipart([P.VERSION, entry.kind, body], zmq.NOBLOCK)
            except zmq.Again:
                # No peer can take it: the broker refused our CURVE handshake (libzmq does not
                # retry that) or the send queue is full. Blocking here would hang every request;
                # this one fails at its deadline instead (RequestTimeout), like a lost one.
                pass

    def _fail_unsent(self) -> None:
        while True:
            try:
                _, _, entry = self._outbox.get_nowait()
            except queue.Empty:
                return
            _fail(entry.future, ClientClosed("client closed before the request was sent"))

    def _read_replies(self, pending: dict) -> None:
        for _ in range(1024):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_reply(frames, pending)

    def _on_reply(self, frames: list[bytes], pending: dict) -> None:
        """Settle the request the reply names; count and drop a reply that names none."""
        try:
            kind, body = P.split_reply(frames)
            rid = P.check_id(body)
        except ProtocolError as exc:
            self.counters.malformed_replies += 1
            log.warning("dropping a reply that names no request: %s", exc)
            return
        entry = pending.pop(rid, None)
        if entry is None:
            self.counters.late_replies += 1  # its request timed out already
            return
        try:
            _settle(entry, kind, rid, body)
        except ProtocolError as exc:
            error = MalformedReply(exc.code, f"undecodable {P.KIND_NAMES.get(kind, kind[:8])} reply to "
                                             f"{rid}: {exc.message}")
            error.__cause__ = exc
            _fail(entry.future, error)

    @staticmethod
    def _expire(pending: dict, deadlines: list) -> None:
        now = time.monotonic()
        while deadlines and deadlines[0][0] <= now:
            _, _, rid = heapq.heappop(deadlines)
            entry = pending.pop(rid, None)  # None: it was answered already
            if entry is not None:
                what = "stats request" if entry.kind == P.STATS else "request"
                _fail(entry.future, RequestTimeout(f"{what} {rid} got no reply in time"))


def _settle(entry: _Pending, kind: bytes, rid: Any, body: dict[str, Any]) -> None:
    """Complete ``entry`` from its reply; ProtocolError if the reply is malformed or does not fit."""
    if kind == P.REPLY and entry.kind == P.REQUEST:
        label, probabilities, timings = P.parse_prediction(body)
        _resolve(entry.future, Prediction(rid, label, probabilities, timings))
    elif kind == P.STATS and entry.kind == P.STATS:
        _resolve(entry.future, P.parse_stats_reply(body))
    elif kind == P.BUSY:
        _fail(entry.future, ServerBusy(P.parse_busy(body)))
    elif kind == P.ERROR:
        _fail(entry.future, RemoteError(*P.parse_error(body)))
    else:
        raise ProtocolError(P.E_BAD_KIND, f"a {P.KIND_NAMES.get(kind, repr(kind[:8]))} reply does not answer "
                                          f"a {P.KIND_NAMES[entry.kind]}")


def _resolve(future: Future, value: Any) -> None:
    if future.set_running_or_notify_cancel():
        future.set_result(value)


def _fail(future: Future, error: BertpoolError) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)
