"""One worker process: load a backend, batch requests, run the model, reply.

Two threads, so the model never waits on I/O and batch deadlines stay honest:

* the I/O thread (``Worker.run``) owns the DEALER socket the broker sends
  requests to: it validates and tokenizes each REQUEST, answers bad ones with
  ERROR at once, puts good ones into the :class:`Batcher`, sends STATS every
  ``stats_interval_s`` and HEARTBEAT every ``heartbeat_interval_s`` (from this
  thread, so a long model call never makes the worker look dead).
* the compute thread takes batches (flush at ``batch_size`` or
  ``batch_timeout_ms``), pads them with dummy rows to the model's fixed batch,
  runs the model, and answers every real request (one REPLIES message per batch) on its own DEALER socket
  (ZeroMQ sockets must not be shared between threads; a second socket also
  saves a hop); a failing batch fails each of its requests with ERROR
  ``inference_failed``. On stop it answers what it holds, then says DISCONNECT.

A worker says READY (with its capacity) only after its warm-up batch ran.

Inline mode: when the backend's batches take under ``inline_batch_ms`` (the echo
backend, trivial models), handing each batch to another thread costs more CPU than
the batch itself (a lock, a wake-up, a GIL handover per batch). Then the I/O thread
runs the batches itself, between reads, under the same batcher contract (its poll
wakes when the oldest request's batch is due), and replies on its own socket; a batch
that runs past a heartbeat interval is covered by beats from a small thread of its own
(:class:`_InlineBeats`). When batches get slower (SLOW_RUN in a row
reach the limit, or one takes a quarter of a heartbeat interval), the worker
starts the compute thread and hands batches to it from then on.

Broker loss: when the broker is silent for ``heartbeat_liveness`` intervals,
or says DISCONNECT (it does not know us: it presumed us dead, or it restarted),
the worker closes and reopens its sockets and says READY again under a new
incarnation (logging the DISCONNECT's reason: INFO for shutting_down, WARNING
otherwise). A re-registration answered DISCONNECT again (a draining broker answers
every READY so) waits before the next, doubling up to the liveness window
(REREGISTER_FIRST_BACKOFF); the first DISCONNECT after the broker took our READY is
answered at once again. What it held under the old registration is dropped (counted in
``stale_dropped``): those tokens are void, the broker has re-dispatched the
requests or, after a restart, never knew them. A request whose deadline (the
time left that the broker forwarded) passes before its batch runs is answered
ERROR deadline_exceeded and never computed (``expired``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from .. import __version__
from ..common import protocol as P
from ..common import configdata, security
from ..common.cli import (add_address_arguments, add_exit_status, add_link_arguments, exit_with_parent, ignore_hangup,
                          install_stop_handlers, report_error, setup_logging)
from ..common.defaults import DEFAULT_BACKEND
from ..common.errors import BertpoolError, ConfigError, HandshakeFailed, ModelFormatError, ProtocolError
from ..common.metrics_export import WorkerHistograms
from ..common.fastzmq import close_monitored, open_monitor, recv_many, send_nowait
from ..common.tokenizer import BertTokenizer, serial_tokenizers
from ..compile.runtime import check_vocab, quiet_tensorflow
from .backends import (BACKENDS, MAX_THREADS, Backend, BackendConfig, choose_backend, fallback_vocab_path,
                       load_backend, run_padded, run_rows)
from .batcher import MAX_BATCH_SIZE, MAX_BATCH_TIMEOUT_MS, Batcher, BatcherClosed, BatcherConfig, precise_deadlines

log = logging.getLogger("bertpool.worker")

EXIT_LOAD_FAILED = 2  # exit code for "cannot load the model or configuration": restarting would not help
EXIT_REFUSED = 3  # exit code for "the broker ended the handshake" (refused key, wrong keys): neither would it
MIN_MESSAGE_BYTES = 256 << 10  # smallest max_message_bytes that still takes every valid request
SLOW_RUN = 8  # inline batches in a row over inline_batch_ms that move batching to a compute thread
DEADLINE_SPIN_S = 150e-6  # inline, the last stretch before a batch deadline is polled, not slept
REPLY_HOLD_S = 200e-6  # inline, answers of batches run back to back share a REPLIES while held this long
# A re-registration the broker answered DISCONNECT again (a draining broker answers every READY so) waits
# this many heartbeat intervals before the next, doubling each time it is refused again, up to the
# liveness window (interval x liveness), and back to none once a registration stands. Short enough that
# a refusal by a race costs little; doubling cuts a ping-pong of ~1,500 READYs a second (a 10 s drain)
# to a handful; capped at the window in which either side notices a silent peer, so a broker that
# comes back is rejoined no later than a dead one is noticed.
REREGISTER_FIRST_BACKOFF = 0.1


@dataclass(frozen=True)
class WorkerConfig:
    broker_address: str = DEFAULT_BACKEND             # the broker's worker endpoint
    backend: BackendConfig = field(default_factory=BackendConfig)  # what model to serve
    vocab_path: str | None = None     # WordPiece vocabulary; default: the model's, else a fallback
    batch_size: int = 4               # most real requests in one model call
    batch_timeout_ms: float = 5.0     # longest a request waits for its batch to fill
    capacity: int = 0                 # requests the broker may hand us at once (0 = 2 x batch_size)
    stats_interval_s: float = 1.0     # how often cumulative counters go to the broker
    name: str = ""                    # label in logs and stats (default: worker-<pid>)
    slot: str = ""                    # supervisor slot: the broker lets our READY replace the slot's
                                      # previous process; "" (no supervisor) replaces nothing
    heartbeat_interval_s: float = 1.0  # beat the broker this often; expect its beats as often
    heartbeat_liveness: int = 3       # the broker is presumed dead after this many silent intervals
    max_message_bytes: int = 4 << 20  # ZeroMQ MAXMSGSIZE on our sockets (> the broker's max_request_bytes)
    curve: security.CurveClientConfig | None = None  # CURVE keys for the broker link; None = plain text
    inline_batch_ms: float = 1.0      # run batches on the I/O thread while they take under this long
                                      # (warm-up and every batch measured); 0 = always a compute thread

    def __post_init__(self) -> None:
        P.check_endpoint("worker address", self.broker_address)
        self.batcher_config()  # batch_size in [1, 1024], batch_timeout_ms in [0, 60000]: the batcher's own checks
        # READY carries it as an int the broker's counters take; past INT32_MAX it only overflowed
        # msgpack at READY (a traceback, then a restart loop under a supervisor), never helped.
        if not 0 <= self.capacity <= P.INT32_MAX:
            raise ConfigError(f"capacity must be >= 0 and at most {P.INT32_MAX}, got {self.capacity}")
        if 0 < self.capacity < self.batch_size:  # the broker never hands over more than capacity at once
            raise ConfigError(f"capacity {self.capacity} is below batch_size {self.batch_size}: no batch could "
                              f"fill; give 0 (2 x batch size) or at least the batch size")
        # The broker refuses a READY whose names exceed the protocol's bound (and the worker re-registered
        # forever): say so now. load() checks the whole READY, model labels included, the broker's way.
        for what, value in (("name", self.name), ("slot", self.slot)):
            if len(value) > P.MAX_NAME_LEN:
                raise ConfigError(f"{what} must be at most {P.MAX_NAME_LEN} characters (the wire protocol's "
                                  f"bound), got {len(value)}")
        P.check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        # Below this a valid text request (2 x MAX_TEXT_CHARS of UTF-8) could not reach us.
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= P.INT32_MAX:
            raise ConfigError(f"max_message_bytes must be in [{MIN_MESSAGE_BYTES}, {P.INT32_MAX}], "
                              f"got {self.max_message_bytes}")
        # An inline batch holds back our heartbeats: one that takes inline_bound_s is never inline
        # (the run-time switch, _run_due_inline), so neither may the limit be.
        beat_bound_ms = self.inline_bound_s * 1000
        if not 0 <= self.inline_batch_ms < beat_bound_ms:
            raise ConfigError(f"inline_batch_ms must be >= 0 and below a quarter of the heartbeat interval "
                              f"({beat_bound_ms:g} ms): an inline batch holds back the worker's heartbeats; "
                              f"got {self.inline_batch_ms}")

    def batcher_config(self) -> BatcherConfig:
        """Our batch settings as the Batcher takes them (ConfigError if they are out of range)."""
        return BatcherConfig(self.batch_size, self.batch_timeout_ms)

    @property
    def inline_bound_s(self) -> float:
        """One inline batch this long moves batching to a compute thread: a quarter of a heartbeat
        interval, so the I/O thread's beats are never late by much."""
        return self.heartbeat_interval_s / 4

    @property
    def effective_capacity(self) -> int:
        # Twice the batch lets the next batch fill while the current one computes.
        return self.capacity or 2 * self.batch_size


