"""The bertpool client library.

    with Client("tcp://127.0.0.1:5555") as client:
        result = client.predict("The cat sat.", "A cat was sitting.")
        print(result.label, result.probabilities, result.timings)
        results = client.predict_many(pairs)          # many requests in flight
        future = client.submit("a", "b")              # concurrent.futures.Future
        # in a coroutine: await asyncio.wrap_future(client.submit("a", "b"))  (predict() would block the loop)

Thread safety: a Client may be shared by any number of threads. ZeroMQ
sockets must not be used by two threads at once, so one thread at a time
"drives" the DEALER (sends, reads replies, runs the timers: deadlines,
backoffs, heartbeats, reconnects) for every request of the client, holding a
lock while it does:
- A blocking call (predict, stats) that finds nobody driving drives itself:
  it sends its request and waits on the socket on its own thread until its
  answer comes, with no thread handoff (the low-latency path for one request
  at a time). Whatever else arrives meanwhile (other threads' replies, BUSY,
  a closed connection) it handles for everyone. With nothing else pending it
  goes shorter still: one send, one wait, one read, and no Future or timer
  pass, until anything but its answer happens (see Client._lone).
- Otherwise (someone else drives, or the call is submit(), submit_features()
  or predict_many()) the request goes through a thread-safe queue and an
  inproc wake-up pipe to whoever drives: the calling thread that drives now,
  else the background I/O thread, which drives as long as requests are
  pending and parks when none are. A driving caller that returns with others'
  requests still pending leaves them to the I/O thread.
While nobody drives (nothing pending), replies nobody waits for any more
(late, duplicate) stay queued in the socket and are read and counted by the
next driver. Futures' done-callbacks run on the thread that settles the Future:
the I/O thread or a caller blocked in predict()/stats() that drives. They may
call submit() and close(), but a blocking call (predict, predict_many, stats)
from one raises UsageError (a RuntimeError) instead of deadlocking.

Deadlines. Every request has one (``timeout_s``, default
``ClientConfig.timeout_s``) that covers all its retries. Each send carries the
time left to it as ``deadline_ms``, so the broker and worker skip a request
nobody waits for any more. When it passes, or the server answers ERROR
``deadline_exceeded``, the request fails with DeadlineExceeded (a
RequestTimeout, so also a TimeoutError).

What is retried (inference is idempotent, so a resend is safe; it keeps its id):
- BUSY (the broker's queue is full): resent after an exponential backoff with
  jitter (``backoff_initial_s`` doubling up to ``backoff_max_s``, each drawn in
  [half, all] of that), at most ``busy_retries`` times; then, or when the next
  try would come after the deadline, ServerBusy.
- A lost broker. While requests are in flight the client sends a HEARTBEAT
  after ``heartbeat_interval_s`` without any message from the broker (any
  message counts, replies included), and presumes the broker dead after
  ``heartbeat_liveness`` such silent intervals (a hung or partitioned broker);
  it also notices at once when the connection to the broker closes (a broker
  killed or restarted on the same host). Either way it closes its DEALER, opens
  a new one (a fresh identity, so it never talks to a half-dead session) and
  resends every request that was in flight, at most ``lost_retries`` times per
  request and never past its deadline; then BrokerUnavailable, whose message
  names the address (and says so when nothing ever answered there).
- ERROR ``shutting_down`` (the broker or worker is stopping, e.g. a broker
  restarted by its supervisor): resent after a backoff, counted against
  ``lost_retries`` like a lost broker (the new broker, once bound to the same
  address, gets it); then RemoteError with code ``shutting_down``.
Nothing else is retried: other ERRORs (``worker_lost`` included: the broker
already re-dispatched it as often as it allows) raise RemoteError with its
``code``.

Lifetime: close() (or ``with``) ends the I/O thread and closes the sockets; every later call
raises ClientClosed, saying why it closed (close(), or an I/O failure that was logged). A
Client dropped without close() is kept while anything it was asked is pending
(``Client(address).submit(...)`` settles), and collected, with its thread and
sockets, once nothing is. A Client cannot be pickled: each process makes its own.

Every request settles: a reply that names it but cannot be decoded fails it
with MalformedReply (a RemoteError); a reply that names no pending request
(a duplicate, one after its request settled, one for an id this client never
sent) is counted in ``Client.counters`` and dropped; close() fails what is
left with ClientClosed.
"""

from __future__ import annotations

import errno
import functools
import heapq
import itertools
import logging
import os
import queue
import random
import threading
import time
import uuid
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import zmq

from ..common import protocol as P
from ..common import security
from ..common.defaults import DEFAULT_FRONTEND
from ..common.recent import Recent
from ..common.fastzmq import (close_monitored, files_exhausted, more_waiting, open_monitor, out_of_files, recv_nowait,
                              send_nowait)
from ..common.errors import (BertpoolError, BrokerUnavailable, ClientClosed, ConfigError, DeadlineExceeded,
                             HandshakeFailed, MalformedReply, ProtocolError, RemoteError, ServerBusy, UsageError)

log = logging.getLogger("bertpool.client")

# How many settled request ids the client remembers, to tell a duplicate reply from a late one.
_REMEMBERED_IDS = 16384

# While nothing is pending, the parked I/O thread reads the link's monitor this often, so events of a
# link that flaps while the Client sits idle (a broker restarting, a balancer closing idle connections)
# do not pile up in memory for as long as it idles (see fastzmq.open_monitor).
PARKED_READ_S = 5.0

# A blocking call waiting on another thread's driving gives it this long past the request's deadline
# to settle it (its timers fire about a millisecond late) before settling it itself (see _await).
_DEADLINE_GRACE_S = 0.05

# Explaining a failure that already happened, a process within this many file descriptors of its
# limit counts as out of them: by the time it asks, its ZeroMQ I/O threads (each opens and closes a
# descriptor per connection attempt) may have freed a few (see fastzmq.out_of_files).
_FILES_HEADROOM = 16

# Plain ints: pyzmq's enum flags cost microseconds per operation on the per-request path (the
# request and reply frames go through common.fastzmq for the same reason).
_NOBLOCK = int(zmq.NOBLOCK)


