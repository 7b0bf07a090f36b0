"""The broker: routes client requests to workers by credit, and replies back.

Two ROUTER sockets: ``frontend`` (clients' DEALERs) and ``backend`` (workers'
DEALERs). A worker's READY announces its capacity; the broker hands it at most
that many requests at a time (credit-based: a reply returns one credit), always
to the worker with the most free credit, so a slow worker never blocks the
others. Requests no worker can take wait in a bounded FIFO queue; when that is
full the client gets BUSY at once. The broker tracks which requests each
worker holds; a worker that says DISCONNECT (or turns out to be gone when we
send to it, or is replaced by its restart: see READY in the protocol) has its
requests put back at the head of the queue.

A client that stops reading cannot stall the broker or grow its memory
without bound: at most ``frontend_sndhwm_msgs`` replies wait for one client,
and further ones are dropped and counted (``dropped``), never blocked on.

Bodies are never decoded on the request path: routing uses only the version
and kind frames and the broker's own 8-byte token.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import zmq

from ..common import protocol as P
from ..common import security
from ..common.cli import install_stop_handlers, report_error, setup_logging
from ..common.errors import BertpoolError, ConfigError, ProtocolError

log = logging.getLogger("bertpool.broker")


@dataclass(frozen=True)
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"   # where clients connect (tcp:// or ipc://)
    backend: str = "tcp://127.0.0.1:5556"    # where workers connect (tcp:// or ipc://)
    max_queue: int = 4096                    # requests waiting for a worker before BUSY (>= 1)
    max_request_bytes: int = 1 << 20         # larger request bodies are refused (too_large)
    stats_interval_s: float = 0.0            # print a stats line this often (0 = never)
    frontend_sndhwm_msgs: int = 1000         # replies queued for one client before more are dropped
    curve: security.CurveServerConfig | None = None  # CURVE on both links; None = plain text

    def __post_init__(self) -> None:
        # 0 would make every request BUSY: each one is queued before any worker can take it.
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {self.max_queue}")
        # 0 is ZeroMQ's "no limit": replies to a client that stops reading would pile up forever.
        if self.frontend_sndhwm_msgs < 1:
            raise ConfigError(f"frontend_sndhwm_msgs must be >= 1, got {self.frontend_sndhwm_msgs}")
        P.check_endpoint("frontend address", self.frontend)
        P.check_endpoint("backend address", self.backend)


@dataclass
class _Request:
    client: bytes        # the client's ROUTER identity
    body: bytes          # the request body, untouched
    enqueued: float      # time.monotonic() when it reached the broker


@dataclass
class _WorkerState:
    identity: bytes
    name: str                   # unique among registered workers (the key in stats())
    incarnation: str            # the worker process's own id (or its socket's, if it sent none)
    capacity: int
    slot: str | None = None     # supervisor slot; a READY for it from another socket replaces this one
    pid: int | None = None
    backend: str | None = None  # what READY said it serves (echo, tf, neuron)
    inflight: dict[bytes, _Request] = field(default_factory=dict)  # token -> request
    stats: dict[str, int] = field(default_factory=dict)            # last STATS counters

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)


@dataclass
class BrokerCounters:
    requests: int = 0     # REQUESTs accepted into the queue
    replies: int = 0      # REPLYs forwarded to clients (any dropped on the way are in dropped too)
    errors: int = 0       # ERRORs sent to clients (ours and workers')
    busy: int = 0         # BUSY answers
    requeued: int = 0     # requests put back after their worker left
    dropped: int = 0      # messages for clients dropped: client gone, or frontend_sndhwm_msgs waiting


class Broker:
    """Route requests and replies until stop(); see the module docstring."""

    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None,
                 stats_out: TextIO | None = None) -> None:
        self.config = config
        self.counters = BrokerCounters()
        self._ctx = context or zmq.Context.instance()
        self._workers: dict[bytes, _WorkerState] = {}
        self._queue: collections.deque[_Request] = collections.deque()
        # token -> identity of the worker holding it. Replies are matched by token
        # alone: a worker may answer on another socket than the one it was sent on.
        self._owners: dict[bytes, bytes] = {}
        self._next_token = 0
        self._stop = threading.Event()
        self._stats_out = stats_out or sys.stdout
        self._last_totals: tuple[float, int, int, int] | None = None
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self._auth: security.Authenticator | None = None  # ZAP handler while CURVE is on

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
            sock.setsockopt(zmq.RCVHWM, 0)
        # Credit bounds what waits for a worker; only a client that stops reading needs a bound here.
        self.backend.setsockopt(zmq.SNDHWM, 0)
        self.frontend.setsockopt(zmq.SNDHWM, self.config.frontend_sndhwm_msgs)
        for sock, endpoint in ((self.frontend, self.config.frontend), (self.backend, self.config.backend)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise ConfigError(f"cannot bind {endpoint}: {exc}") from exc

    def stop(self) -> None:
        """Ask run() to return (thread- and signal-safe)."""
        self._stop.set()

    def close(self) -> None:
        for sock in (self.frontend, self.backend):
            if sock is not None:
                sock.close(linger=0)
        self.frontend = self.backend = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def run(self) -> None:
        """Serve until stop(); binds first if needed, closes the sockets on return."""
        if self.frontend is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        next_stats = time.monotonic() + (self.config.stats_interval_s or 3600.0)
        try:
            while not self._stop.is_set():
                # The poll timeout only bounds how late stop() and stats are noticed.
                wait_ms = max(0, min(200, int((next_stats - time.monotonic()) * 1000)))
                events = dict(poller.poll(wait_ms))
                if self.backend in events:
                    self._drain(self.backend, self._on_backend)
                if self.frontend in events:
                    self._drain(self.frontend, self._on_frontend)
                self._dispatch()
                if self.config.stats_interval_s and time.monotonic() >= next_stats:
                    self._print_stats()
                    next_stats = time.monotonic() + self.config.stats_interval_s
        finally:
            self.close()

    @staticmethod
    def _drain(sock: zmq.Socket, handler) -> None:
        # Bounded, so one busy side cannot starve the other.
        for _ in range(512):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    # -------------------------------------------------------------- clients

    def _on_frontend(self, frames: list[bytes]) -> None:
        client = frames[0]
        if len(frames) < 3:
            return self._client_error(client, None, P.E_BAD_FRAMES,
                                      f"expected [version, kind, body], got {len(frames) - 1} frames")
        if frames[1] != P.VERSION:
            return self._client_error(client, None, P.E_BAD_VERSION,
                                      f"unknown protocol version {frames[1][:16]!r}; this broker speaks "
                                      f"{P.VERSION.decode()}")
        kind = frames[2]
        if len(frames) != 4:
            return self._client_error(client, None, P.E_BAD_FRAMES,
                                      f"expected [version, kind, body], got {len(frames) - 1} frames")
        body = frames[3]
        if kind == P.REQUEST:
            return self._accept(client, body)
        if kind == P.STATS:
            return self._on_stats(client, body)
        return self._client_error(client, P.peek_id(body), P.E_BAD_KIND,
                                  f"clients may send REQUEST or STATS, not {kind[:8]!r}")

    def _accept(self, client: bytes, body: bytes) -> None:
        if len(body) > self.config.max_request_bytes:
            return self._client_error(client, P.peek_id(body), P.E_TOO_LARGE,
                                      f"request of {len(body)} bytes exceeds {self.config.max_request_bytes}")
        if len(self._queue) >= self.config.max_queue:
            self.counters.busy += 1
            self._to_client(client, P.BUSY, P.busy_body(
                P.peek_id(body), f"queue full ({self.config.max_queue} waiting); retry later"))
            return None
        self.counters.requests += 1
        self._queue.append(_Request(client, body, time.monotonic()))
        return None

    def _on_stats(self, client: bytes, body: bytes) -> None:
        try:
            request_id = P.parse_stats_request(body)
        except ProtocolError as exc:
            return self._client_error(client, P.peek_id(body), exc.code, f"STATS {exc.message}")
        self._to_client(client, P.STATS, P.stats_reply(request_id, self.stats()))
        return None

    def _client_error(self, client: bytes, request_id: Any, code: str, message: str) -> None:
        self.counters.errors += 1
        self._to_client(client, P.ERROR, P.error_body(request_id, code, message))

    def _to_client(self, client: bytes, kind: bytes, body: bytes) -> bool:
        """Send without ever blocking; False (counted in ``dropped``) when the client is gone
        or already has frontend_sndhwm_msgs messages waiting."""
        try:
            self.frontend.send_multipart([client, P.VERSION, kind, body], zmq.NOBLOCK)
        except zmq.ZMQError:  # EAGAIN: its queue is full; EHOSTUNREACH: it disconnected
            self.counters.dropped += 1
            return False
        return True

    # -------------------------------------------------------------- workers

    def _on_backend(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) < 4 or frames[1] != P.VERSION:
            log.warning("dropping malformed worker message (%d frames)", len(frames))
            return
        kind = frames[2]
        try:
            if kind in (P.REPLY, P.ERROR) and len(frames) == 5:
                self._on_reply(kind, frames[3], frames[4])
            elif kind == P.READY:
                self._on_ready(identity, P.parse_ready(P.unpack(frames[3])))
            elif kind == P.STATS:
                worker = self._workers.get(identity)
                if worker is not None:
                    worker.stats = {k: v for k, v in P.unpack(frames[3]).items() if isinstance(v, int)}
            elif kind == P.DISCONNECT:
                self._on_disconnect(identity, P.unpack(frames[3]))
            elif kind == P.HEARTBEAT:
                pass  # reserved: liveness tracking comes with the heartbeat issue
            else:
                log.warning("dropping %s from worker", P.KIND_NAMES.get(kind, kind[:8]))
        except ProtocolError as exc:
            log.warning("dropping bad worker message: %s", exc)

    def _on_ready(self, identity: bytes, ready: P.Ready) -> None:
        if identity in self._workers:
            self._workers[identity].capacity = ready.capacity
            return
        # A READY for a registered slot from another socket is that slot's restart: the old
        # process is dead, so what it held goes back to the queue (until heartbeats detect it
        # sooner). Slots are unique to host, supervisor process and core, so this never drops
        # a live worker; names and slot-less READYs replace nothing.
        if ready.slot is not None:
            for old in [w for w in self._workers.values() if w.slot == ready.slot]:
                self._remove_worker(old.identity, "replaced by its restart")
        incarnation = ready.incarnation or identity.hex()
        name = self._unique_name(ready.worker or identity.hex(), incarnation)
        self._workers[identity] = _WorkerState(identity, name, incarnation, ready.capacity, ready.slot,
                                               ready.pid, ready.backend)
        log.info("worker %s ready, capacity %d (%d workers)", name, ready.capacity, len(self._workers))

    def _unique_name(self, name: str, incarnation: str) -> str:
        """``name``, or with its incarnation appended if a live worker already has it."""
        if any(w.name == name for w in self._workers.values()):
            return f"{name}#{incarnation}"
        return name

    def _on_reply(self, kind: bytes, token: bytes, body: bytes) -> None:
        owner = self._owners.pop(token, None)
        worker = self._workers.get(owner) if owner is not None else None
        request = worker.inflight.pop(token, None) if worker is not None else None
        if request is None:
            log.warning("dropping reply for unknown token %s", token.hex())
            return
        if kind == P.REPLY:
            self.counters.replies += 1
        else:
            self.counters.errors += 1
        self._to_client(request.client, kind, body)

    def _remove_worker(self, identity: bytes, why: str) -> None:
        worker = self._workers.pop(identity, None)
        if worker is None:
            return
        for token in worker.inflight:
            self._owners.pop(token, None)
        held = list(worker.inflight.values())
        self._queue.extendleft(reversed(held))  # keep their original order, ahead of newer ones
        self.counters.requeued += len(held)
        log.info("worker %s removed (%s); %d requests re-queued", worker.name, why, len(held))

    def _on_disconnect(self, identity: bytes, body: dict[str, Any]) -> None:
        """DISCONNECT names its incarnation, since it may come on the worker's reply socket; an
        old incarnation's (late, after its restart's READY) matches nothing."""
        incarnation = P.parse_disconnect(body)
        ids = ([w.identity for w in self._workers.values() if w.incarnation == incarnation]
               if incarnation else [identity])
        for worker_identity in ids:
            self._remove_worker(worker_identity, "said DISCONNECT")

    # ------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Hand queued requests to the workers with the most free credit."""
        while self._queue and self._workers:
            worker = max(self._workers.values(), key=lambda w: w.free)
            if worker.free <= 0:
                return
            request = self._queue.popleft()
            token = self._next_token.to_bytes(P.TOKEN_BYTES, "big")
            self._next_token += 1
            queued = P.encode_queue_time(time.monotonic() - request.enqueued)
            try:
                self.backend.send_multipart([worker.identity, P.VERSION, P.REQUEST, token,
                                             request.body, queued])
            except zmq.ZMQError:  # EHOSTUNREACH: the worker is gone
                self._queue.appendleft(request)
                self._remove_worker(worker.identity, "unreachable")
                continue
            worker.inflight[token] = request
            self._owners[token] = worker.identity

    # ---------------------------------------------------------------- stats

    def stats(self) -> dict[str, Any]:
        """Pool statistics: broker counters plus each worker's last reported counters."""
        workers = {w.name: {"pid": w.pid, "capacity": w.capacity, "backend": w.backend,
                            "inflight": len(w.inflight), **w.stats}
                   for w in self._workers.values()}
        totals = {k: sum(w.stats.get(k, 0) for w in self._workers.values())
                  for k in ("inferences", "batches", "padded_rows")}
        return {"broker": dict(self.counters.__dict__), "queue": len(self._queue),
                "workers": workers, "totals": totals, **security.server_stats(self._auth)}

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
    """Flags shared by bertpool-broker and bertpool-serve."""
    parser.add_argument("--address", default="tcp://127.0.0.1:5555",
                        help="where clients connect, tcp:// or ipc:// (default: %(default)s)")
    parser.add_argument("--worker-address", default="tcp://127.0.0.1:5556",
                        help="where workers connect; bind tcp://0.0.0.0:PORT for workers on other "
                             "hosts (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=4096,
                        help="requests waiting for a worker before clients get BUSY, >= 1 "
                             "(default: %(default)s)")
    security.add_server_arguments(parser)


def broker_config_from_args(args: argparse.Namespace, stats_interval_s: float) -> BrokerConfig:
    return BrokerConfig(frontend=args.address, backend=args.worker_address,
                        max_queue=args.max_queue, stats_interval_s=stats_interval_s,
                        curve=security.server_config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    """bertpool-broker: run the broker alone (workers join with bertpool-workers)."""
    parser = argparse.ArgumentParser(
        prog="bertpool-broker",
        description="Run the bertpool broker: clients connect to --address, workers to --worker-address.")
    add_broker_arguments(parser)
    parser.add_argument("--stats-interval-s", type=float, default=1.0,
                        help="print inferences/s this often; 0 disables (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        broker = Broker(broker_config_from_args(args, args.stats_interval_s))
        broker.bind()
    except BertpoolError as exc:
        return report_error("bertpool-broker", exc)
    install_stop_handlers(broker.stop)
    print(f"bertpool-broker: clients on {args.address}, workers on {args.worker_address}", flush=True)
    broker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