@dataclass
class _Pending:
    """One validated request waiting in the batcher."""
    token: bytes
    request_id: Any
    features: np.ndarray  # int32 [3, S]: input_ids, input_mask, segment_ids
    queue_ms: float  # time it waited in the broker's queue
    deadline: float | None = None  # absolute on this process's monotonic clock (None: no deadline)
    generation: int = 0            # the registration it came under; a later one voids its token


@dataclass
class WorkerStats:
    """Cumulative counters. Both worker threads update them (the I/O thread counts bad input,
    the compute thread batches), so every update and snapshot takes the lock: no increment is
    lost, and a snapshot never shows half of one batch's update."""
    inferences: int = 0    # real requests answered with a prediction
    batches: int = 0       # model calls
    padded_rows: int = 0   # dummy rows added to fill fixed-size batches
    errors: int = 0        # ERROR replies sent (bad input, failed batch, deadline)
    expired: int = 0       # requests skipped because their deadline passed before their batch ran
    stale_dropped: int = 0  # requests and replies dropped because their registration ended
    reconnects: int = 0    # times we re-registered (broker silent, or it said DISCONNECT)
    dropped_malformed: int = 0  # malformed broker messages dropped
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add each ``counter=delta`` at once, e.g. ``add(batches=1, inferences=3)``."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def as_dict(self) -> dict[str, int]:
        """A consistent snapshot of the counters."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class CpuWaitClock:
    """Seconds the creating thread has spent runnable but waiting for a CPU (Linux's schedstat
    run_delay for that thread); always 0.0 where the kernel does not say. Cheap (one pread)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _InlineBeats:
    """Heartbeats while an inline batch runs long.

    Inline, the I/O thread runs each batch itself and cannot beat meanwhile. Batches are inline
    only while they are quick, but a model that turns slow after warm-up could hold one past the
    broker's liveness window: we would be presumed dead mid-batch, the batch re-queued and its
    answers dropped. This thread watches the batch under way (``since``: when it started, None
    between batches) and, once it has run for a heartbeat interval, beats every half interval on a
    socket of its own (ZeroMQ sockets are single-threaded), naming our registration's incarnation,
    so the broker counts the beat as ours.
    """

    def __init__(self, worker: "Worker") -> None:
        self.since: float | None = None
        self._worker = worker
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{worker.name}-beats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self._worker.config.heartbeat_interval_s
        sock = None
        try:
            while not self._done.wait(interval / 2):
                since = self.since
                if since is None or time.monotonic() - since < interval:
                    continue
                if sock is None:
                    sock = self._worker._open_socket()
                try:
                    send_nowait(sock, P.heartbeat_frames(self._worker.incarnation))
                except zmq.ZMQError:
                    pass  # not connected yet, or its queue is full: the next beat tries again
                while sock.poll(0):  # a DISCONNECT, if the broker no longer knows that incarnation
                    sock.recv_multipart()
        finally:
            if sock is not None:
                sock.close(linger=0)

    def close(self) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    """Serve one backend to one broker until stop() is called."""

    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None,
                 backend: Backend | None = None) -> None:
        """``backend`` overrides ``config.backend`` (an already-built backend, e.g. in tests)."""
        self.config = config
        self.name = config.name or f"worker-{os.getpid()}"
        self.incarnation = P.new_incarnation()  # this process, as the broker tells it from its restart
        self.stats = WorkerStats()
        # Batch wait, compute and fill histograms, sent with the counters in STATS under this
        # process's epoch (kept across re-registrations: the counts are per process).
        self.histograms = WorkerHistograms()
        self.stats_epoch = P.new_incarnation()
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._batcher: Batcher[_Pending] = Batcher(config.batcher_config())
        self.backend: Backend | None = backend
        self.tokenizer: BertTokenizer | None = None
        self.failed = False  # set when the compute thread died of an unexpected error
        self.refused: str | None = None  # why the broker ended our handshake, when that stopped us
        self._sock: zmq.Socket | None = None  # the I/O thread's registration socket
        self._monitor: zmq.Socket | None = None  # handshake events of _sock
        # Why _sock's handshake failed, and whether retrying cannot help (None: it did not fail).
        self._handshake_error: tuple[str, bool] | None = None
        # Bumped (by the I/O thread) at each re-registration; the compute thread reads it to drop
        # what belongs to an older one and to reopen its own socket.
        self._generation = 0
        self.inline = False  # batches run on the I/O thread (set by load(); cleared for good if they get slow)
        self._slow_run = 0  # inline batches in a row that took inline_batch_ms or longer
        self._cpu_wait: Callable[[], float] = lambda: 0.0  # while run() runs: the I/O thread's CpuWaitClock
        self._beats: _InlineBeats | None = None  # while run() runs inline: beats during a long batch
        self._compute_thread: threading.Thread | None = None
        self._model_info: dict[str, str] = {}  # READY's model labels, read from the backend once by load()
        self._token_ids = 0  # feature requests' input_ids must be below this (set by load())
        # The wait before the next re-registration when the broker says DISCONNECT (0: at once);
        # see REREGISTER_FIRST_BACKOFF. I/O thread only.
        self._reregister_backoff_s = 0.0

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load backend and tokenizer, check the READY we will say, and run one warm-up batch (raises
        typed errors)."""
        if self.backend is None:
            self.backend = load_backend(self.config.backend)
        self._check_ready()
        vocab = self.config.vocab_path or self.backend.vocab_path or fallback_vocab_path()
        rows = self.backend.vocab_size
        if rows is not None and (self.config.vocab_path or not self.backend.vocab_checked):
            # bertpool-compile's check (a compiled model's loader already made it on its own vocab.txt): a vocabulary of another size tokenizes to the wrong embedding rows
            # (wrong answers, no error) or past the last one (every batch failing).
            check_vocab(Path(vocab), rows, fix="give --vocab the model's own vocab.txt, or drop --vocab"
                        if self.config.vocab_path else "the model directory is damaged")
        elif self.config.vocab_path is not None and self.backend.name != "echo":
            log.warning("%s: the %s backend cannot tell how many token ids its model takes: --vocab %s is not "
                        "checked against it", self.name, self.backend.name, self.config.vocab_path)
        self.tokenizer = BertTokenizer(vocab, max_seq_length=self.backend.seq_length)
        # The model's embedding rows bound the ids it can take; the vocabulary's only without a model.
        self._token_ids = rows if rows is not None else self.tokenizer.vocab_size
        warm = self.tokenizer.encode_pairs([("warm up", "warm up")])
        self.inline = self._batches_are_quick(warm)

    def _batches_are_quick(self, warm) -> bool:
        """Warm up, and tell whether batches take under inline_batch_ms: one untimed batch (it may pay
        set-up), then up to 5 timed ones; any one under the limit says yes (on a busy host the others
        may have been preempted), two of ten times the limit say no."""
        limit_s = self.config.inline_batch_ms / 1000
        clearly_slow = 0
        for timed in range(6):
            started = time.monotonic()
            run_padded(self.backend, warm.input_ids, warm.input_mask, warm.segment_ids,
                       self.config.batch_size, self._dummy_tokens())
            took_s = time.monotonic() - started
            if not timed:
                continue
            if took_s < limit_s:
                return True
            clearly_slow += took_s >= 10 * limit_s
            if clearly_slow == 2:
                return False
        return False

    def stop(self) -> None:
        """Ask run() to finish: stop taking requests, answer those held, say DISCONNECT."""
        self._stop.set()

    def run(self) -> None:
        """Connect, say READY, and serve until stop(); load() first if not done."""
        if self.tokenizer is None:
            self.load()
        self._cpu_wait = cpu_wait = CpuWaitClock()  # this (the I/O) thread's
        try:
            if self.inline:
                self._beats = _InlineBeats(self)
            else:
                self._start_compute()
            self._register()
            # READY is queued, not yet accepted: a broker that refuses us says so on the handshake.
            log.info("%s loaded, saying READY to %s: backend %s, batch %d, timeout %.1f ms%s", self.name,
                     self.config.broker_address, self.backend.name, self.config.batch_size,
                     self.config.batch_timeout_ms, ", batches inline" if self.inline else "")
            self._io_loop()
        finally:
            self._batcher.close()
            compute = self._compute_thread
            if compute is None:
                self._finish_inline()
            # The compute thread answers what the batcher holds, then says DISCONNECT; we keep
            # beating meanwhile, so a long last batch does not make the broker presume us dead.
            while compute is not None and compute.is_alive():
                compute.join(self.config.heartbeat_interval_s)
                if compute.is_alive() and self._sock is not None:
                    self._send(self._sock, P.heartbeat_frames())
            if self._sock is not None:
                close_monitored(self._sock, self._monitor, linger_ms=2000)
            if self._beats is not None:
                self._beats.close()
            cpu_wait.close()

    def _start_compute(self) -> None:
        """Hand batching to a compute thread from now on (called by the I/O thread, between batches)."""
        self._compute_thread = threading.Thread(target=self._compute_loop, name=f"{self.name}-compute",
                                                daemon=True)
        self._compute_thread.start()
        self.inline = False  # only now: whoever sees it False finds the compute thread running

    def _open_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        security.apply_client(sock, self.config.curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.connect(self.config.broker_address)
        return sock

    def _ready_frames(self) -> list[bytes]:
        """Our READY, as every registration says it (only the incarnation differs between them)."""
        return P.ready_frames(
            self.name, self.config.slot or None, self.incarnation, os.getpid(),
            self.config.effective_capacity, self.backend.name, self.config.batch_size,
            model=self._model_info, version=__version__,
            requests_per_message=min(self.config.effective_capacity, P.MAX_PER_MESSAGE),
            batch_timeout_ms=self.config.batch_timeout_ms)

    def _check_ready(self) -> None:
        """Build our READY once and decode it as the broker will: one it would refuse fails the load
        (exit 2, saying why) instead of a worker re-registering forever, unheard (the broker drops a
        malformed READY and answers DISCONNECT). The model labels are read here, once, so every READY
        says what was checked (its fresh incarnation is always valid)."""
        self._model_info = self.backend.model_info()
        try:
            P.parse_from_worker(self._ready_frames())
        except ProtocolError as exc:
            # The names are checked by WorkerConfig: what is left comes from the model (its manifest).
            raise ModelFormatError(
                f"the broker would refuse this worker's READY, so it could never register: {exc.message} "
                f"(READY's model hash, dtype and target are the compiled model manifest's source.sha256, dtype "
                f"and target)") from None

    def _register(self) -> None:
        """Open the registration socket (watching its handshakes) and say READY (queued until the
        broker is there)."""
        self._sock = self._open_socket()
        self._monitor = open_monitor(self._sock, security.HANDSHAKE_EVENTS, "bertpool-worker")
        self._handshake_error = None
        self._send(self._sock, self._ready_frames())

    def _reconnect(self, why: str, level: int = logging.WARNING, delay_s: float = 0.0) -> None:
        """Drop this registration (its tokens are void) and register afresh (Paranoid Pirate), after
        ``delay_s`` (unregistered meanwhile: nothing to serve or beat for; stop() ends the wait)."""
        log.log(level, "%s: %s; re-registering%s", self.name, why, f" in {delay_s:.2f} s" if delay_s else "")
        self.stats.add(reconnects=1)
        self._generation += 1
        close_monitored(self._sock, self._monitor, linger_ms=0)  # what it still queued belongs to the old registration
        if delay_s:
            self._stop.wait(delay_s)
        self.incarnation = P.new_incarnation()
        self._register()

    def _on_disconnect(self, reason: str) -> None:
        """The broker said DISCONNECT for ``reason``: re-register, saying why: at INFO when the broker is
        shutting down (every clean stop of a pool), else at WARNING (it presumed us dead, or restarted).
        At once, unless the registration before was answered DISCONNECT too: then after a backoff
        (REREGISTER_FIRST_BACKOFF), so a draining broker and its workers never ping-pong."""
        delay_s, interval = self._reregister_backoff_s, self.config.heartbeat_interval_s
        self._reregister_backoff_s = min(max(2 * delay_s, interval * REREGISTER_FIRST_BACKOFF),
                                         interval * self.config.heartbeat_liveness)
        level = logging.INFO if reason == P.DISCONNECT_SHUTDOWN else logging.WARNING
        self._reconnect(f"the broker said DISCONNECT ({reason})", level, delay_s)

    def _read_handshakes(self) -> None:
        """Drain the registration socket's handshake events into _handshake_error (a failure stays
        until a handshake succeeds). Called once a heartbeat interval, so the monitor never fills."""
        while self._monitor.poll(0):
            event, why, final = security.handshake_failure(
                self._monitor.recv_multipart()[0], self.config.broker_address, self.config.curve,
                "--curve-allow-workers")
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_error = None
            elif why is not None:
                self._handshake_error = (why, final)

    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        """Send without blocking: with the broker gone and the queue full, a message is dropped
        (counted in stale_dropped) rather than hang a thread."""
        try:
            send_nowait(sock, frames)
        except zmq.Again:
            self.stats.add(stale_dropped=1)
            return False
        return True

    # ------------------------------------------------------------- I/O side

    def _io_loop(self) -> None:
        precise_deadlines()  # inline, this thread flushes batches at their deadline
        interval = self.config.heartbeat_interval_s
        silence_limit = interval * self.config.heartbeat_liveness
        now = time.monotonic()
        next_stats, next_beat, last_heard = now + self.config.stats_interval_s, now + interval, now
        while not self._stop.is_set():
            wake = min(next_stats, next_beat)
            if self.inline and (due := self._batcher.due_at()) is not None and due <= wake:
                ready = self._await_deadline(due)  # we flush the batcher ourselves, on time
            else:
                ready = self._sock.poll(int(min(200.0, max(0.0, (wake - time.monotonic()) * 1000))))
            if ready:
                batch = recv_many(self._sock, 256)  # bounded drain keeps beats and stats flowing
                last_heard = time.monotonic()  # any message counts as a beat
                reason = self._on_messages(self._sock, batch)
                if reason is not None:
                    self._on_disconnect(reason)
                    last_heard = time.monotonic()
                    continue
            if self.inline:
                self._run_due_inline()
            now = time.monotonic()
            # Judge silence only with nothing waiting to be read: a worker that was itself starved
            # (or stopped) must first hear the beats waiting for it.
            if now - last_heard > silence_limit and not self._sock.poll(0):
                self._read_handshakes()
                why, final = self._handshake_error or ("", False)
                if final:  # silent because it will not talk to us
                    log.error("%s: %s; stopping (restarting cannot help)", self.name, why)
                    self.refused = why
                    self._stop.set()
                    break
                self._reconnect(f"no word from the broker for {now - last_heard:.1f} s"
                                + (f" (the last handshake failed: {why})" if why else ""))
                last_heard = now
            if now >= next_beat:
                self._send(self._sock, P.heartbeat_frames())
                self._read_handshakes()
                next_beat = now + interval
            if now >= next_stats:
                self._send_stats(self._sock)
                next_stats = time.monotonic() + self.config.stats_interval_s

    def _await_deadline(self, due: float) -> bool:
        """Inline mode: wait for a message (True) or for a batch's deadline ``due`` (False), meeting
        it within microseconds. zmq_poll counts whole milliseconds and a thread woken from a sleep is
        late by its wake-up latency (50-100 us here, on a VM), so this polls and sleeps until
        DEADLINE_SPIN_S before ``due`` and polls without blocking from there: at most that much CPU
        per batch flushed at its deadline (only at low load: under load batches fill first)."""
        left_ms = (due - time.monotonic()) * 1000
        spin_ms = DEADLINE_SPIN_S * 1000
        if left_ms - spin_ms >= 1:  # whole milliseconds first (a later turn waits out the rest)
            return bool(self._sock.poll(int(min(200.0, left_ms - spin_ms))))
        if left_ms > spin_ms:
            # Under a millisecond: a message coming meanwhile waits at most this long.
            time.sleep((left_ms - spin_ms) / 1000)
        while time.monotonic() < due:
            if self._sock.poll(0):
                return True
        return bool(self._sock.poll(0))

    def _run_due_inline(self) -> None:
        """Inline mode: run every batch that is due, replying on the registration socket. Batching
        moves to the compute thread for good when SLOW_RUN batches in a row take inline_batch_ms or
        longer, or at once when one batch takes a quarter of a heartbeat interval (our beats must
        not be late). A batch's time is its wall time less what this thread spent waiting for a CPU
        (a busy host preempts cheap batches all the time, and a handoff would then only add CPU);
        time blocked counts, since an accelerator call blocks without using CPU.

        Answers of batches due together leave in one REPLIES (one message, one wake-up of ZeroMQ's
        I/O thread and of the broker, instead of one per batch) as long as the first of them would
        wait no more than REPLY_HOLD_S for it, judged by the last batch's time; the last batch due
        never waits."""
        limit_s = self.config.inline_batch_ms / 1000
        beat_bound_s = self.config.inline_bound_s
        held: list[tuple[bytes, bytes, bytes]] = []
        held_since = took_s = 0.0
        beats = self._beats
        while batch := self._batcher.take_due():
            if held and time.monotonic() - held_since + took_s > REPLY_HOLD_S:
                self._send_answers(self._sock, held)
                held = []
            started, waited = time.monotonic(), self._cpu_wait()
            if beats is not None:
                beats.since = started
            try:
                answers = self._run_batch(batch)
            except Exception:  # a bug, not a model error (those are replies): stop, to be restarted
                log.exception("%s: inline batch failed", self.name)
                self._send_answers(self._sock, held)
                self.failed = True
                self._stop.set()
                return
            finally:
                if beats is not None:
                    beats.since = None
            done = time.monotonic()
            if not held:
                held_since = done
            held += answers
            took_s = done - started
            # Less the wait for a CPU; a batch quicker than the limit is quick either way, and is
            # not asked (in a lone request's path a cold pread costs about 5 us).
            own_s = took_s if took_s < limit_s else took_s - (self._cpu_wait() - waited)
            self._slow_run = self._slow_run + 1 if own_s >= limit_s else 0
            if (self._slow_run >= SLOW_RUN or took_s >= beat_bound_s) and not self._batcher.closed:
                self._send_answers(self._sock, held)
                if self._slow_run >= SLOW_RUN:
                    log.info("%s: %d batches in a row took over %.1f ms (the last %.1f ms); they move to "
                             "a compute thread", self.name, self._slow_run, self.config.inline_batch_ms,
                             took_s * 1000)
                else:
                    log.info("%s: a batch took %.1f ms, a quarter of a heartbeat interval or more; batches "
                             "move to a compute thread", self.name, took_s * 1000)
                self._start_compute()
                return
        self._send_answers(self._sock, held)

    def _finish_inline(self) -> None:
        """Inline mode's last word (the batcher is closed): answer what it holds, then STATS and
        DISCONNECT, all on the registration socket, so nothing can overtake the replies."""
        if self._sock is None:
            return
        self._run_due_inline()
        self._send_stats(self._sock)
        self._send(self._sock, P.worker_disconnect_frames(self.name, self.incarnation))

    def _on_messages(self, sock: zmq.Socket, messages: list[list[bytes]]) -> str | None:
        """Handle broker messages: queue valid REQUESTs, answer bad ones with ERROR at once.
        The reason when the broker said DISCONNECT (the caller re-registers; the rest is dropped),
        else None.

        Text pairs received together are tokenized in one call (about half the
        cost per pair of one call each).
        """
        arrived = time.monotonic()
        parsed: list[tuple[bytes, Any, P.FromBroker, str, Any]] = []
        for frames in messages:
            try:
                message = P.parse_from_broker(frames)
            except ProtocolError as exc:
                self.stats.add(dropped_malformed=1)
                log.debug("%s: dropping malformed broker message: %s", self.name, exc)
                continue
            if message.kind == P.DISCONNECT:
                self.stats.add(stale_dropped=len(parsed))  # received under the registration that ends
                return message.reason
            # A beat or a request: the broker took our READY, so its next DISCONNECT is re-registered at once.
            self._reregister_backoff_s = 0.0
            for one in (message.requests if message.kind == P.REQUESTS
                        else [message] if message.kind == P.REQUEST else ()):
                request = self._parse_request(sock, one)
                if request is not None:
                    parsed.append(request)
        texts = [value for _, _, _, kind, value in parsed if kind == "text"]
        rows = None  # [3, N, S]: input_ids, input_mask, segment_ids; [:, i] is text request i's
        try:
            if texts:
                rows = self.tokenizer.encode_stacked(texts)
        except Exception as exc:  # not expected for validated str input; fail those requests only
            log.exception("%s: tokenizer failed on %d pairs", self.name, len(texts))
            for token, request_id, _, kind, _ in parsed:
                if kind == "text":
                    self._reply_error(sock, token, request_id, P.E_BAD_TEXT, f"tokenizer failed: {exc}")
            parsed = [p for p in parsed if p[3] != "text"]
        row, generation, pending = 0, self._generation, []
        for token, request_id, message, kind, value in parsed:
            if kind == "text":
                value = rows[:, row]
                row += 1
            else:
                value = np.stack(value)
            deadline = None if message.deadline_ms is None else arrived + message.deadline_ms / 1000.0
            pending.append(_Pending(token, request_id, value, message.queue_ms, deadline, generation))
        # One handoff for the whole burst: one lock, at most one wake-up of the compute thread.
        self._batcher.put_many(pending, arrived)
        return None

    def _reply_error(self, sock: zmq.Socket, token: bytes, request_id: Any, code: str, message: str) -> None:
        self.stats.add(errors=1)
        self._send(sock, P.error_frames(token, P.error_body(request_id, code, message)))

    def _parse_request(self, sock: zmq.Socket, message: P.FromBroker):
        """Validate one REQUEST's body; returns (token, id, message, kind, value) or None (answered)."""
        token, raw = message.token, message.body
        try:
            body = P.unpack(raw)
            request_id = P.check_id(body)
            # parse_request reads the text and ignores features beside it: a request carrying both is
            # ambiguous (which did the sender mean?), so it is refused, never answered from either.
            if ("text_a" in body or "text_b" in body) and any(f in body for f in P.FEATURE_FIELDS):
                raise ProtocolError(P.E_BAD_FIELD, "request carries both text (text_a, text_b) and features "
                                                   "(input_ids, input_mask, segment_ids): send one or the other")
            what, value = P.parse_request(body, self.backend.seq_length)
            if what == "features":
                self._check_features(*value)
        except ProtocolError as exc:
            self._reply_error(sock, token, P.peek_id(raw), exc.code, exc.message)
            return None
        return token, request_id, message, what, value

    def _check_features(self, ids: np.ndarray, mask: np.ndarray, segments: np.ndarray) -> None:
        """Reject feature values the model cannot take, so they never fail a shared batch."""
        if int(ids.min(initial=0)) < 0 or int(ids.max(initial=0)) >= self._token_ids:
            raise ProtocolError(P.E_BAD_FIELD, f"input_ids: token id outside the model's vocabulary "
                                               f"[0, {self._token_ids})")
        # min/max, not np.isin: the same test for integer arrays at a fraction of the cost.
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise ProtocolError(P.E_BAD_FIELD, "input_mask: values must be 0 or 1")
        if not mask.any():  # nothing to classify: attention over no token at all
            raise ProtocolError(P.E_BAD_FIELD, "input_mask: no real token (every value is 0)")
        if segments.size and (int(segments.min()) < 0 or int(segments.max()) > 1):
            raise ProtocolError(P.E_BAD_FIELD, "segment_ids: values must be 0 or 1")

    def _send_stats(self, sock: zmq.Socket) -> None:
        self._send(sock, P.stats_frames(self.stats.as_dict(), self.stats_epoch, self.histograms.as_wire()))

    # --------------------------------------------------------- compute side

    def _dummy_tokens(self) -> tuple[int, int]:
        return self.tokenizer.cls_id, self.tokenizer.sep_id

    def _compute_loop(self) -> None:
        # Replies leave on this thread's own socket: no hop back through the I/O
        # thread. The broker matches them by token, whichever socket they come on.
        out, out_generation = self._open_socket(), self._generation
        precise_deadlines()
        try:
            while True:
                try:
                    batch = self._batcher.next_batch()
                except BatcherClosed:
                    break
                generation = self._generation
                answers = self._run_batch(batch)
                if generation != self._generation:
                    # Re-registered while the batch ran: its tokens are void.
                    self.stats.add(stale_dropped=len(answers))
                    answers = []
                if out_generation != self._generation:
                    # Re-registered: what this socket still queued is void; start clean.
                    out.close(linger=0)
                    out, out_generation = self._open_socket(), self._generation
                self._send_answers(out, answers)
        except Exception:  # a bug, not a model error: stop, so the supervisor restarts us
            log.exception("%s: compute thread failed", self.name)
            self.failed = True
            self._stop.set()
        finally:
            # Last word, on the same socket as the replies so it cannot overtake them;
            # the broker re-queues whatever we still held.
            self._send_stats(out)
            self._send(out, P.worker_disconnect_frames(self.name, self.incarnation))
            out.close(linger=5000)

    def _send_answers(self, sock: zmq.Socket, answers: list[tuple[bytes, bytes, bytes]]) -> None:
        """Answers, ``(REPLY or ERROR, token, body)`` each, in as few REPLIES messages as the
        protocol allows (MAX_PER_MESSAGE answers each: a batch, or the held answers of several, may
        hold more)."""
        for start in range(0, len(answers), P.MAX_PER_MESSAGE):
            chunk = answers[start:start + P.MAX_PER_MESSAGE]
            if not self._send(sock, P.replies_frames(chunk)):
                self.stats.add(stale_dropped=len(chunk) - 1)  # _send counted the message as one

    def _run_batch(self, batch: list[tuple[float, _Pending]]) -> list[tuple[bytes, bytes, bytes]]:
        """Run one batch; return its answers, ``(REPLY or ERROR, token, body)`` for each request still
        wanted: requests of an older registration are dropped, expired ones answered deadline_exceeded."""
        assert batch, "the batcher never hands out an empty batch"
        generation, now = self._generation, time.monotonic()
        live = [(arrived, it) for arrived, it in batch if it.generation == generation]
        if len(live) < len(batch):
            self.stats.add(stale_dropped=len(batch) - len(live))
        out = []
        batch = []
        for arrived, it in live:
            if it.deadline is not None and it.deadline <= now:
                self.stats.add(expired=1, errors=1)
                out.append((P.ERROR, it.token, P.error_body(
                    it.request_id, P.E_DEADLINE, "the request's deadline passed before its batch ran")))
            else:
                batch.append((arrived, it))
        if not batch:
            return out
        return out + self._compute(batch)

    def _compute(self, batch: list[tuple[float, _Pending]]) -> list[tuple[bytes, bytes, bytes]]:
        """Run the model on a non-empty batch; one REPLY (or ERROR if it fails) per request."""
        started = time.monotonic()
        items = [item for _, item in batch]
        try:
            probs = run_rows(self.backend, [it.features for it in items], self.config.batch_size,
                             self._dummy_tokens())
        except Exception as exc:  # any model failure fails the whole batch, never the worker
            log.exception("%s: batch of %d failed", self.name, len(items))
            self.stats.add(errors=len(items))
            message = f"model call failed: {type(exc).__name__}: {exc}"
            return [(P.ERROR, it.token, P.error_body(it.request_id, P.E_INFERENCE, message))
                    for it in items]
        done = time.monotonic()
        step = self.backend.batch_size or self.config.batch_size
        padded = -(-len(items) // step) * step - len(items)
        self.stats.add(batches=1, inferences=len(items), padded_rows=padded)
        self.histograms.observe_batch([started - arrived for arrived, _ in batch], done - started)
        compute_ms = round((done - started) * 1000, 3)
        oldest_ms = round((started - batch[0][0]) * 1000, 3)
        # Rows as Python floats: the reply bodies and the finiteness check need no numpy call more.
        rows = (probs if probs.dtype == np.float32 else probs.astype(np.float32)).tolist()
        bodies = P.reply_bodies([it.request_id for it in items], rows, [{
                    "queue_ms": it.queue_ms,
                    "batch_wait_ms": round((started - arrived) * 1000, 3),
                    "batch_oldest_ms": oldest_ms,
                    "compute_ms": compute_ms,
                    "batch_size": len(items)} for (arrived, _), it in zip(batch, items)])
        answers = [(P.REPLY, it.token, body) for it, body in zip(items, bodies)]
        if all(map(math.isfinite, itertools.chain.from_iterable(rows))):  # the rule; which rows are
            return answers                                                # not is asked only if some is not
        return self._fail_non_finite(items, answers, [all(map(math.isfinite, row)) for row in rows])

    def _fail_non_finite(self, items: list[_Pending], answers: list[tuple[bytes, bytes, bytes]],
                         finite: list[bool]) -> list[tuple[bytes, bytes, bytes]]:
        """``answers`` with each row whose probabilities are not finite (NaN, inf: an overflow in the
        model) made an ERROR inference_failed: a NaN is no prediction, and argmax would call it 0."""
        bad = finite.count(False)
        log.error("%s: the model returned non-finite probabilities for %d of %d rows", self.name, bad, len(items))
        self.stats.add(errors=bad)
        message = "the model returned non-finite probabilities (NaN or inf) for this row"
        return [answer if ok else (P.ERROR, it.token, P.error_body(it.request_id, P.E_INFERENCE, message))
                for answer, ok, it in zip(answers, finite, items)]


# ------------------------------------------------------------------- CLI

def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by bertpool-worker, bertpool-workers and bertpool-serve."""
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="model backend: tf (TensorFlow SavedModel or compiled model), neuron "
                             "(tensorflow-neuron), echo (no model: fake answers for testing the pool). "
                             "Default: the model's own (tf, or neuron for a model compiled with --target "
                             "neuron) when --model is given, else echo")
    parser.add_argument("--model", "--dir", dest="model", metavar="DIR",
                        help="model directory for the tf and neuron backends")
    parser.add_argument("--vocab", metavar="FILE",
                        help="WordPiece vocab.txt (default: the model's own, else a built-in "
                             "character vocabulary for echo); with a model, it must have as many tokens as the "
                             "model's word embeddings have rows")
    parser.add_argument("--batch-size", type=int, default=4,
                        help=f"most requests per model call, 1 to {MAX_BATCH_SIZE} (default: %(default)s)")
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0,
                        help=f"longest a request waits for its batch to fill, 0 to {MAX_BATCH_TIMEOUT_MS:.0f} "
                             f"(default: %(default)s)")
    parser.add_argument("--capacity", type=int, default=0,
                        help=f"requests the broker may hand one worker at once, at least the batch size and at "
                             f"most {P.INT32_MAX} (default: 2 x batch size)")
    parser.add_argument("--inline-batch-ms", type=float, default=WorkerConfig.inline_batch_ms,
                        help="run batches on the worker's I/O thread, without a handoff, while they take "
                             "under this long (echo, trivial models), below a quarter of the heartbeat "
                             "interval; 0 = always a compute thread (default: %(default)s)")
    parser.add_argument("--echo-delay-ms", type=float, default=0.0,
                        help="echo backend: simulated compute time per batch, at most a day (default: "
                             "%(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help=f"tf backend: intra-op threads per worker, at most {MAX_THREADS} (default: cores / "
                             f"parallel)")
    add_link_arguments(parser)


def worker_config_from_args(args: argparse.Namespace, broker_address: str,
                            threads: int | None = None, name: str = "", slot: str = "") -> WorkerConfig:
    """Build a WorkerConfig from parsed flags (raises ConfigError on bad values)."""
    if args.vocab is not None and not os.path.isfile(args.vocab):  # now, not when each worker loads
        raise ConfigError(f"--vocab {args.vocab} is not a file")
    backend = choose_backend(args.backend, args.model)
    if args.echo_delay_ms and backend != "echo":  # a flag that would do nothing is a mistake to point out
        raise ConfigError(f"--echo-delay-ms is for the echo backend; the {backend} backend runs a model")
    if args.threads > 0 and backend == "echo":
        raise ConfigError("--threads sets TensorFlow's threads; the echo backend runs no model")
    return WorkerConfig(
        broker_address=broker_address,
        backend=BackendConfig(name=backend, model_dir=args.model,
                              echo_delay_ms=args.echo_delay_ms,
                              threads=args.threads if threads is None else threads),
        vocab_path=args.vocab, batch_size=args.batch_size, batch_timeout_ms=args.batch_timeout_ms,
        capacity=args.capacity, name=name, slot=slot, heartbeat_interval_s=args.heartbeat_interval_s,
        heartbeat_liveness=args.heartbeat_liveness, max_message_bytes=args.max_message_bytes,
        curve=security.client_config_from_args(args),
        inline_batch_ms=args.inline_batch_ms)


def build_parser() -> argparse.ArgumentParser:
    """bertpool-worker's flags: a human's, or the supervisor's ``--config-json FILE``."""
    parser = argparse.ArgumentParser(
        prog="bertpool-worker",
        description="Run one bertpool worker: load a model, batch requests from the broker, reply.")
    add_exit_status(parser, f"0 stopped (SIGTERM, Ctrl-C), 1 failed while serving (its supervisor restarts it), "
                            f"{EXIT_LOAD_FAILED} it cannot load its model or configuration (restarting would not "
                            f"help), {EXIT_REFUSED} the broker refused its handshake (CURVE keys), 130 Ctrl-C "
                            f"while loading")
    add_address_arguments(parser, frontend=False)
    parser.add_argument("--name", default="", help="worker name in logs and stats")
    parser.add_argument("--slot", default="",
                        help="the supervisor slot this process fills: the broker treats a READY for a "
                             "slot it knows as that slot's restart (set by bertpool-workers)")
    parser.add_argument("--load-error-file", metavar="FILE",
                        help="if the model cannot be loaded, also write why to FILE (the supervisor reports it)")
    parser.add_argument("--config-json", metavar="FILE",
                        help="the whole worker config as JSON, every field (how bertpool-workers starts its "
                             "workers); not combined with the other config flags")
    add_worker_arguments(parser)
    security.add_client_arguments(parser, own="this worker's own")
    return parser


def flags_given(parser: argparse.ArgumentParser, args: argparse.Namespace, keep: tuple[str, ...] = ()) -> list[str]:
    """The flags of ``parser`` whose value in ``args`` is not their default (bar ``keep`` dests)."""
    return sorted(a.option_strings[0] for a in parser._actions
                  if a.option_strings and a.dest not in ("help", *keep)
                  and getattr(args, a.dest, a.default) != a.default)


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig ``args`` describe: from ``--config-json`` or from the flags, never a mix
    (ConfigError when a config flag is given beside ``--config-json``)."""
    if args.config_json is None:
        return worker_config_from_args(args, args.worker_address, name=args.name, slot=args.slot)
    given = flags_given(parser, args, keep=("config_json", "load_error_file"))
    if given:
        raise ConfigError(f"--config-json holds the whole config: drop {', '.join(given)}")
    return configdata.read_json(WorkerConfig, args.config_json)


def main(argv: list[str] | None = None) -> int:
    """bertpool-worker: one worker process (normally started by the supervisor)."""
    serial_tokenizers()  # before the tokenizer first encodes; also when started by hand, not by a supervisor
    quiet_tensorflow(os.environ)  # likewise, before the tf backend imports TensorFlow
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    exit_with_parent()  # started by a supervisor: stop when it dies, however it dies
    ignore_hangup()
    try:
        worker = Worker(config_from_args(parser, args))
        worker.load()
    except KeyboardInterrupt:  # Ctrl-C to the whole pool while models load: no traceback per worker
        return 130
    except Exception as exc:  # typed or not (e.g. the Neuron runtime's own), a load failure is final
        return _load_failed(exc, args.load_error_file)
    install_stop_handlers(worker.stop)
    worker.run()
    if worker.refused is not None:
        return _load_failed(HandshakeFailed(worker.refused), args.load_error_file, EXIT_REFUSED)
    return 1 if worker.failed else 0


def _load_failed(exc: Exception, error_file: str | None, code: int = EXIT_LOAD_FAILED) -> int:
    """Report why loading (or, with ``code`` EXIT_REFUSED, registering) failed for good: one line,
    also written to ``error_file`` for the supervisor; a traceback too when it was not a typed error."""
    if isinstance(exc, BertpoolError):
        reason = str(exc)
    else:
        log.error("loading failed", exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                f.write(reason + "\n")
        except OSError as write_error:
            log.warning("cannot write %s: %s", error_file, write_error)
    return report_error("bertpool-worker", reason, code=code)


if __name__ == "__main__":
    raise SystemExit(main())