@dataclass(frozen=True)
class ClientConfig:
    address: str = DEFAULT_FRONTEND        # the broker's client endpoint
    timeout_s: float = 30.0                # default deadline of every request, all its retries included
    max_in_flight: int = 64                # predict_many keeps at most this many pending
    heartbeat_interval_s: float = 1.0      # with requests in flight, ping the broker after this long unheard
    heartbeat_liveness: int = 3            # silent intervals after which the broker is presumed dead
    busy_retries: int = 3                  # resends of a request answered BUSY before ServerBusy
    lost_retries: int = 2                  # resends of a request lost with its broker (or shutting_down)
    backoff_initial_s: float = 0.05        # first backoff before a resend; doubles per retry, with jitter
    backoff_max_s: float = 1.0             # longest single backoff
    curve: security.CurveClientConfig | None = None  # CURVE keys (files or loaded); None = plain text

    def __post_init__(self) -> None:
        P.check_endpoint("address", self.address)
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s"):
            P.check_timeout(name, getattr(self, name))
        P.check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)  # as the broker's and workers'
        for name, least in (("max_in_flight", 1), ("busy_retries", 0), ("lost_retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
        if self.curve is not None and not isinstance(self.curve, security.CurveClientConfig):
            # Else an AttributeError from deep in socket setup, after the client's sockets were opened.
            raise ConfigError(f"curve must be a CurveClientConfig or None, got {type(self.curve).__name__}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                              f"({self.backoff_initial_s})")


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
    rid: Any
    future: Future | None                  # None while a blocking call answers it the short way (Client._lone)
    deadline: float                        # monotonic
    timeout_s: float                       # as asked, for messages
    kind: bytes                            # what was asked: REQUEST or STATS
    encode: Callable[[float], bytes]       # the body, given the milliseconds left to the deadline
    sends: int = 0                         # times it was sent
    busy_tries: int = 0                    # resends after BUSY
    lost_tries: int = 0                    # resends after a lost broker or shutting_down
    retry_at: float | None = None          # waiting for a backoff to end at this monotonic time
    in_flight: bool = field(default=False)  # sent on the current socket, no answer yet


@dataclass
class ClientCounters:
    """What the client did and dropped (only the thread driving the socket writes these; read them
    from any thread). Replies nobody waits for are counted when the next driver reads them."""
    late_replies: int = 0       # named a request of ours that had already settled (e.g. after its deadline)
    duplicate_replies: int = 0  # a second answer to a request that already had one
    unknown_replies: int = 0    # named an id this client never sent
    malformed_replies: int = 0  # named no readable request id, so no request could be settled
    busy_retries: int = 0       # resends after BUSY
    lost_resends: int = 0       # resends after a lost broker or shutting_down
    reconnects: int = 0         # times the DEALER was replaced because the broker was presumed dead
    heartbeats_sent: int = 0    # HEARTBEATs sent while waiting on a silent broker


class Client:
    """A thread-safe connection to a bertpool broker (see module docstring).

    ``address``, ``timeout_s`` and ``max_in_flight`` may be given by position;
    every other ClientConfig field by keyword (``heartbeat_interval_s=0.5``...).
    """

    def __init__(self, address: str = DEFAULT_FRONTEND, timeout_s: float = 30.0,
                 max_in_flight: int = 64, context: zmq.Context | None = None, **settings: Any) -> None:
        self.config = ClientConfig(address, timeout_s, max_in_flight, **settings)
        if context is not None and not isinstance(context, zmq.Context):
            raise ConfigError(f"context must be a zmq.Context or None, got {type(context).__name__}")
        self.counters = ClientCounters()
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count()
        self._seq = itertools.count()  # tie-breaker for the heaps
        self._pid = os.getpid()  # a forked child has none of our threads or sockets: it may not use us
        self._prefix = f"{self._pid}-{uuid.uuid4().hex[:8]}-"
        self._random = random.Random()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_addr = f"inproc://bertpool-client-{uuid.uuid4().hex}"
        # Guards _closed, the outbox puts, the wake-up socket and _io_wanted: once _closed is set
        # under it, no request can enter the outbox, so the I/O thread's last drain fails every one left.
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._closed_why = "close() was called"  # for ClientClosed messages; set before _closed
        # Whoever holds _drive is the one thread that may use the DEALER, the monitor and the
        # wake-up receiver and touch the request state below: the I/O thread, or a caller blocked in
        # predict()/stats() that found nobody driving (lock order: _drive, then _lock).
        self._drive = threading.Lock()
        self._driver_ident: int | None = None  # thread id of the _drive holder, for re-entry checks
        # Set (under _lock, by _want_io_locked) when the I/O thread must drive: a request came through
        # the outbox, or close(). Cleared by the I/O thread (holding _drive and _lock) when it parks with
        # nothing pending. _io_owner holds this Client for the I/O thread exactly while it is set.
        self._io_wanted = threading.Event()
        self._io_owner = _IoOwner(self)
        self._sockets_closed = False
        self._wake_recv: zmq.Socket | None = None
        self._wake_send: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        # When the broker's connection closed, while it has not come back (None: up, or never up);
        # a fresh link (_open_link) does not clear it, only a connection does.
        self._down_since: float | None = None
        try:  # each socket takes file descriptors: out of them, any of these fails (EMFILE)
            self._wake_recv = self._ctx.socket(zmq.PAIR)
            self._wake_recv.bind(self._wake_addr)
            self._wake_send = self._ctx.socket(zmq.PAIR)
            self._wake_send.connect(self._wake_addr)
            self._open_link()
        except zmq.ZMQError as exc:
            why = self._why_no_socket(exc)  # before closing ours, which frees file descriptors
            self._close_sockets()
            raise ConfigError(f"cannot connect to {address}: {why}") from exc
        # Request state (only the _drive holder touches these after start).
        self._pending: dict[Any, _Pending] = {}
        self._deadlines: list[tuple[float, int, Any]] = []  # heap of (deadline, seq, id)
        self._retries: list[tuple[float, int, Any]] = []    # heap of (retry_at, seq, id)
        self._in_flight: set[Any] = set()
        self._settled: Recent[Any, bool] = Recent(_REMEMBERED_IDS)  # id -> answered
        self._heard_at = time.monotonic()   # last message from the broker, or when waiting began
        self._pinged_at = 0.0               # last HEARTBEAT sent
        self._ever_heard = False            # any message from any broker since the client started
        self._ever_connected = False        # any connection accepted at the address since then
        self._handshake_hint: str | None = None  # the last handshake failure, final or not, until one succeeds
        self._wrong_endpoint: str | None = None  # set when the peer spoke the worker protocol (see _on_reply)
        self._poller: zmq.Poller | None = None  # over wake_recv, the DEALER and its monitor
        self._polled: zmq.Socket | None = None  # the DEALER _poller was built for (a reconnect replaces it)
        # The thread gets the owner, not self: a parked I/O thread must not keep a Client that its user
        # dropped without close() alive (with its thread and sockets) for the life of the process.
        self._thread = threading.Thread(target=_io_main, args=(self._io_owner, self._io_wanted),
                                        name="bertpool-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API

    def submit(self, text_a: str, text_b: str, timeout_s: float | None = None) -> Future:
        """Send one text pair; the Future resolves to a Prediction or raises a RequestError. A text that
        cannot travel raises at once: TypeError (not a str), InputError (too long, not UTF-8)."""
        rid, encode = self._text_request(text_a, text_b)
        return self._send(rid, encode, timeout_s)

    def submit_features(self, input_ids, input_mask, segment_ids,
                        timeout_s: float | None = None) -> Future:
        """Send pre-tokenized features (each [S] ints); the Future resolves to a Prediction. Values
        that are not int32 integers, or rows not 1-D, raise InputError at once."""
        arrays = [P.check_feature_arg(name, a) for name, a in zip(P.FEATURE_FIELDS,
                                                                   (input_ids, input_mask, segment_ids))]
        rid = self._new_id()
        return self._send(rid, functools.partial(P.features_request, rid, *arrays), timeout_s)

    def predict(self, text_a: str, text_b: str, timeout_s: float | None = None) -> Prediction:
        """Classify one pair, blocking; raises DeadlineExceeded, ServerBusy, BrokerUnavailable or RemoteError
        (and, at once, what submit() raises for a text that cannot travel)."""
        self._check_may_block("predict")
        rid, encode = self._text_request(text_a, text_b)
        return self._call(rid, encode, timeout_s)

    def predict_many(self, pairs: Iterable[tuple[str, str]], timeout_s: float | None = None,
                     max_in_flight: int | None = None) -> list[Prediction]:
        """Classify many pairs, keeping up to ``max_in_flight`` in flight; results in input order.

        Every pair is checked before any is sent: an item that is not a pair
        of two texts (a str is not a pair), or a text that cannot travel,
        raises TypeError or InputError naming its index, and nothing is sent.
        Raises the first failure in input order (a RequestError) as soon as it
        is known, sending no more; requests already sent still settle in the
        background and are then dropped.
        """
        self._check_may_block("predict_many")
        window = self.config.max_in_flight if max_in_flight is None else max_in_flight
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"max_in_flight must be an int >= 1, got {window!r}")
        checked = _check_pairs(pairs)
        futures: list[Future] = []
        for a, b in checked:
            if len(futures) >= window:
                # Wait for the oldest in the window; every older one succeeded, so a failure here is
                # the first in input order: raise it now instead of sending (and waiting out) the rest.
                futures[len(futures) - window].result()
            futures.append(self._send(*self._checked_text_request(a, b), timeout_s))
        return [f.result() for f in futures]

    def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The broker's pool statistics (counters, queue, per-worker STATS)."""
        self._check_may_block("stats")
        rid = self._new_id()
        return self._call(rid, lambda _deadline_ms: P.stats_request(rid), timeout_s, kind=P.STATS)

    def close(self) -> None:
        """Stop the I/O thread; pending requests fail with ClientClosed. Idempotent, thread-safe.

        A submit() or predict() racing with close() either raises ClientClosed
        or returns a Future/answer (a Future that settles, with ClientClosed if
        it was not answered). A predict() blocked while close() runs raises
        ClientClosed. Called from a done-callback (on the I/O thread or a
        driving caller) it returns at once; the I/O thread then fails what is
        left and closes the sockets itself.
        """
        with self._lock:
            self._closed.set()  # _closed_why stays what closed it first (close() or an I/O failure)
            self._wake_locked()
            self._want_io_locked()
        if threading.current_thread() is self._thread or threading.get_ident() == self._driver_ident:
            return  # a done-callback: joining would deadlock; _io_serve's last drain closes the sockets
        self._thread.join()
        self._close_sockets()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # Else pickle fails deep inside (a lock, a ZeroMQ socket) with a message naming neither.
        raise TypeError("a bertpool Client cannot be pickled (it owns sockets and a thread): give the other "
                        "process its address and let it create its own Client")

    def __del__(self) -> None:
        """Collected without close(). Nothing is pending then (the I/O thread holds the Client while
        anything is: see _IoOwner), except what a submit() queued just before the last reference went:
        fail that with ClientClosed, close the sockets, and let the parked I/O thread end."""
        try:
            if self._pid != os.getpid() or self._sockets_closed:
                return  # a forked child's copy shares the parent's sockets: touch nothing
            with self._lock:
                self._closed.set()
            self._fail_unsent()
            self._close_sockets()
            self._io_wanted.set()  # the I/O thread wakes, finds no owner, and ends
        except Exception:  # a constructor that failed halfway, or interpreter teardown
            pass

    # -------------------------------------------------------------- internals

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def _text_request(self, text_a: str, text_b: str) -> tuple[str, Callable[[float], bytes]]:
        """A new id and the encoder of its REQUEST body; raises at once for a text that cannot travel."""
        P.check_text_arg("text_a", text_a)
        P.check_text_arg("text_b", text_b)
        return self._checked_text_request(text_a, text_b)

    def _checked_text_request(self, text_a: str, text_b: str) -> tuple[str, Callable[[float], bytes]]:
        """A new id and the encoder of its REQUEST body, for texts already checked."""
        rid = self._new_id()
        return rid, functools.partial(P.text_request, rid, text_a, text_b)

    def _check_may_block(self, what: str) -> None:
        if threading.get_ident() == self._driver_ident or threading.current_thread() is self._thread:
            raise UsageError(f"Client.{what}() called from a Future's done-callback would wait on the "
                             "thread that delivers its reply (a deadlock); use submit() there instead")

    def _closed_message(self, when: str = "") -> str:
        """What a ClientClosed says: why the Client closed, and what to do."""
        if when:
            return f"the Client closed ({self._closed_why}) {when}"
        return (f"this Client is closed ({self._closed_why}): create a new Client (a Client cannot be "
                f"reopened)")

    def _close_for(self, why: str) -> None:
        """Mark the Client closed because of ``why`` (caller holds _lock); the first reason stays."""
        if not self._closed.is_set():
            self._closed_why = why
        self._closed.set()

    def _why_no_socket(self, exc: zmq.ZMQError) -> str:
        """Why opening a socket failed, saying what to do. EMFILE is two different limits: the
        process's open files, or the ZeroMQ context's socket count (MAX_SOCKETS, 1023 unless set),
        which many Clients sharing the default context reach long before the file limit."""
        if exc.errno != errno.EMFILE:
            return files_exhausted(exc.errno) or str(exc)
        files = out_of_files(_FILES_HEADROOM)
        if files is not None:
            return files
        try:
            limit = f"={self._ctx.get(zmq.MAX_SOCKETS)}"
        except zmq.ZMQError:
            limit = ""
        return (f"its ZeroMQ context has as many sockets as its MAX_SOCKETS{limit} allows (each Client "
                f"holds 5 until close()): close the Clients you no longer use, or share one (a Client is "
                f"thread-safe); else pass Client(context=...) a zmq.Context with a larger MAX_SOCKETS")

    def _await(self, entry: _Pending) -> Any:
        """Wait for ``entry``, which another thread drives; its result. Normally the driver settles
        it by its deadline; but while that thread runs a long done-callback no timer fires, so past
        the deadline (and a grace) this thread fails it itself: cancel() wins only over a driver that
        has not begun to settle it, whose later _resolve/_fail then do nothing."""
        try:
            return entry.future.result(max(0.0, entry.deadline - time.monotonic()) + _DEADLINE_GRACE_S)
        except FutureTimeout:  # DeadlineExceeded is a TimeoutError too: then cancel() fails, result() re-raises
            if not entry.future.cancel():
                return entry.future.result()  # being settled right now
        what = "stats request" if entry.kind == P.STATS else "request"
        raise DeadlineExceeded(f"{what} {entry.rid} got no reply within its {entry.timeout_s:g} s deadline; "
                               f"the thread that delivers this Client's replies was busy meanwhile (a "
                               f"long done-callback? keep them short: they delay every request)")

    def _entry(self, rid: Any, encode: Callable[[float], bytes], timeout_s: float | None,
               kind: bytes, future: bool = True) -> _Pending:
        if os.getpid() != self._pid:
            raise ClientClosed(f"this Client belongs to process {self._pid}; a process forked from it has "
                               "no I/O thread and shares its sockets, so it must create its own Client")
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        P.check_timeout("timeout_s", timeout)
        return _Pending(rid, Future() if future else None, time.monotonic() + timeout, timeout, kind, encode)

    def _send(self, rid: Any, encode: Callable[[float], bytes], timeout_s: float | None,
              kind: bytes = P.REQUEST) -> Future:
        """Hand a request to whoever drives the socket (through the outbox); its Future."""
        entry = self._entry(rid, encode, timeout_s, kind)
        self._enqueue(entry)
        return entry.future

    def _enqueue(self, entry: _Pending) -> None:
        with self._lock:
            if self._closed.is_set():
                raise ClientClosed(self._closed_message())
            self._outbox.put(entry)
            self._wake_locked()  # a thread driving now sends it at once
            if not self._io_wanted.is_set():
                self._want_io_locked()  # and the I/O thread drives once that one is done

    def _call(self, rid: Any, encode: Callable[[float], bytes], timeout_s: float | None,
              kind: bytes = P.REQUEST) -> Any:
        """A blocking request: sent and waited for on this thread when nobody else drives the socket
        (no thread handoff either way; the short way, _lone, when nothing else is pending either),
        else through the outbox like submit(). Its result."""
        entry = self._entry(rid, encode, timeout_s, kind, future=False)
        if not self._drive.acquire(blocking=False):
            entry.future = Future()
            self._enqueue(entry)
            return self._await(entry)
        leftover = True
        try:
            self._driver_ident = threading.get_ident()
            if self._closed.is_set():  # checked holding _drive: the I/O thread's last drain is done or to come
                raise ClientClosed(self._closed_message())
            if not self._pending and self._outbox.empty():
                try:
                    answer = self._lone(entry)
                except Exception as exc:  # a bug: as in _drive_until
                    self._failed_driving(exc)
                    raise ClientClosed(self._closed_message("while this call drove it")) from exc
                if entry.future is None:  # answered
                    leftover = False
                    return answer
            else:
                entry.future = Future()
                self._admit(entry)
            self._drive_until(entry.future)
            leftover = bool(self._pending)
        finally:
            self._driver_ident = None
            self._drive.release()
            if leftover:  # others' requests (or ours, on an exception): the I/O thread takes over
                self._want_io()
        return entry.future.result()

    def _want_io(self) -> None:
        with self._lock:
            self._want_io_locked()

    def _want_io_locked(self) -> None:
        """Ask the I/O thread to drive (caller holds _lock): it holds this Client until it parks."""
        self._io_owner.client = self
        self._io_wanted.set()

    def _drive_until(self, future: Future) -> None:
        """Serve the socket for everyone (replies, timers, the outbox) until ``future`` settles."""
        try:
            while not future.done() and not self._closed.is_set():
                self._turn(future)
        except Exception as exc:  # a bug here must not strand anyone: close, and the I/O thread fails what is left
            self._failed_driving(exc)

    def _failed_driving(self, exc: Exception) -> None:
        """A bug while a calling thread drove the socket: log it and close the Client; the I/O thread
        then fails what is left."""
        log.exception("client I/O failed on a calling thread")
        with self._lock:
            self._close_for(f"its I/O failed on a calling thread ({exc!r}; logged)")
            self._wake_locked()
            self._want_io_locked()

    def _wake_locked(self) -> None:
        """Nudge whoever drives the socket (caller holds _lock, which also keeps the socket open)."""
        if self._sockets_closed:
            return
        try:
            self._wake_send.send(b"", _NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending; one is enough

    def _close_sockets(self) -> None:
        with self._lock:
            if not self._sockets_closed:
                self._sockets_closed = True
                self._close_link()
                for sock in (self._wake_send, self._wake_recv):
                    if sock is not None:  # None: the constructor failed before opening it
                        sock.close(linger=0)

    # ---------------------------------------------------- the link to the broker

    def _open_link(self) -> None:
        """A fresh DEALER connected to the broker, with a monitor that reports a closed connection."""
        sock = self._ctx.socket(zmq.DEALER)
        security.apply_client(sock, self.config.curve)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            monitor = open_monitor(sock, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | security.HANDSHAKE_EVENTS,
                                   "bertpool-client")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._sock, self._monitor = sock, monitor
        self._handshake_error: str | None = None  # why this link's handshake failed for good (None: it did not)
        try:
            sock.connect(self.config.address)
        except zmq.ZMQError:
            self._close_link()
            raise

    def _close_link(self) -> None:
        if self._sock is not None:
            close_monitored(self._sock, self._monitor, linger_ms=0)
        self._sock = self._monitor = None

    # ------------------------------------------- driving the socket (I/O thread or caller)

    def _io_serve(self) -> bool:
        """One spell of the I/O thread (run by _io_main, which holds this Client only meanwhile): drive
        the socket until nothing is pending and park (True), or, once closed (or on a bug), fail what is
        left and close the sockets (False: the thread ends)."""
        me = threading.get_ident()
        parked = False
        try:
            if not self._closed.is_set():
                with self._drive:
                    self._driver_ident = me
                    try:
                        while not self._closed.is_set() and not (not self._pending and self._park()):
                            self._turn()
                    finally:
                        self._driver_ident = None
                parked = not self._closed.is_set()
        except Exception as exc:  # a bug here must not strand the callers: fail what is pending, loudly
            log.exception("client I/O thread failed")
            with self._lock:
                self._close_for(f"its I/O thread failed ({exc!r}; logged)")
        finally:
            if not parked:
                self._last_drain(me)
        return parked

    def _last_drain(self, me: int) -> None:
        """Close for good (on the I/O thread): fail what is queued or pending, close the sockets."""
        with self._lock:
            self._closed.set()  # from here on submit() refuses, so the drain below is the last
            self._wake_locked()  # and a calling thread that drives sees it and lets go
        with self._drive:
            self._driver_ident = me  # so close() from a done-callback below returns at once
            self._fail_unsent()
            for entry in list(self._pending.values()):
                _fail(entry.future, ClientClosed(self._closed_message("before the reply arrived")))
            self._pending.clear()
            self._close_sockets()  # close() may have come from a callback and not wait for us
            self._driver_ident = None
        self._io_owner.client = None

    def _park(self) -> bool:
        """With nothing pending: True, and the I/O thread waits for _io_wanted, unless the outbox
        had requests after all (then they are sent now, and False). Holding _drive."""
        with self._lock:  # no submit() nor close() can come between this last look and the clear
            if self._closed.is_set():
                return True  # and _io_wanted stays set, so the I/O thread goes on to its last drain
            if self._flush_outbox():
                return False
            self._io_wanted.clear()
            self._io_owner.client = None  # parked: a user who drops this Client may now lose it
            return True

    def _poll(self, timeout_ms: int | None) -> list[tuple[zmq.Socket, int]]:
        """Wait up to ``timeout_ms`` (None: for ever) for the wake-up receiver, the DEALER or its
        monitor to have something to read; those that do, with their events. Holding _drive."""
        if self._polled is not self._sock:  # first wait, or a reconnect replaced the sockets
            self._poller, self._polled = zmq.Poller(), self._sock
            for sock in (self._wake_recv, self._sock, self._monitor):
                self._poller.register(sock, zmq.POLLIN)
        return self._poller.poll(timeout_ms)

    def _turn(self, until: Future | None = None) -> None:
        """One wait for the sockets (bounded by the next timer), then everything due. Holding _drive."""
        events = dict(self._poll(self._wait_ms()))
        if self._wake_recv in events:
            while more_waiting(self._wake_recv):
                self._wake_recv.recv()
            self._flush_outbox()
        if self._sock in events:
            self._read_replies(until)
        if self._monitor in events:
            closed = self._connection_closed()
            if self._handshake_error is not None and self._in_flight:
                self._fail_handshake(self._handshake_error)
            elif closed and self._in_flight:
                self._reconnect("its connection closed")
        now = time.monotonic()
        self._resend_due(now)
        self._check_liveness(now)
        self._expire(time.monotonic())

    def _wait_ms(self) -> int | None:
        """Milliseconds until the next deadline, backoff end or liveness check (None: none)."""
        times = [heap[0][0] for heap in (self._deadlines, self._retries) if heap]
        if self._in_flight:
            times += (self._next_ping_at(), self._presumed_dead_at())
        return _ms_until(min(times)) if times else None

    def _next_ping_at(self) -> float:
        """When _check_liveness pings a broker that stays silent (while requests are in flight)."""
        return max(self._heard_at, self._pinged_at) + self.config.heartbeat_interval_s

    def _presumed_dead_at(self) -> float:
        """When _check_liveness presumes a broker that stays silent dead, once it has been pinged:
        ``liveness`` intervals of silence, and the ping unanswered for an interval."""
        interval = self.config.heartbeat_interval_s
        return max(self._heard_at + interval * self.config.heartbeat_liveness, self._pinged_at + interval)

    def _heard(self) -> None:
        """A message came from the broker: any message is a beat, even one we cannot use."""
        self._heard_at = time.monotonic()
        self._ever_heard = True

    def _flush_outbox(self) -> bool:
        """Send what submit() queued; True if there was any."""
        sent = False
        while True:
            try:
                entry = self._outbox.get_nowait()
            except queue.Empty:
                return sent
            self._admit(entry)
            sent = True

    def _lone(self, entry: _Pending) -> Any:
        """A blocking call's request while nothing else is pending (holding _drive), the short way: one
        send, one wait, one read, with no Future, deadline heap or timer pass (what one client calling
        predict() in a loop does every time). Returns its answer, or, the moment anything else happens
        (it cannot be sent now; the wait ends on a timer, another thread's request, a connection
        event; the first message is not its answer), adopts it (_adopt) and hands that on to the
        general machinery: then ``entry.future`` is set and the return value means nothing."""
        now = time.monotonic()
        left_ms = (entry.deadline - now) * 1000.0
        if self._wrong_endpoint is not None or left_ms <= 0:
            self._adopt(entry)
            self._transmit(entry, now)  # which fails it, or leaves it to _expire
            return None
        self._check_link()
        if not self._put(entry, left_ms):
            self._adopt(entry)
            self._send_later(entry, now)
            return None
        self._sent(entry, now)
        # Its only timers: the deadline, and the first ping if the broker stays silent (_check_liveness).
        wake_at = min(entry.deadline, self._next_ping_at())
        ready = self._poll(_ms_until(wake_at))
        frames = None
        if len(ready) == 1 and ready[0][0] is self._sock:
            try:
                frames = recv_nowait(self._sock)
            except zmq.Again:
                pass
            else:
                self._heard()
                answer = _answer_of(entry, frames)
                if answer is not _NO_ANSWER:
                    self._finish(entry, answered=True)
                    return answer
        self._adopt(entry)
        if frames is not None:
            self._on_reply(frames)
        return None

    def _adopt(self, entry: _Pending) -> None:
        """Make a request that _lone sent (or could not send) pending, with a Future, as _admit would
        have: from here the general machinery drives it."""
        entry.future = Future()
        self._track(entry)

    def _admit(self, entry: _Pending) -> None:
        """Make ``entry`` pending and send it (holding _drive)."""
        self._track(entry)
        self._transmit(entry, time.monotonic())

    def _track(self, entry: _Pending) -> None:
        """Make ``entry`` pending, with its deadline in the heap (holding _drive)."""
        self._pending[entry.rid] = entry
        if len(self._deadlines) > 2 * len(self._pending) + 1024:
            # Settled requests leave their deadline in the heap until it passes (it is skipped then);
            # with long timeouts those would pile up, so drop them once they outnumber the live ones.
            self._deadlines = [d for d in self._deadlines if d[2] in self._pending]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (entry.deadline, next(self._seq), entry.rid))

    def _transmit(self, entry: _Pending, now: float) -> None:
        """Send (or resend) ``entry`` with the time left to its deadline."""
        if self._wrong_endpoint is not None:  # the address is a worker endpoint: no send can be answered
            self._finish(entry, answered=False)
            _fail(entry.future, BrokerUnavailable(f"{self._wrong_endpoint} (request {entry.rid})"))
            return
        left_ms = (entry.deadline - now) * 1000.0
        if left_ms <= 0:
            return  # _expire settles it
        entry.retry_at = None
        if not self._in_flight:
            self._check_link()
        if self._put(entry, left_ms):
            self._sent(entry, now)
        else:
            self._send_later(entry, now)

    def _check_link(self) -> None:
        """Before sending with nothing in flight: read what the monitor said while nobody did, and
        replace a link whose handshake failed for good."""
        self._connection_closed()
        if self._handshake_error is not None:
            # ZeroMQ gives up on a link after some handshake failures (e.g. a security mechanism
            # mismatch): a fresh one tries again, and this request then fails, or is served.
            self._close_link()
            self._open_link()

    def _put(self, entry: _Pending, left_ms: float) -> bool:
        """Send ``entry`` with ``left_ms`` to its deadline; False if the send queue is full. Never blocks
        the driving thread: a full queue (a long-dead broker) waits and tries again (_send_later)."""
        try:
            send_nowait(self._sock, [P.VERSION, entry.kind, entry.encode(min(left_ms, P.MAX_DEADLINE_MS))])
        except zmq.Again:
            return False
        return True

    def _sent(self, entry: _Pending, now: float) -> None:
        """Count ``entry`` in flight from ``now``."""
        if not self._in_flight and self._down_since is None:
            # Silence while nothing was asked is no sign of death; a connection that closed then, and
            # has not come back, is: the broker has been silent since, and liveness counts from then.
            self._heard_at = max(self._heard_at, now)
        entry.in_flight = True
        entry.sends += 1
        self._in_flight.add(entry.rid)

    def _send_later(self, entry: _Pending, now: float) -> None:
        """Try a pending ``entry`` again after a backoff, if that comes before its deadline (else
        _expire settles it)."""
        at = now + self.config.backoff_initial_s
        if at < entry.deadline:
            entry.retry_at = at
            heapq.heappush(self._retries, (at, next(self._seq), entry.rid))

    def _fail_unsent(self) -> None:
        while True:
            try:
                entry = self._outbox.get_nowait()
            except queue.Empty:
                return
            _fail(entry.future, ClientClosed(self._closed_message("before the request was sent")))

    def _read_replies(self, until: Future | None = None) -> None:
        """Read what the broker sent (a bounded burst); a driving caller stops once ``until`` settles
        (what is left waits for the next turn, its own or the I/O thread's)."""
        sock = self._sock
        for _ in range(1024):
            try:
                frames = recv_nowait(sock)
            except zmq.Again:
                return
            self._heard()
            self._on_reply(frames)
            if until is not None and until.done():
                return
            if not more_waiting(sock):  # cheaper than a recv that raises Again
                return

    def _connection_closed(self) -> bool:
        """Drain the monitor; True if it reported the broker's connection closed. A handshake failure
        that retrying cannot help is kept in _handshake_error until a handshake succeeds (or the link
        is replaced), and any failure in _handshake_hint, for the messages of later errors."""
        closed = False
        while more_waiting(self._monitor):
            frames = self._monitor.recv_multipart()
            event, why, final = security.handshake_failure(frames[0] if frames else b"", self.config.address,
                                                           self.config.curve, "--curve-allow-clients")
            if event == zmq.EVENT_DISCONNECTED:
                closed = True
                self._down_since = self._down_since or time.monotonic()
            elif event == zmq.EVENT_CONNECTED:
                self._ever_connected = True
                self._down_since = None
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_error = self._handshake_hint = None
            elif why is not None:
                self._handshake_hint = why
                if final:
                    self._handshake_error = why
        return closed

    def _fail_handshake(self, why: str) -> None:
        """The server ended the handshake while requests were in flight: fail each of them at once
        (resending cannot help). The next request goes out on a fresh link (see _transmit), so it
        finds out anew, and is served once the configuration is mended."""
        self._fail_in_flight(HandshakeFailed, why)

    def _fail_in_flight(self, error: type[BrokerUnavailable], why: str) -> None:
        """Fail every request in flight at once with ``error``, saying ``why`` (waiting cannot help)."""
        for rid in list(self._in_flight):
            entry = self._pending[rid]
            self._finish(entry, answered=False)
            _fail(entry.future, error(f"{why} (request {rid})"))

    def _on_worker_protocol(self) -> None:
        """The peer said DISCONNECT, which a broker says only on its worker side (to a HEARTBEAT from
        no worker it knows): this address is a broker's --worker-address. Say so, and fail what is in
        flight, which would otherwise wait out its deadline there."""
        why = (f"{self.config.address} is a broker's worker endpoint (its --worker-address): it answered "
               f"in the worker protocol; clients connect to the broker's --address")
        if self._wrong_endpoint is None:
            log.warning("%s", why)
        self._wrong_endpoint = why
        self._fail_in_flight(BrokerUnavailable, why)

    def _on_reply(self, frames: list[bytes]) -> None:
        """Settle the request the reply names; count and drop a reply that names none."""
        try:
            kind, body = P.split_reply(frames)
            if kind == P.HEARTBEAT:
                return
            if kind == P.DISCONNECT:
                return self._on_worker_protocol()
            rid = P.check_id(body)
        except ProtocolError as exc:
            self.counters.malformed_replies += 1
            log.warning("dropping a reply that names no request: %s", exc)
            return
        entry = self._pending.get(rid)
        if entry is None:
            self._count_unmatched(rid)
            return
        if not entry.in_flight and kind != P.REPLY:
            self.counters.duplicate_replies += 1  # e.g. a second BUSY while it waits to be resent
            return
        try:
            if kind == P.BUSY:
                self._on_busy(entry, P.parse_busy(body))
            elif kind == P.ERROR:
                self._on_error(entry, *P.parse_error(body))
            else:
                self._finish(entry, answered=True)
                _settle(entry, kind, rid, body)
        except ProtocolError as exc:
            self._finish(entry, answered=True)
            error = MalformedReply(exc.code, f"undecodable {P.KIND_NAMES.get(kind, kind[:8])} reply to "
                                             f"{rid}: {exc.message}")
            error.__cause__ = exc
            _fail(entry.future, error)

    def _count_unmatched(self, rid: Any) -> None:
        answered = self._settled.get(rid)
        if answered:
            self.counters.duplicate_replies += 1
        elif answered is not None or isinstance(rid, str) and rid.startswith(self._prefix):
            self.counters.late_replies += 1  # its request expired or failed already (or is long forgotten)
        else:
            self.counters.unknown_replies += 1

    def _finish(self, entry: _Pending, answered: bool) -> None:
        """Forget ``entry`` (the caller settles its future), remembering its id for late replies."""
        self._pending.pop(entry.rid, None)
        self._in_flight.discard(entry.rid)
        entry.in_flight = False
        self._settled.put(entry.rid, answered)

    def _on_busy(self, entry: _Pending, message: str) -> None:
        self._unflight(entry)
        if entry.busy_tries >= self.config.busy_retries:
            self._finish(entry, answered=True)
            tries = f" (after {entry.busy_tries} retries)" if entry.busy_tries else ""
            return _fail(entry.future, ServerBusy(f"{message}{tries}"))
        if not self._schedule(entry, entry.busy_tries):
            self._finish(entry, answered=True)
            return _fail(entry.future, ServerBusy(f"{message} (no time for a retry before the request's "
                                                  f"{entry.timeout_s:g} s deadline)"))
        entry.busy_tries += 1
        self.counters.busy_retries += 1
        return None

    def _on_error(self, entry: _Pending, code: str, message: str) -> None:
        if code == P.E_DEADLINE:
            self._finish(entry, answered=True)
            return _fail(entry.future, DeadlineExceeded(
                f"request {entry.rid} passed its {entry.timeout_s:g} s deadline at the server: {message}"))
        if code == P.E_SHUTDOWN:
            self._unflight(entry)
            if entry.lost_tries < self.config.lost_retries and self._schedule(entry, entry.lost_tries):
                entry.lost_tries += 1
                self.counters.lost_resends += 1
                return None
        self._finish(entry, answered=True)
        return _fail(entry.future, RemoteError(code, message))

    def _unflight(self, entry: _Pending) -> None:
        entry.in_flight = False
        self._in_flight.discard(entry.rid)

    def _schedule(self, entry: _Pending, attempt: int) -> bool:
        """Plan a resend after the ``attempt``-th backoff; False if it would come after the deadline."""
        cap = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** min(attempt, 30))
        at = time.monotonic() + self._random.uniform(cap / 2, cap)
        if at >= entry.deadline:
            return False
        entry.retry_at = at
        heapq.heappush(self._retries, (at, next(self._seq), entry.rid))
        return True

    def _resend_due(self, now: float) -> None:
        while self._retries and self._retries[0][0] <= now:
            at, _, rid = heapq.heappop(self._retries)
            entry = self._pending.get(rid)
            if entry is not None and entry.retry_at == at:
                self._transmit(entry, now)

    def _check_liveness(self, now: float) -> None:
        """Ping a broker silent for an interval; reconnect when it stayed silent for ``liveness`` of them."""
        if not self._in_flight:
            return
        # Dead only if a ping went unanswered for an interval: silence while this thread was busy
        # (a slow done-callback) proves nothing until the broker has been asked.
        if self._pinged_at > self._heard_at and now >= self._presumed_dead_at():
            self._reconnect(f"it sent nothing for {now - self._heard_at:.2f} s ({self.config.heartbeat_liveness} "
                            f"heartbeat intervals of {self.config.heartbeat_interval_s:g} s)")
        elif now >= self._next_ping_at():
            self._pinged_at = now
            self.counters.heartbeats_sent += 1
            try:
                send_nowait(self._sock, [P.VERSION, P.HEARTBEAT, P.heartbeat_body()])
            except zmq.Again:
                pass  # requests fill the queue to the broker; they are pings enough

    def _reconnect(self, why: str) -> None:
        """The broker is presumed dead: replace the DEALER and resend (or fail) what was in flight."""
        self.counters.reconnects += 1
        if self._ever_heard or self._ever_connected:
            log.warning("presuming the broker at %s dead (%s): reconnecting", self.config.address, why)
        else:  # there never was one to be dead
            log.warning("nothing answers at %s (%s): is a broker running there? connecting again",
                        self.config.address, why)
        self._close_link()
        try:
            self._open_link()
        except zmq.ZMQError as exc:  # cannot happen for an address that connected once; fail loudly
            raise BertpoolError(f"cannot reconnect to {self.config.address}: {exc}") from exc
        now = time.monotonic()
        self._heard_at, self._pinged_at = now, 0.0
        lost = [self._pending[rid] for rid in list(self._in_flight)]
        self._in_flight.clear()
        for entry in sorted(lost, key=lambda e: e.deadline):
            entry.in_flight = False
            if entry.lost_tries < self.config.lost_retries and entry.deadline > now:
                entry.lost_tries += 1
                self.counters.lost_resends += 1
                self._transmit(entry, now)
            else:
                self._finish(entry, answered=False)
                _fail(entry.future, BrokerUnavailable(self._unavailable(entry, why)))

    def _unavailable(self, entry: _Pending, why: str) -> str:
        if self._handshake_hint is not None:
            return (f"no broker answered at {self.config.address}: {self._handshake_hint}; request "
                    f"{entry.rid} was sent {entry.sends} times")
        if not self._ever_heard and not self._ever_connected:
            return f"{self._never_answered('nothing answered')} (request {entry.rid} sent {entry.sends} times)"
        if not self._ever_heard:
            return (f"no broker answered at {self.config.address}: something accepted the connection "
                    f"but never sent a message; request {entry.rid} was sent {entry.sends} times")
        return (f"no broker answered at {self.config.address}: {why}; request {entry.rid} was sent "
                f"{entry.sends} times (lost_retries={self.config.lost_retries})")

    def _never_answered(self, nothing: str) -> str:
        """Why nothing ever answered: no broker there, as a rule; but a process out of file
        descriptors cannot open the connection at all, and ZeroMQ retries that in silence."""
        files = out_of_files(_FILES_HEADROOM)
        if files is not None:
            return f"no connection to {self.config.address} could be opened: {files}"
        return f"{nothing} at {self.config.address} — is a broker running there?"

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, rid = heapq.heappop(self._deadlines)
            entry = self._pending.get(rid)  # None: it was settled already
            if entry is None:
                continue
            what = "stats request" if entry.kind == P.STATS else "request"
            message = f"{what} {rid} got no reply within its {entry.timeout_s:g} s deadline"
            silent = now - self._heard_at
            if self._handshake_hint is not None:
                message += f"; the last handshake failed: {self._handshake_hint}"
            elif self._wrong_endpoint is not None:
                message += f"; {self._wrong_endpoint}"
            elif not self._ever_heard and not self._ever_connected:
                message += f"; {self._never_answered('nothing ever answered')}"
            elif self._down_since is not None:
                message += (f"; the connection to the broker at {self.config.address} closed "
                            f"{now - self._down_since:.1f} s ago and has not come back")
            elif entry.in_flight and silent >= self.config.heartbeat_interval_s:
                message += f"; nothing heard from the broker at {self.config.address} for {silent:.1f} s"
            self._finish(entry, answered=False)
            _fail(entry.future, DeadlineExceeded(message))


class _IoOwner:
    """What a Client's I/O thread holds: the Client while it wants the thread to drive (from the
    request or close() that asks, under its _lock, until the thread parks with nothing pending), so
    nothing pending is ever lost with a dropped Client; and nothing while parked, so a Client dropped
    without close() is collected (Client.__del__) instead of living, with its thread and sockets, as
    long as the process. ``ref`` (weak) lets the parked thread read the link's monitor meanwhile."""
    __slots__ = ("client", "ref")

    def __init__(self, client: Client) -> None:
        self.client: Client | None = None
        self.ref = weakref.ref(client)


def _io_main(owner: _IoOwner, wanted: threading.Event) -> None:
    """The I/O thread: serve its Client whenever asked (and, parked, read its link's monitor every
    PARKED_READ_S); end when it is closed, or collected unclosed."""
    while True:
        if not wanted.wait(PARKED_READ_S):
            _read_parked(owner)
            continue
        client = owner.client
        if client is None:
            return  # the Client was collected (its __del__ set ``wanted``): nothing is left to serve
        if not client._io_serve():
            return
        del client  # parked: hold no reference while waiting


def _read_parked(owner: _IoOwner) -> None:
    """Parked: read the idle link's monitor (its connection and handshake news, kept for the next
    request), unless someone drives the socket now (they read it)."""
    client = owner.ref()
    if client is None or not client._drive.acquire(blocking=False):
        return
    try:
        if not client._closed.is_set() and client._monitor is not None:
            client._connection_closed()
    finally:
        client._drive.release()


def _check_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` as a list of (text_a, text_b), every text checked as submit() checks it; TypeError
    or InputError naming the index of the first that is not a pair of texts that can travel."""
    checked = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes, bytearray)):  # "ab" would unpack into the pair ("a", "b")
            raise TypeError(f"pairs[{index}] must be a (text_a, text_b) pair, got {type(pair).__name__}")
        try:
            a, b = pair
        except (TypeError, ValueError) as exc:
            raise TypeError(f"pairs[{index}] must be a (text_a, text_b) pair, got {type(pair).__name__}"
                            f" ({exc})") from exc
        checked.append((P.check_text_arg(f"pairs[{index}] text_a", a),
                        P.check_text_arg(f"pairs[{index}] text_b", b)))
    return checked


def _settle(entry: _Pending, kind: bytes, rid: Any, body: dict[str, Any]) -> None:
    """Complete ``entry`` from its reply; ProtocolError if the reply is malformed or does not fit."""
    _resolve(entry.future, _answer(entry, kind, rid, body))


def _answer(entry: _Pending, kind: bytes, rid: Any, body: dict[str, Any]) -> Any:
    """What a reply answers ``entry``: a Prediction, or a stats map; ProtocolError if the reply is
    malformed or does not fit."""
    if kind == P.REPLY and entry.kind == P.REQUEST:
        label, probabilities, timings = P.parse_prediction(body)
        return Prediction(rid, label, probabilities, timings)
    if kind == P.STATS and entry.kind == P.STATS:
        return P.parse_stats_reply(body)
    raise ProtocolError(P.E_BAD_KIND, f"a {P.KIND_NAMES.get(kind, repr(kind[:8]))} reply does not answer "
                                      f"a {P.KIND_NAMES[entry.kind]}")


_NO_ANSWER = object()  # _answer_of's "not its answer"
_ANSWERS = frozenset((P.REPLY, P.STATS))  # the kinds of reply that answer a request (_answer)


def _answer_of(entry: _Pending, frames: list[bytes]) -> Any:
    """What ``frames`` answer ``entry`` if they are a well-formed answer naming it, else _NO_ANSWER
    (_on_reply then handles them: a BUSY, an ERROR, someone else's reply, one it cannot use)."""
    try:
        kind, body = P.split_reply(frames)
        if kind in _ANSWERS and P.check_id(body) == entry.rid:
            return _answer(entry, kind, entry.rid, body)
    except ProtocolError:
        pass
    return _NO_ANSWER


def _ms_until(at: float) -> int:
    """Milliseconds from now until the monotonic time ``at``, for a poll's timeout: truncated, plus
    one, so the poll never ends just before its timer is due; 0 once ``at`` is a millisecond past."""
    return max(0, int((at - time.monotonic()) * 1000) + 1)


def _resolve(future: Future, value: Any) -> None:
    if future.set_running_or_notify_cancel():
        future.set_result(value)


def _fail(future: Future, error: BertpoolError) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)
