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
default timeout (``ClientConfig.timeout_s``).
"""

from __future__ import annotations

import heapq
import itertools
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
from ..common.errors import (BertpoolError, ClientClosed, ConfigError, ProtocolError, RemoteError,
                             RequestTimeout, ServerBusy)


@dataclass(frozen=True)
class ClientConfig:
    address: str = "tcp://127.0.0.1:5555"  # the broker's client endpoint
    timeout_s: float = 30.0                # default deadline of every request
    max_in_flight: int = 64                # predict_many keeps at most this many pending

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


class Client:
    """A thread-safe connection to a bertpool broker (see module docstring)."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout_s: float = 30.0,
                 max_in_flight: int = 64, context: zmq.Context | None = None) -> None:
        self.config = ClientConfig(address, timeout_s, max_in_flight)
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count()
        self._seq = itertools.count()  # tie-breaker for the deadline heap
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://bertpool-client-{uuid.uuid4().hex}"
        self._wake_lock = threading.Lock()
        self._closed = threading.Event()
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(self._wake_addr)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(self._wake_addr)
        self._sock = self._ctx.socket(zmq.DEALER)
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
        return self._send(None, P.pack({}), timeout_s, kind=P.STATS).result()

    def close(self) -> None:
        """Stop the I/O thread; pending requests fail with ClientClosed. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
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
        if self._closed.is_set() or not self._thread.is_alive():
            raise ClientClosed("client is closed")
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout}")
        future: Future = Future()
        self._outbox.put((rid, kind, body, _Pending(future, time.monotonic() + timeout)))
        self._wake()
        return future

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_send.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already pending; one is enough

    def _close_sockets(self) -> None:
        for sock in (self._sock, self._wake_send, self._wake_recv):
            sock.close(linger=0)

    def _io_loop(self) -> None:
        pending: dict[Any, _Pending] = {}       # request id -> its future
        stats_waiters: list[_Pending] = []      # STATS replies carry no id: FIFO
        deadlines: list[tuple[float, int, Any]] = []  # heap of (deadline, seq, id) for pending
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                soonest = [t for t in (deadlines[0][0] if deadlines else None,
                                       stats_waiters[0].deadline if stats_waiters else None) if t]
                wait_ms = max(0, int((min(soonest) - time.monotonic()) * 1000) + 1) if soonest else None
                events = dict(poller.poll(wait_ms))
                if self._wake_recv in events:
                    while self._wake_recv.poll(0):
                        self._wake_recv.recv()
                    self._flush_outbox(pending, stats_waiters, deadlines)
                if self._sock in events:
                    self._read_replies(pending, stats_waiters)
                self._expire(pending, stats_waiters, deadlines)
        finally:
            self._flush_outbox(pending, stats_waiters, deadlines, sending=False)
            for p in itertools.chain(pending.values(), stats_waiters):
                _fail(p.future, ClientClosed("client closed before the reply arrived"))

    def _flush_outbox(self, pending: dict, stats_waiters: list, deadlines: list,
                      sending: bool = True) -> None:
        while True:
            try:
                rid, kind, body, entry = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not sending:
                _fail(entry.future, ClientClosed("client closed before the request was sent"))
                continue
            if kind == P.STATS:
                stats_waiters.append(entry)
            else:
                pending[rid] = entry
                heapq.heappush(deadlines, (entry.deadline, next(self._seq), rid))
            self._sock.send_multipart([P.VERSION, kind, body])

    def _read_replies(self, pending: dict, stats_waiters: list) -> None:
        for _ in range(1024):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_reply(frames, pending, stats_waiters)
            except ProtocolError:
                continue  # a malformed reply matches no request; the request times out

    def _on_reply(self, frames: list[bytes], pending: dict, stats_waiters: list) -> None:
        if len(frames) != 3 or frames[0] != P.VERSION:
            raise ProtocolError(P.E_BAD_FRAMES, "malformed reply")
        kind, body = frames[1], P.unpack(frames[2])
        if kind == P.STATS:
            if stats_waiters:
                _resolve(stats_waiters.pop(0).future, body)
            return
        entry = pending.pop(body.get("id"), None)
        if entry is None:
            return  # a late reply to a request that already timed out
        if kind == P.REPLY:
            _resolve(entry.future, Prediction(
                id=body["id"], label=int(body["label"]),
                probabilities=P.decode_array(body["probabilities"], "probabilities"),
                timings=dict(body.get("timings") or {})))
        elif kind == P.BUSY:
            _fail(entry.future, ServerBusy(str(body.get("message", "server busy"))))
        else:
            _fail(entry.future, RemoteError(str(body.get("code", "unknown")), str(body.get("message", ""))))

    @staticmethod
    def _expire(pending: dict, stats_waiters: list, deadlines: list) -> None:
        now = time.monotonic()
        while deadlines and deadlines[0][0] <= now:
            _, _, rid = heapq.heappop(deadlines)
            entry = pending.pop(rid, None)  # None: it was answered already
            if entry is not None:
                _fail(entry.future, RequestTimeout(f"request {rid} got no reply in time"))
        while stats_waiters and stats_waiters[0].deadline <= now:
            _fail(stats_waiters.pop(0).future, RequestTimeout("stats request got no reply in time"))


def _resolve(future: Future, value: Any) -> None:
    if future.set_running_or_notify_cancel():
        future.set_result(value)


def _fail(future: Future, error: BertpoolError) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)
