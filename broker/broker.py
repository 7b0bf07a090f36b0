"""The broker: routes client requests to workers by credit, and replies back.

Two ROUTER sockets: ``frontend`` (clients' DEALERs) and ``backend`` (workers'
DEALERs). A worker's READY announces its capacity; the broker hands it at most
that many requests at a time (credit-based: a reply returns one credit), always
to the worker with the most free credit, so a slow worker never blocks the
others. Requests no worker can take wait in a FIFO queue bounded in requests
(``max_queue``) and bytes (``max_queue_bytes``); beyond either the client gets
BUSY at once.

Reliability (see the heartbeat section of :mod:`bertpool.common.protocol`):

* Heartbeats both ways with every registered worker. A worker silent for
  ``heartbeat_liveness`` intervals (hung, SIGSTOPped, its host gone) is
  removed, and what it held is re-dispatched under fresh tokens, at most
  ``max_redispatch`` times per request, then answered ERROR worker_lost. A
  reply under a token the broker no longer knows is dropped and counted
  (``late_replies_dropped``): no request is ever answered twice. A HEARTBEAT
  from a socket that is not registered is answered DISCONNECT, so a worker the
  broker gave up on (or one from before a broker restart) registers afresh. A
  READY for a slot from the pid that holds it is a re-registration, not a restart.
* Deadlines: a REQUEST's ``deadline_ms`` becomes an absolute deadline on the
  broker's clock at receipt. Expired requests are answered ERROR
  deadline_exceeded instead of being dispatched; the time left travels to the
  worker, which skips the request if it expires in its batcher. A request held
  past its deadline plus one heartbeat interval (a hung worker) is answered
  deadline_exceeded by the broker, and its worker's late answer is dropped.
* Hostile input: every frame is validated (protocol.parse_from_client and
  parse_from_worker); a bad client message gets an ERROR reply, a bad worker
  message is dropped and counted (``dropped_malformed``; a malformed READY is also
  a WARNING, once per worker), and so is a STATS from a socket that neither
  registered nor answered a request, under an epoch no such socket named
  (``stats_dropped``); ``max_message_bytes``
  (ZeroMQ MAXMSGSIZE) disconnects a peer that sends a larger frame before it
  is read.
* A client that stops reading cannot stall the broker or grow its memory: at
  most ``frontend_sndhwm_msgs`` replies wait for one client, and further ones
  are dropped and counted (``dropped``), never blocked on.
* Out of file descriptors (``ulimit -n`` reached: one per client connection),
  new clients' connections wait unaccepted, unanswered, and ZeroMQ retries the
  accept in a busy loop (a core) without a word: the broker looks once a
  heartbeat interval and says so (WARNING, then once a minute while it lasts;
  INFO once it can accept again).
* Latency at low load (``busy_poll_us``, off by default): after a message, while no request is
  queued and the workers hold no more requests than there are workers, the broker polls without
  blocking for that long before it sleeps, so a reply or request that comes meanwhile finds its
  thread, and its CPU, awake: on a VM, waking both costs tens of microseconds a hop. It spends up
  to a core while a few requests keep coming, none under load (the workers need the CPU then), and
  next to none when idle (one window after each heartbeat).
* Graceful shutdown: stop() makes new REQUESTs get ERROR shutting_down, lets
  held and queued requests finish for up to ``drain_timeout_s``, answers the
  rest shutting_down, says DISCONNECT to every worker, and returns. Meanwhile a
  READY gets no answer (answering each fed a READY/DISCONNECT loop) and an
  unregistered socket's beat gets DISCONNECT shutting_down.

Bodies are not decoded on the request path, except a REQUEST that names a
``deadline_ms`` (protocol.request_deadline_ms).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import zmq

from ..common import protocol as P
from ..common import security
from ..common.cli import (add_address_arguments, add_exit_status, add_link_arguments, check_distinct_listeners,
                          install_reload_handler, install_stop_handlers, parse_host_port, report_error, setup_logging)
from ..common.defaults import DEFAULT_BACKEND, DEFAULT_FRONTEND
from ..common.errors import BertpoolError, ConfigError, ProtocolError
from ..common.recent import Recent
from .metrics import BrokerMetrics, MetricsServer, PoolTotals
from ..common.fastzmq import out_of_files, recv_many, send_nowait

log = logging.getLogger("bertpool.broker")

_TOKEN_MASK = (1 << (8 * P.TOKEN_BYTES)) - 1
# The shortest stats_interval_s other than 0 (off): 1e-9 printed about 90,000 lines a second.
MIN_STATS_INTERVAL_S = 0.1
# While the process is out of file descriptors, it says so again this often (first at once).
OUT_OF_FILES_REPEAT_S = 60.0
# The longest busy_poll_us: a wake-up costs about 100 us, so a longer window only burns CPU.
MAX_BUSY_POLL_US = 10_000
# Peers remembered: worker sockets that answered a request (their STATS count), and senders of a
# malformed READY already warned about. Bounded, so a flood of new sockets cannot grow memory.
MAX_PEERS = 1024
# Messages one side's drain handles before the other side is served: one busy side cannot starve it.
DRAIN_LIMIT = 512


@dataclass(frozen=True)
class BrokerConfig:
    frontend: str = DEFAULT_FRONTEND         # where clients connect (tcp:// or ipc://)
    backend: str = DEFAULT_BACKEND           # where workers connect (tcp:// or ipc://)
    max_queue: int = 4096                    # requests waiting for a worker before BUSY (>= 1)
    max_queue_bytes: int = 128 << 20         # bytes of request bodies waiting before BUSY
    max_request_bytes: int = 1 << 20         # larger request bodies are refused (too_large)
    max_message_bytes: int = 4 << 20         # ZeroMQ MAXMSGSIZE on both ROUTERs: a peer sending a larger
                                             # frame is disconnected before it is read (> max_request_bytes)
    stats_interval_s: float = 0.0            # print a stats line this often (0 = never, else >= 0.1)
    frontend_sndhwm_msgs: int = 1000         # replies queued for one client before more are dropped
    frontend_rcvhwm_msgs: int = 10_000       # messages read ahead from one client before ZeroMQ stops
                                             # reading its connection (a flood pushes back, memory stays bounded)
    heartbeat_interval_s: float = 1.0        # beat every registered worker this often
    heartbeat_liveness: int = 3              # a worker silent this many intervals is dead
    max_redispatch: int = 2                  # times a request is re-sent after its worker died
    drain_timeout_s: float = 10.0            # on stop(), longest wait for held requests to finish
    curve: security.CurveServerConfig | None = None  # CURVE on both links; None = plain text
    metrics_address: str = ""                # serve Prometheus metrics on HOST:PORT (or PORT: 127.0.0.1);
                                             # "" = no metrics endpoint, and nothing recorded for one
    busy_poll_us: float = 0.0                # at low load, after a message, poll without sleeping this long
                                             # (0 = off, at most MAX_BUSY_POLL_US): less latency, up to a core

    def __post_init__(self) -> None:
        # 0 would make every request BUSY: each one is queued before any worker can take it.
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        # 0 is ZeroMQ's "no limit": replies to a client that stops reading would pile up forever.
        if self.frontend_sndhwm_msgs < 1:
            raise ConfigError(f"frontend_sndhwm_msgs must be >= 1, got {self.frontend_sndhwm_msgs}")
        if self.frontend_rcvhwm_msgs < 1:
            raise ConfigError(f"frontend_rcvhwm_msgs must be >= 1, got {self.frontend_rcvhwm_msgs}")
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        # A queue smaller than one request would refuse requests the size check lets through.
        if self.max_queue_bytes < self.max_request_bytes:
            raise ConfigError(f"max_queue_bytes ({self.max_queue_bytes}) must be >= max_request_bytes "
                              f"({self.max_request_bytes})")
        # Oversized requests must reach the size check, so the client gets a typed too_large.
        if self.max_message_bytes <= self.max_request_bytes:
            raise ConfigError(f"max_message_bytes ({self.max_message_bytes}) must be > max_request_bytes "
                              f"({self.max_request_bytes})")
        P.check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        if self.max_redispatch < 0:
            raise ConfigError(f"max_redispatch must be >= 0, got {self.max_redispatch}")
        if not 0 <= self.drain_timeout_s <= P.MAX_TIMEOUT_S:  # NaN, inf: SIGTERM would never finish
            raise ConfigError(f"drain_timeout_s must be in [0, {P.MAX_TIMEOUT_S:g}] s, got {self.drain_timeout_s}")
        if self.stats_interval_s != 0 and not MIN_STATS_INTERVAL_S <= self.stats_interval_s <= P.MAX_TIMEOUT_S:
            raise ConfigError(f"stats_interval_s must be 0 (off) or in [{MIN_STATS_INTERVAL_S:g}, "
                              f"{P.MAX_TIMEOUT_S:g}] s, got {self.stats_interval_s}")
        if self.metrics_address:
            parse_host_port(self.metrics_address, "--metrics-address")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:  # NaN too
            raise ConfigError(f"busy_poll_us must be in [0, {MAX_BUSY_POLL_US}] us, got {self.busy_poll_us}")
        P.check_endpoint("frontend address", self.frontend)
        P.check_endpoint("backend address", self.backend)
        if P.same_endpoint(self.frontend, self.backend):  # two ipc binds of one file would both "work", and mix the links
            raise ConfigError(f"the client and worker addresses must differ, both are {self.frontend}"
                              + ("" if self.frontend == self.backend else f" ({self.backend})"))
        for name in ("frontend_sndhwm_msgs", "frontend_rcvhwm_msgs", "max_message_bytes"):
            if getattr(self, name) > P.INT32_MAX:
                raise ConfigError(f"{name} must be <= {P.INT32_MAX}, got {getattr(self, name)}")


@dataclass(slots=True)  # one per request: slots make it cheaper to build and to read
class _Request:
    client: bytes                 # the client's ROUTER identity
    body: bytes                   # the request body, untouched
    enqueued: float               # time.monotonic() when it reached the broker
    deadline: float | None = None  # absolute, on the broker's monotonic clock
    lost: int = 0                 # times a worker died holding it
    answered: bool = False        # the broker answered it itself (deadline) while a worker held it


def _settings(ready: P.Ready | None) -> dict[str, Any]:
    """What a worker's READY said about how it serves, for its STATS entry: batch_size (READY's, 1
    where it said none), batch_timeout_ms (left out where it said none: older workers), and model
    (what it knows of hash, first 12 characters, dtype and target, in one string; left out for echo)."""
    if ready is None:
        return {}
    settings: dict[str, Any] = {"batch_size": ready.batch_size}
    if ready.batch_timeout_ms is not None:
        settings["batch_timeout_ms"] = ready.batch_timeout_ms
    known = [v for v in (ready.model_hash, ready.dtype, ready.target) if v and v not in ("none", "unknown")]
    if known:  # "none": echo serves no model; "unknown": a model without a manifest
        settings["model"] = " ".join(v[:12] for v in known)
    return settings


@dataclass
class _WorkerState:
    identity: bytes
    name: str                   # unique among registered workers (the key in stats())
    incarnation: str            # this registration's id (or its socket's, if it sent none)
    capacity: int
    slot: str | None = None     # supervisor slot; a READY for it from another socket replaces this one
    pid: int | None = None
    backend: str | None = None  # what READY said it serves (echo, tf, neuron)
    last_heard: float = 0.0     # time.monotonic() of its last message (any counts as a beat)
    inflight: dict[bytes, _Request] = field(default_factory=dict)  # token -> request
    stats: dict[str, int] = field(default_factory=dict)            # last STATS counters
    ready: P.Ready | None = None  # its latest READY (model info for the metrics, message and batch sizes)

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    @property
    def per_message(self) -> int:
        """Most requests it takes in one REQUESTS message (its READY's word; 1: single REQUESTs)."""
        return 1 if self.ready is None else self.ready.requests_per_message

    @property
    def batch_size(self) -> int:
        """Most requests in one of its model calls (its READY's word)."""
        return 1 if self.ready is None else self.ready.batch_size


@dataclass
class BrokerCounters:
    requests: int = 0             # REQUESTs accepted into the queue
    replies: int = 0              # REPLYs forwarded to clients (any dropped on the way are in dropped too)
    errors: int = 0               # ERRORs sent to clients (ours and workers')
    busy: int = 0                 # BUSY answers (queue full in requests or bytes)
    requeued: int = 0             # requests put back after their worker left (any reason)
    redispatched: int = 0         # of those, put back because their worker was presumed dead
    worker_lost: int = 0          # requests failed with worker_lost (re-dispatch bound reached)
    expired: int = 0              # requests answered deadline_exceeded by the broker
    late_replies_dropped: int = 0  # worker answers under a token no longer held (dead worker, expired)
    workers_lost: int = 0         # workers removed as dead (silent, unreachable or replaced by a restart)
    dropped_malformed: int = 0    # malformed worker messages dropped
    stats_dropped: int = 0        # well-formed STATS dropped: from a socket that neither registered nor
                                  # answered a request, under no epoch such a socket sent (a stranger, or
                                  # a worker from before a broker restart, yet to re-register)
    disconnects_sent: int = 0     # DISCONNECTs sent to unregistered workers that beat
    shutting_down: int = 0        # requests answered shutting_down
    heartbeats: int = 0           # client HEARTBEATs answered
    dropped: int = 0              # messages for clients dropped: client gone, or frontend_sndhwm_msgs waiting


def _check_ipc_free(endpoint: str) -> None:
    """ConfigError when something listens on ``endpoint``'s ipc socket file. ZeroMQ's ipc bind
    replaces the file, which would silently cut a live broker off from every new peer; a file nobody
    listens on (a crashed broker's) is left for the bind to replace."""
    path = P.ipc_path(endpoint)
    if path is None:
        return  # tcp: a taken port already fails the bind
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:  # absent, refused (stale), not a socket, or too long a path: the bind decides
        return
    finally:
        probe.close()
    raise ConfigError("a process is already listening there (another broker?)")


def busy_poll(poller: zmq.Poller, wait_ms: int, spin_until: float) -> list[tuple[zmq.Socket, int]]:
    """``poller.poll(wait_ms)``, but until ``spin_until`` (time.monotonic()) by polls that do not
    block: the first events found, else the blocking poll's. A thread that is running when a
    message comes skips two wake-ups (its own and its idle CPU's), at the price of the CPU it spins."""
    while time.monotonic() < spin_until:
        events = poller.poll(0)
        if events:
            return events
    return poller.poll(wait_ms)


def _free_credit(worker: _WorkerState) -> int:
    # _WorkerState.free without the property call: dispatch ranks every worker for every request.
    return worker.capacity - len(worker.inflight)


class Broker:
    """Route requests and replies until stop(); see the module docstring."""

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None,
                 stats_out: TextIO | None = None) -> None:
        self.config = config
        self.counters = BrokerCounters()
        self._ctx = context or zmq.Context.instance()
        self._workers: dict[bytes, _WorkerState] = {}
        self._queue: collections.deque[_Request] = collections.deque()
        self._queue_bytes = 0
        # token -> identity of the worker holding it. Replies are matched by token
        # alone: a worker may answer on another socket than the one it was sent on.
        self._owners: dict[bytes, bytes] = {}
        # Random start: a reply from before a broker restart never matches a new token.
        self._next_token = secrets.randbits(8 * P.TOKEN_BYTES)
        self._stop = threading.Event()       # drain, then return
        self._stop_now = threading.Event()   # return at once (second stop, or drain=False)
        self._draining_until: float | None = None
        self._stats_out = stats_out or sys.stdout
        # Unregistered sockets that answered a request handed out here (workers' compute sockets),
        # whose STATS are taken like a registered socket's; insertion-ordered, oldest dropped first.
        self._answering: Recent[bytes, None] = Recent(MAX_PEERS)
        self._warned_ready: Recent[Any, None] = Recent(MAX_PEERS)  # senders of a malformed READY already warned about
        self._ready_ignored = False  # a READY came while draining (said once)
        self._out_of_files: tuple[float, float] | None = None  # while out of descriptors: since, last said
        self._last_totals: tuple[float, int, int, int] | None = None
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self._auth: security.Authenticator | None = None  # ZAP handler while CURVE is on
        self._ipc_files: list[tuple[str, tuple[int, int]]] = []  # ipc socket files we bound: path, (dev, inode)
        # Recorded for the Prometheus endpoint only when it is on (config.metrics_address).
        # Worker counters totalled over every worker process heard from, departed ones included, so
        # STATS totals (and the metrics) never go backwards when a worker dies or restarts.
        self.pool_totals = PoolTotals()
        self.metrics: BrokerMetrics | None = BrokerMetrics(self.pool_totals) if config.metrics_address else None
        self.metrics_server: MetricsServer | None = None

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind both sockets (raises ConfigError when an address is taken or invalid)."""
        security.warn_if_exposed([self.config.frontend, self.config.backend], self.config.curve)
        self._auth = security.start_authenticator(self._ctx, self.config.curve)
        self.frontend = self._ctx.socket(zmq.ROUTER)
        security.apply_server(self.frontend, self.config.curve, security.CLIENTS)
        self.backend = self._ctx.socket(zmq.ROUTER)
        security.apply_server(self.backend, self.config.curve, security.WORKERS)
        # Sending to a worker that has gone must fail loudly, so its request is re-queued; to a
        # client, so the drop is counted (always non-blocking there: see _to_client).
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        # Credit bounds what waits for a worker, and workers only answer what they were sent; only
        # clients need bounds: one that stops reading, and one that floods us.
        self.backend.setsockopt(zmq.SNDHWM, 0)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.frontend.setsockopt(zmq.SNDHWM, self.config.frontend_sndhwm_msgs)
        self.frontend.setsockopt(zmq.RCVHWM, self.config.frontend_rcvhwm_msgs)
        for sock, endpoint in ((self.frontend, self.config.frontend), (self.backend, self.config.backend)):
            try:
                _check_ipc_free(endpoint)
                sock.bind(endpoint)
                self._note_ipc_file(endpoint)
            except (zmq.ZMQError, ConfigError) as exc:
                self.close()
                raise ConfigError(f"cannot bind {endpoint}: {exc}") from exc
        if self.metrics is not None:
            try:
                self.metrics_server = MetricsServer(self, self.config.metrics_address)
            except ConfigError:
                self.close()
                raise

    def stop(self, drain: bool = True) -> None:
        """Ask run() to return (thread- and signal-safe). With ``drain`` (the default; SIGTERM) it
        first refuses new work and lets held requests finish for up to drain_timeout_s; a second
        stop(), or ``drain=False``, returns at once (what is left is answered shutting_down)."""
        if self._stop.is_set() or not drain:
            self._stop_now.set()
        self._stop.set()

    def reload_allow_lists(self) -> bool:
        """Read the CURVE allow-lists again (SIGHUP); True if the new ones are in use. Logged either
        way: with CURVE off there is nothing to read, and lists that cannot be read (a directory
        gone, or holding no key) leave the old ones in use."""
        auth = self._auth
        if auth is None:
            log.warning("reload asked, but CURVE is off: there are no allow-lists to read")
            return False
        try:
            log.info("%s", auth.reload())
        except ConfigError as exc:
            log.error("CURVE allow-lists NOT reloaded, the old ones stay in use: %s", exc)
            return False
        except Exception:  # a bug, not a bad file: still say the old lists stay, and why
            log.exception("CURVE allow-lists NOT reloaded, the old ones stay in use: unexpected error")
            return False
        return True

    @property
    def stopping(self) -> bool:
        """stop() was called."""
        return self._stop.is_set()

    def close(self) -> None:
        for sock in (self.frontend, self.backend):
            if sock is not None:
                sock.close(linger=0)
        self.frontend = self.backend = None
        self._remove_ipc_files()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _note_ipc_file(self, endpoint: str) -> None:
        """Remember the socket file an ipc bind made, and which file it is (for _remove_ipc_files)."""
        path = P.ipc_path(endpoint)
        if path is not None:
            try:
                st = os.stat(path)
            except OSError:
                return
            self._ipc_files.append((path, (st.st_dev, st.st_ino)))

    def _remove_ipc_files(self) -> None:
        """Remove the ipc socket files we bound (libzmq leaves them behind), each only while it is still
        the very file our bind made: one a later broker bound on that path since is its own, not ours."""
        for path, identity in self._ipc_files:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass  # gone already, or not ours to remove
        self._ipc_files = []

    def run(self) -> None:
        """Serve until stop(); binds first if needed, closes the sockets on return."""
        if self.frontend is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        interval = self.config.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        next_stats = time.monotonic() + (self.config.stats_interval_s or 3600.0)
        busy_poll_s, spin_until = self.config.busy_poll_us / 1e6, 0.0
        try:
            while not self._stop_now.is_set():
                if self._stop.is_set() and self._draining_until is None:
                    self._begin_drain()
                # The poll timeout bounds how late beats, stop() and stats are noticed.
                wait_ms = max(0, min(200, int((min(next_beat, next_stats) - time.monotonic()) * 1000)))
                events = dict(busy_poll(poller, wait_ms, spin_until))
                backend_empty = True
                if self.backend in events:
                    backend_empty = self._drain(self.backend, self._on_backend)
                if self.frontend in events:
                    self._drain(self.frontend, self._on_frontend)
                self._dispatch()
                now = time.monotonic()
                if events and busy_poll_s:  # at low load only: under load the CPU is the workers'
                    spin_until = now + busy_poll_s if self._lightly_loaded() else 0.0
                if now >= next_beat:
                    # Judge silence only with the backend read empty: a broker that was itself
                    # starved must first hear the beats waiting for it.
                    if backend_empty:
                        self._check_liveness(now)
                    self._expire_queued(now)
                    self._expire_held(now)
                    self._beat_workers()
                    self._check_open_files(now)
                    next_beat = now + interval
                if self._draining_until is not None and self._drain_done(now):
                    break
                if self.config.stats_interval_s and now >= next_stats:
                    self._print_stats()
                    next_stats = time.monotonic() + self.config.stats_interval_s
            self._finish_shutdown()
        finally:
            self.close()

    def _lightly_loaded(self) -> bool:
        """No request queued, and no more held than there are workers (busy_poll_us spins only then)."""
        return not self._queue and len(self._owners) <= len(self._workers)

    @staticmethod
    def _drain(sock: zmq.Socket, handler) -> bool:
        """Handle up to DRAIN_LIMIT waiting messages (so one busy side cannot starve the other), read
        by fastzmq.recv_many; True when the socket was read empty (fewer than the limit waited)."""
        messages = recv_many(sock, DRAIN_LIMIT)
        for frames in messages:
            handler(frames)
        return len(messages) < DRAIN_LIMIT

    # ------------------------------------------------------------- shutdown

    def _begin_drain(self) -> None:
        self._draining_until = time.monotonic() + self.config.drain_timeout_s
        held = sum(len(w.inflight) for w in self._workers.values())
        log.info("stopping: refusing new requests; %d held and %d queued get up to %.1f s to finish",
                 held, len(self._queue), self.config.drain_timeout_s)

    def _drain_done(self, now: float) -> bool:
        """Draining ends when nothing is held and nothing queued can still be served, or at the
        drain deadline."""
        held = any(w.inflight for w in self._workers.values())
        return now >= self._draining_until or not held and (not self._queue or not self._workers)

    def _finish_shutdown(self) -> None:
        """Answer everything left with shutting_down and tell every worker to leave."""
        if self.frontend is None:
            return
        message = "the broker is shutting down; retry against its successor"
        for request in self._queue:
            self._refuse(request, message)
        self._queue.clear()
        self._queue_bytes = 0
        for worker in list(self._workers.values()):
            for request in worker.inflight.values():
                if not request.answered:
                    self._refuse(request, message)
            self._send_worker(worker.identity, P.broker_disconnect_frames(P.DISCONNECT_SHUTDOWN))
        self._workers.clear()
        self._owners.clear()

    def _refuse(self, request: _Request, message: str) -> None:
        self.counters.shutting_down += 1
        self._client_error(request.client, P.peek_id(request.body), P.E_SHUTDOWN, message)

    # -------------------------------------------------------------- clients

    def _on_frontend(self, frames: list[bytes]) -> None:
        client = frames[0]
        try:
            message = P.parse_from_client(frames[1:])
        except ProtocolError as exc:
            body = frames[3] if len(frames) == 4 else b""
            return self._client_error(client, P.peek_id(body), exc.code, exc.message)
        if message.kind == P.REQUEST:
            return self._accept(client, message.body)
        if message.kind == P.STATS:
            return self._on_stats(client, message.body)
        self.counters.heartbeats += 1  # HEARTBEAT: answer at once, so a waiting client knows we live
        self._to_client(client, P.HEARTBEAT, P.heartbeat_body())
        return None

    def _accept(self, client: bytes, body: bytes) -> None:
        if len(body) > self.config.max_request_bytes:
            return self._client_error(client, P.peek_id(body), P.E_TOO_LARGE,
                                      f"request of {len(body)} bytes exceeds {self.config.max_request_bytes}")
        if self._stop.is_set():  # (not _draining_until: stop() may have come during this poll)
            self.counters.shutting_down += 1
            return self._client_error(client, P.peek_id(body), P.E_SHUTDOWN,
                                      "the broker is shutting down and takes no new requests")
        try:
            deadline_ms = P.request_deadline_ms(body)
        except ProtocolError as exc:
            return self._client_error(client, P.peek_id(body), exc.code, exc.message)
        if self._queue_full(len(body)):
            # A burst read in one go can fill the queue while workers have room: they take theirs first.
            self._dispatch()
        if self._queue_full(len(body)):
            self.counters.busy += 1
            self._to_client(client, P.BUSY, P.busy_body(
                P.peek_id(body), f"queue full ({len(self._queue)} requests, {self._queue_bytes} bytes "
                                 f"waiting); retry later"))
            return None
        now = time.monotonic()
        self.counters.requests += 1
        deadline = None if deadline_ms is None else now + deadline_ms / 1000.0
        self._enqueue(_Request(client, body, now, deadline))
        return None

    def _queue_full(self, size: int) -> bool:
        """True when a request of ``size`` bytes would exceed max_queue or max_queue_bytes."""
        return len(self._queue) >= self.config.max_queue or self._queue_bytes + size > self.config.max_queue_bytes

    def _enqueue(self, request: _Request, front: bool = False) -> None:
        if front:
            self._queue.appendleft(request)
        else:
            self._queue.append(request)
        self._queue_bytes += len(request.body)

    def _on_stats(self, client: bytes, body: bytes) -> None:
        try:
            request_id = P.parse_stats_request(body)
        except ProtocolError as exc:
            return self._client_error(client, P.peek_id(body), exc.code, f"STATS {exc.message}")
        self._to_client(client, P.STATS, P.stats_reply(request_id, self.stats()))
        return None

    def _client_error(self, client: bytes, request_id: Any, code: str, message: str) -> None:
        self.counters.errors += 1
        if self.metrics is not None:
            self.metrics.count_error(code)
        self._to_client(client, P.ERROR, P.error_body(request_id, code, message))

    def _to_client(self, client: bytes, kind: bytes, body: bytes) -> bool:
        """Send without ever blocking; False (counted in ``dropped``) when the client is gone
        or already has frontend_sndhwm_msgs messages waiting."""
        try:
            send_nowait(self.frontend, [client, P.VERSION, kind, body])
        except zmq.ZMQError:  # EAGAIN: its queue is full; EHOSTUNREACH: it disconnected
            self.counters.dropped += 1
            return False
        return True

    # -------------------------------------------------------------- workers

    def _on_backend(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            message = P.parse_from_worker(frames[1:])
        except ProtocolError as exc:
            self.counters.dropped_malformed += 1
            if len(frames) == 4 and frames[2] == P.READY:
                self._warn_bad_ready(identity, frames[3], exc)
            else:
                log.debug("dropping malformed worker message: %s", exc)
            return
        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_heard = time.monotonic()  # any message counts as a beat
        kind = message.kind
        if kind == P.REPLIES:
            delivered = False
            for answer_kind, token, body in message.replies:
                delivered = self._on_reply(answer_kind, token, body) or delivered
            if delivered and worker is None:
                self._note_answering(identity)
        elif kind in (P.REPLY, P.ERROR):
            if self._on_reply(kind, message.token, message.body) and worker is None:
                self._note_answering(identity)
        elif kind == P.READY:
            self._on_ready(identity, message.ready)
        elif kind == P.STATS:
            self._on_worker_stats(identity, worker, message)
        elif kind == P.DISCONNECT:
            self._on_disconnect(identity, message.incarnation)
        elif kind == P.HEARTBEAT and worker is None:
            owner = self._registered(P.beat_incarnation(message.body))
            if owner is not None:  # a worker's beat from its other socket (a long inline batch)
                owner.last_heard = time.monotonic()
                return
            # A worker we do not know (presumed dead, or from before a restart): make it re-register;
            # while we drain, say why it cannot (its READY went unanswered: see _on_ready). One
            # answer per beat: at most one a heartbeat interval per worker.
            self.counters.disconnects_sent += 1
            reason = P.DISCONNECT_SHUTDOWN if self._stop.is_set() else P.DISCONNECT_UNKNOWN
            self._send_worker(identity, P.broker_disconnect_frames(reason))

    def _on_worker_stats(self, identity: bytes, worker: _WorkerState | None, message: P.FromWorker) -> None:
        """Add a worker's STATS to the pool totals. Taken from a registered socket, from one that
        answered a request handed out here (a worker's compute socket: its last STATS come there),
        or under an epoch one of those sent; anything else is dropped and counted (stats_dropped),
        else any peer on the worker endpoint could add to the totals for good."""
        epoch = message.epoch
        if worker is None and identity not in self._answering and not (epoch and self.pool_totals.knows(epoch)):
            self.counters.stats_dropped += 1
            log.debug("dropping STATS from a socket that never registered (epoch %r)", epoch)
            return
        counters = message.stats or {}
        if worker is not None:
            worker.stats = counters
        # A process that registered before (reconnects > 0) may have worked for an earlier broker
        # (this one restarted): the first STATS heard of its stream is a baseline, not an increase,
        # else its whole lifetime lands in this broker's totals. This loses at most the one STATS
        # interval of work it did here before that first STATS.
        self.pool_totals.update(epoch or identity.hex(), counters, message.histograms,
                                baseline=counters.get("reconnects", 0) > 0)

    def _note_answering(self, identity: bytes) -> None:
        """Remember ``identity``, an unregistered socket that answered a request: a worker's."""
        self._answering.put(identity)

    def _warn_bad_ready(self, identity: bytes, body: bytes, exc: ProtocolError) -> None:
        """A READY refused as malformed: a worker that will retry forever and never serve, so say why
        at WARNING, once per sender (its pid where readable: each retry comes on a new socket)."""
        try:
            pid = P.unpack(body).get("pid")
        except ProtocolError:
            pid = None
        known_pid = isinstance(pid, int) and not isinstance(pid, bool)
        key = ("pid", pid) if known_pid else identity
        if not self._warned_ready.put(key):
            log.debug("dropping malformed READY: %s", exc)
            return
        log.warning("refusing a malformed READY from a worker%s: %s; it is not registered (said once per "
                    "worker)", f" (pid {pid})" if known_pid else "", exc)

    def _registered(self, incarnation: str | None) -> _WorkerState | None:
        """The registered worker of ``incarnation`` (None: none, or no incarnation given)."""
        if incarnation is None:
            return None
        return next((w for w in self._workers.values() if w.incarnation == incarnation), None)

    def _send_worker(self, identity: bytes, frames: list[bytes]) -> bool:
        """Send to a worker socket; False when it is gone (never blocks: no SNDHWM on the backend)."""
        try:
            send_nowait(self.backend, [identity, *frames])
        except zmq.ZMQError:  # EHOSTUNREACH: the socket disconnected
            return False
        return True

    def _on_ready(self, identity: bytes, ready: P.Ready) -> None:
        if self._stop.is_set():
            # Draining: no new registrations, and no answer either. A DISCONNECT for each READY fed a
            # hot loop (the worker re-registered at once, on a new socket, and was answered again, some
            # 1,500 times a second); its next beat, an interval later, gets DISCONNECT shutting_down.
            if not self._ready_ignored:
                self._ready_ignored = True
                log.info("a worker said READY while the broker drains: not registered, not answered")
            return
        if identity in self._workers:
            worker = self._workers[identity]
            worker.capacity, worker.ready = ready.capacity, ready
            return
        # A READY for a registered slot from another socket is that slot's restart: the old
        # process is dead, so what it held is re-dispatched (unless heartbeats caught it sooner).
        # Slots are unique to host, supervisor process and core, so this never drops a live
        # worker; names and slot-less READYs replace nothing. From the same pid, it is that process
        # re-registering (after a pause, a DISCONNECT or a broker stall): no restart, no death, so
        # no loss counted; it dropped what it held, which goes back to the queue.
        reregistered = False
        if ready.slot is not None:
            for old in [w for w in self._workers.values() if w.slot == ready.slot]:
                if old.pid is not None and old.pid == ready.pid:
                    reregistered = True
                    self._remove_worker(old.identity, "re-registered")
                else:
                    self._remove_worker(old.identity, "replaced by its restart", lost=True)
        incarnation = ready.incarnation or identity.hex()
        name = self._unique_name(ready.worker or identity.hex(), incarnation)
        self._workers[identity] = _WorkerState(identity, name, incarnation, ready.capacity, ready.slot,
                                               ready.pid, ready.backend, last_heard=time.monotonic(),
                                               ready=ready)
        if self.metrics is not None:
            self.metrics.on_ready(ready.slot, ready.pid)
        log.info("worker %s %s, capacity %d (%d workers)", name, "re-registered" if reregistered else "ready",
                 ready.capacity, len(self._workers))

    def _unique_name(self, name: str, incarnation: str) -> str:
        """``name``, or with its incarnation appended if a live worker already has it."""
        if any(w.name == name for w in self._workers.values()):
            return f"{name}#{incarnation}"
        return name

    def _on_reply(self, kind: bytes, token: bytes, body: bytes) -> bool:
        """Forward a worker's answer to its client; False when its token matched nothing held."""
        owner = self._owners.pop(token, None)
        worker = self._workers.get(owner) if owner is not None else None
        request = worker.inflight.pop(token, None) if worker is not None else None
        if request is None or request.answered:
            # Its worker was presumed dead (the request went elsewhere under a fresh token) or
            # the broker answered it already: delivering it would answer the request twice.
            self.counters.late_replies_dropped += 1
            return False
        worker.last_heard = now = time.monotonic()  # a reply on its second socket is a beat too
        if kind == P.REPLY:
            self.counters.replies += 1
        else:
            self.counters.errors += 1
        if self.metrics is not None:
            self.metrics.request_latency.observe(now - request.enqueued)
            if kind == P.ERROR:
                self.metrics.count_error(P.peek_error_code(body))
        self._to_client(request.client, kind, body)
        return True

    def _remove_worker(self, identity: bytes, why: str, lost: bool = False) -> None:
        """Forget a worker and put what it held back at the head of the queue. ``lost``: it died
        (not a DISCONNECT), so each request counts one loss, and past max_redispatch losses it is
        answered worker_lost instead."""
        worker = self._workers.pop(identity, None)
        if worker is None:
            return
        if lost:
            self.counters.workers_lost += 1
        requeue = []
        failed = expired = 0  # answered worker_lost here; answered deadline_exceeded before
        for token, request in worker.inflight.items():
            self._owners.pop(token, None)
            if request.answered:
                expired += 1
                continue
            if lost:
                request.lost += 1
                if request.lost > self.config.max_redispatch:
                    failed += 1
                    self.counters.worker_lost += 1
                    self._client_error(request.client, P.peek_id(request.body), P.E_WORKER_LOST,
                                       f"{request.lost} workers died holding this request")
                    continue
                self.counters.redispatched += 1
            requeue.append(request)
        for request in reversed(requeue):  # keep their original order, ahead of newer ones
            self._enqueue(request, front=True)
        self.counters.requeued += len(requeue)
        # Every request it held, by fate: "0 re-queued" alone read as "it held nothing" while its
        # clients got worker_lost.
        log.log(logging.WARNING if lost else logging.INFO,
                "worker %s removed (%s); %d requests re-queued, %d failed worker_lost, %d already answered "
                "deadline_exceeded", worker.name, why, len(requeue), failed, expired)

    def _on_disconnect(self, identity: bytes, incarnation: str | None) -> None:
        """DISCONNECT names its incarnation, since it may come on the worker's reply socket; an
        old incarnation's (late, after its restart's READY) matches nothing."""
        ids = ([w.identity for w in self._workers.values() if w.incarnation == incarnation]
               if incarnation else [identity])
        for worker_identity in ids:
            self._remove_worker(worker_identity, "said DISCONNECT")

    # ---------------------------------------------------- heartbeats, expiry

    def _check_liveness(self, now: float) -> None:
        """Remove every worker silent for heartbeat_liveness intervals; re-dispatch what it held."""
        limit = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for worker in [w for w in self._workers.values() if now - w.last_heard > limit]:
            self._remove_worker(worker.identity, f"silent for {now - worker.last_heard:.1f} s", lost=True)

    def _beat_workers(self) -> None:
        frames = P.heartbeat_frames()
        for worker in list(self._workers.values()):
            if not self._send_worker(worker.identity, frames):
                self._remove_worker(worker.identity, "unreachable", lost=True)

    def _check_open_files(self, now: float) -> None:
        """Say when the process is out of file descriptors, and when it is no longer. ZeroMQ reports
        neither: out of them, its listener cannot accept, so new clients wait unanswered (theirs is
        'nothing heard from the broker') while its I/O thread retries the accept in a busy loop."""
        why = out_of_files()
        if why is None:
            if self._out_of_files is not None:
                log.info("file descriptors are free again after %.0f s: new client connections are accepted",
                         now - self._out_of_files[0])
                self._out_of_files = None
            return
        since, said = self._out_of_files or (now, None)
        if said is None or now - said >= OUT_OF_FILES_REPEAT_S:
            lasting = f" (for {now - since:.0f} s)" if said is not None else ""
            log.warning("cannot accept new connections%s: %s; clients and workers connecting now wait, "
                        "unanswered, until some connection closes", lasting, why)
            said = now
        self._out_of_files = (since, said)

    def _expire_queued(self, now: float) -> None:
        """Answer queued requests whose deadline passed (also done at dispatch)."""
        if not any(r.deadline is not None and r.deadline <= now for r in self._queue):
            return
        keep = collections.deque()
        for request in self._queue:
            if request.deadline is not None and request.deadline <= now:
                self._expire(request, "in the broker's queue")
            else:
                keep.append(request)
        self._queue = keep
        self._queue_bytes = sum(len(r.body) for r in keep)

    def _expire_held(self, now: float) -> None:
        """Answer requests a worker holds one interval past their deadline (the worker should have
        answered deadline_exceeded itself: it is hung). The worker keeps the credit until it
        answers or is removed; its late answer is dropped."""
        grace = self.config.heartbeat_interval_s
        for worker in self._workers.values():
            for request in worker.inflight.values():
                if not request.answered and request.deadline is not None and request.deadline + grace <= now:
                    request.answered = True
                    self._expire(request, f"held by worker {worker.name}")

    def _expire(self, request: _Request, where: str) -> None:
        self.counters.expired += 1
        self._client_error(request.client, P.peek_id(request.body), P.E_DEADLINE,
                           f"the request's deadline passed {where}")

    # ------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Hand queued requests to the workers with the most free credit; a worker found gone on
        the way is removed and what it was being sent goes to the others."""
        while self._dispatch_round():
            pass

    def _dispatch_round(self) -> bool:
        """One round: assign queued requests, a batch at a time (up to its batch_size and free credit)
        to the worker with the most free credit, so a burst fills batches rather than spreading one
        request per worker; then send each worker its share in as few messages as it takes (REQUESTS
        of up to its requests_per_message, else single REQUESTs). True when a send found a worker
        gone: its share went back to the head of the queue, and the caller runs another round."""
        shares: dict[bytes, list[tuple[bytes, bytes, float, float | None]]] = {}
        while self._queue and self._workers:
            worker = max(self._workers.values(), key=_free_credit)
            take = min(_free_credit(worker), worker.batch_size)
            if take <= 0:
                break
            share = shares.setdefault(worker.identity, [])
            while take > 0 and self._queue:
                request = self._queue.popleft()
                self._queue_bytes -= len(request.body)
                now = time.monotonic()
                left = None if request.deadline is None else request.deadline - now
                if left is not None and left <= 0:
                    self._expire(request, "before dispatch")
                    continue
                # A fresh token on every dispatch: a late answer to an earlier one matches nothing.
                token = self._next_token.to_bytes(P.TOKEN_BYTES, "big")
                self._next_token = (self._next_token + 1) & _TOKEN_MASK
                worker.inflight[token] = request
                self._owners[token] = worker.identity
                share.append((token, request.body, now - request.enqueued, left))
                take -= 1
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - request.enqueued)
        gone = False
        for identity, share in shares.items():
            if share and not self._send_share(self._workers[identity], share):
                gone = True
                worker = self._workers[identity]
                for token, *_ in reversed(share):  # back at the head, in their order
                    self._owners.pop(token, None)
                    self._enqueue(worker.inflight.pop(token), front=True)
                self._remove_worker(identity, "unreachable", lost=True)
        return gone

    def _send_share(self, worker: _WorkerState, share: list[tuple[bytes, bytes, float, float | None]]) -> bool:
        """Send ``share`` to ``worker``; False when its socket is gone. A REQUESTS message holds at
        most the worker's requests_per_message, and bodies of at most max_request_bytes in all (the
        most one REQUEST may carry, which the worker's MAXMSGSIZE must take: so must this)."""
        if worker.per_message == 1:
            return all(self._send_worker(worker.identity, P.request_frames(*item)) for item in share)
        start, size = 0, 0
        for i, item in enumerate(share):
            if i > start and (i - start == worker.per_message or size + len(item[1]) > self.config.max_request_bytes):
                if not self._send_worker(worker.identity, P.requests_frames(share[start:i])):
                    return False
                start, size = i, 0
            size += len(item[1])
        return self._send_worker(worker.identity, P.requests_frames(share[start:]))

    # ---------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Pool statistics: broker counters, each worker's last reported counters, and ``totals``: the
        worker counters summed over every worker process heard from (those gone included), which only
        grow."""
        workers = {w.name: {"pid": w.pid, "capacity": w.capacity, "backend": w.backend,
                            "inflight": len(w.inflight), **w.stats, **_settings(w.ready)}
                   for w in self._workers.values()}
        totals = dict(self.pool_totals.counters)
        return {"broker": dict(self.counters.__dict__), "queue": len(self._queue),
                "queue_bytes": self._queue_bytes, "draining": self._draining_until is not None,
                "workers": workers, "totals": totals,
                **security.server_stats(self._auth)}

    def _print_stats(self) -> None:
        """One line: inferences/s (replies forwarded, so real requests only) and batch fill."""
        now = time.monotonic()
        stats = self.stats()
        replies, batches = self.counters.replies, stats["totals"]["batches"]
        inferences = stats["totals"]["inferences"]
        if self._last_totals is not None:
            then, last_replies, last_batches, last_inferences = self._last_totals
            rate = (replies - last_replies) / max(now - then, 1e-9)
            d_batches = batches - last_batches
            fill = (inferences - last_inferences) / d_batches if d_batches > 0 else 0.0
            inflight = sum(w["inflight"] for w in stats["workers"].values())
            print(f"inferences/s {rate:8.1f} | batch fill {fill:4.2f} | workers {len(self._workers)} "
                  f"| in flight {inflight} | queued {stats['queue']} | total {replies}",
                  file=self._stats_out, flush=True)
        self._last_totals = (now, replies, batches, inferences)


# ------------------------------------------------------------------- CLI

def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by bertpool-broker and bertpool-serve (the heartbeat and message-size flags,
    which workers share, come from common.cli.add_link_arguments)."""
    d = BrokerConfig()
    add_address_arguments(parser, bind=True)
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a worker before clients get BUSY, >= 1 "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue-bytes", type=int, default=d.max_queue_bytes,
                        help="bytes of requests waiting for a worker before clients get BUSY "
                             "(default: %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="larger requests are refused with too_large (default: %(default)s)")
    parser.add_argument("--frontend-sndhwm-msgs", type=int, default=d.frontend_sndhwm_msgs,
                        help="replies queued for one client that does not read before further ones "
                             "are dropped (default: %(default)s)")
    parser.add_argument("--frontend-rcvhwm-msgs", type=int, default=d.frontend_rcvhwm_msgs,
                        help="messages read ahead from one client before ZeroMQ stops reading it, so a "
                             "flood pushes back instead of growing memory (default: %(default)s)")
    parser.add_argument("--max-redispatch", type=int, default=d.max_redispatch,
                        help="times a request is re-sent after the worker holding it died, before it "
                             "fails with worker_lost (default: %(default)s)")
    parser.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                        help="on SIGTERM, longest wait for requests in flight to finish "
                             "(default: %(default)s)")
    security.add_server_arguments(parser)
    parser.add_argument("--metrics-address", metavar="HOST:PORT", default=d.metrics_address,
                        help="serve Prometheus metrics for the whole pool at http://HOST:PORT/metrics; "
                             "a bare PORT means 127.0.0.1 (needs the [metrics] extra; default: off)")
    parser.add_argument("--busy-poll-us", type=float, default=d.busy_poll_us,
                        help=f"at low load (nothing queued, no more requests held than workers), after each "
                             f"message poll without sleeping this many microseconds, at most {MAX_BUSY_POLL_US}: "
                             f"each request skips wake-ups (about 0.1 ms on a VM) for up to a core of CPU "
                             f"(default: off)")


def broker_config_from_args(args: argparse.Namespace, stats_interval_s: float) -> BrokerConfig:
    """Build a BrokerConfig from parsed flags (raises ConfigError on bad values)."""
    return BrokerConfig(frontend=args.address, backend=args.worker_address,
                        max_queue=args.max_queue, max_queue_bytes=args.max_queue_bytes,
                        max_request_bytes=args.max_request_bytes, max_message_bytes=args.max_message_bytes,
                        frontend_rcvhwm_msgs=args.frontend_rcvhwm_msgs,
                        stats_interval_s=stats_interval_s, frontend_sndhwm_msgs=args.frontend_sndhwm_msgs,
                        heartbeat_interval_s=args.heartbeat_interval_s,
                        heartbeat_liveness=args.heartbeat_liveness, max_redispatch=args.max_redispatch,
                        drain_timeout_s=args.drain_timeout_s,
                        curve=security.server_config_from_args(args),
                        metrics_address=args.metrics_address, busy_poll_us=args.busy_poll_us)


def main(argv: list[str] | None = None) -> int:
    """bertpool-broker: run the broker alone (workers join with bertpool-workers)."""
    parser = argparse.ArgumentParser(
        prog="bertpool-broker",
        description="Run the bertpool broker: clients connect to --address, workers to --worker-address. "
                    "SIGTERM drains: new requests are refused, those in flight get --drain-timeout-s. "
                    "SIGHUP reads the CURVE allow-lists again.")
    add_broker_arguments(parser)
    add_link_arguments(parser)
    parser.add_argument("--stats-interval-s", type=float, default=1.0,
                        help="print inferences/s this often, at least 0.1 s; 0 disables (default: %(default)s)")
    add_exit_status(parser, "0 stopped (SIGTERM, Ctrl-C) after draining, 2 it could not start (a bad flag, an "
                            "address in use, unreadable CURVE keys)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = broker_config_from_args(args, args.stats_interval_s)  # each address checked on its own
        # The metrics endpoint on neither tcp port, checked before anything binds (as bertpool-serve
        # does): its server starts only once both sockets are bound.
        check_distinct_listeners({"--metrics-address": args.metrics_address},
                                 endpoints={"--address": args.address, "--worker-address": args.worker_address})
        broker = Broker(config)
        broker.bind()
    except BertpoolError as exc:
        return report_error("bertpool-broker", exc)
    install_stop_handlers(broker.stop)
    install_reload_handler(broker.reload_allow_lists)
    print(f"bertpool-broker: clients on {args.address}, workers on {args.worker_address}", flush=True)
    broker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
