"""bertpool-bench: many client processes x many requests each, like the Neuron demo.

The AWS demo ran 48 x ``bert_client.py --cycle 128``. Here ``--clients`` C
processes each send ``--cycle`` R requests one after another (each waits for
its reply, as the demo's clients did), after ``--warmup`` requests that are
not measured. All clients start the measured phase together (a barrier), so
throughput is total replies / wall time of the measured phase. With
``--duration-s`` S each client instead sends requests back to back for S
seconds of the measured phase.

Before the run one STATS request (``--connect-timeout-s``) checks that a
broker answers at the address: if none does, the bench says so and exits 2
without starting the clients. Failed requests are counted by error class
(``RequestTimeout``, ``ServerBusy``, ``RemoteError``, ...) with a sample
message each; percentiles of zero replies are ``null`` in JSON and ``-`` in
text, never NaN. ``--sweep-clients`` (clients/sweep.py) runs the load at
several concurrencies, and ``--plot`` (clients/plot.py) draws the result.
A progress bar with live throughput goes to stderr when it is a terminal
(not with ``--quiet``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
from tqdm import tqdm

from ..common import protocol as P
from ..common import security
from ..common.cli import (add_address_arguments, check_count, check_writable, counted, exit_with_parent, output_file,
                          report_error, report_interrupt, sigterm_as_interrupt, write_output)
from ..common.defaults import DEFAULT_FRONTEND
from ..common.data import Pair, default_pairs, read_mrpc_tsv
from ..common.errors import (BenchError, BertpoolError, ConfigError, HandshakeFailed, RemoteError, RequestError,
                             RequestTimeout)
from ..common.metrics import binary_report
from .client import Client

DEFAULT_CYCLE = 128  # measured requests per client, as in the demo's --cycle 128
# Upper bounds, so that a typo (an extra digit or ten) is refused at once rather than forking without limit
# or running for years. Every client is a process of its own (tens of MB each, and a broker connection):
# a few thousand is beyond what one host runs, and far past the 48 of the demo; the benches that start
# client processes, threads or sockets (bench-broker, bench-gateway, bench-faults, --sweep-clients) share it.
MAX_CLIENTS = 4096
# A million round trips per client is a quarter of an hour at the best round trip (about 1 ms), days at a
# model's; and the bench keeps every reply's latency and timings in memory until the end.
MAX_CYCLE = 1_000_000


@dataclass(frozen=True)
class BenchConfig:
    address: str = DEFAULT_FRONTEND        # the broker's client endpoint
    clients: int = 48                      # client processes
    cycle: int = DEFAULT_CYCLE             # measured requests per client
    warmup: int = 2                        # unmeasured requests per client first
    timeout_s: float = 60.0                # per-request deadline
    start_timeout_s: float = 120.0         # longest wait for all clients to connect and warm up
    wait_workers: int = 0                  # first wait until the pool has this many workers
    wait_timeout_s: float = 600.0          # longest wait for those workers
    duration_s: float | None = None        # measured seconds per client instead of `cycle` requests
    connect_timeout_s: float = 5.0         # longest wait for the broker's STATS answer before the run
    curve: security.CurveClientConfig | None = None  # CURVE keys for every client; None = plain text

    def __post_init__(self) -> None:
        for name, most in (("clients", MAX_CLIENTS), ("cycle", MAX_CYCLE)):
            check_count("--" + name, getattr(self, name), most)
        check_warmup(self.warmup)
        if self.wait_workers < 0:
            raise ConfigError(f"--wait-workers must be >= 0, got {self.wait_workers}")
        for name in ("timeout_s", "connect_timeout_s", "start_timeout_s", "wait_timeout_s", "duration_s"):
            if getattr(self, name) is not None:  # duration_s None: --cycle requests instead
                P.check_timeout("--" + name.replace("_", "-"), getattr(self, name))

    @property
    def max_measured_s(self) -> float:
        """An upper bound on one client's measured phase (for the parent's wait)."""
        if self.duration_s is not None:
            return self.duration_s + self.timeout_s
        return self.cycle * self.timeout_s


def check_warmup(warmup: int) -> None:
    """ConfigError unless ``warmup`` (unmeasured requests per client) is in 0..MAX_CYCLE: a typo of a
    few extra digits otherwise ran until the clients' start timeout, said as "did not all start"."""
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if warmup > MAX_CYCLE:
        raise ConfigError(f"--warmup must be at most {MAX_CYCLE}, got {warmup}")


def pair_position(config: BenchConfig, client: int, i: int) -> int:
    """Which pair client ``client`` sends as its ``i``-th measured request: an index into the pairs,
    before wrapping around their count. --cycle: each client a run of its own (client k from
    k x cycle), so C x cycle covers the pairs once when they fit; --duration-s has no request count
    to offset by (with cycle's default every client sent the same run): the clients interleave
    (client k sends k, k + C, ...), so those in flight at once differ and every pair is soon sent."""
    return client * config.cycle + i if config.duration_s is None else client + i * config.clients


def sent_pairs(config: BenchConfig, n_pairs: int) -> list[int]:
    """The pairs (indices into ``n_pairs`` pairs) that a --cycle run's measured requests send, in the
    order they reach a saturated pool whose clients keep in step: every client's i-th request,
    client by client, before any (i+1)-th. What a tight loop must replay to be judged against that
    run: a compiled model's time depends on the pairs (their longest row picks its sequence bucket)."""
    assert config.duration_s is None, "a --duration-s run's requests are not known beforehand"
    return [pair_position(config, client, i) % n_pairs
            for i in range(config.cycle) for client in range(config.clients)]


# What the Client recovered from by itself (ClientCounters fields) that a report totals: its resends
# after BUSY and after a lost broker (each one more request at the broker), and its reconnects.
RETRY_COUNTERS = ("busy_retries", "lost_resends", "reconnects")


@dataclass
class _ClientResult:
    latencies_ms: list[float]
    labels: list[tuple[int, int | None, int]]  # (predicted, expected, index of the pair sent)
    timings: list[dict[str, float]]
    errors: dict[str, int]
    started: float
    finished: float
    error_samples: dict[str, str] = field(default_factory=dict)  # error class -> first message
    warmup_replies: int = 0  # warm-up requests answered (not measured, but served and counted by the pool)
    retries: dict[str, int] = field(default_factory=dict)  # RETRY_COUNTERS of its Client, warm-up included


def _client_main(index: int, config: BenchConfig, pairs: list[Pair], barrier, results, progress,
                 parent_pid: int, log_level: int = logging.WARNING) -> None:
    """One client process: warm up, wait at the barrier, run the measured phase. It ends with the
    bench (``parent_pid``), however that ends; Ctrl-C is the parent's to handle (it stops us). Its
    Client's log lines (e.g. "presuming the broker ... dead") come out as the bench's own do
    (:func:`setup_bench_logging`), at the parent's ``log_level``.

    ``progress[2 * index]`` / ``progress[2 * index + 1]`` count this client's
    replies / errors so far (only this process writes them; the parent reads
    them for the progress bar).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent_pid)
    setup_bench_logging(log_level)
    errors: Counter = Counter()
    samples: dict[str, str] = {}
    latencies, labels, timings = [], [], []
    warmed = 0
    try:
        with Client(config.address, timeout_s=config.timeout_s, curve=config.curve) as client:
            for i in range(config.warmup):
                pair = pairs[(index + i) % len(pairs)]
                try:
                    client.predict(pair.text_a, pair.text_b)
                    warmed += 1
                except RequestError:
                    pass  # warm-up failures are not measured
            barrier.wait(config.start_timeout_s)
            started = time.monotonic()
            end = started + config.duration_s if config.duration_s is not None else None
            i = 0
            while (i < config.cycle) if end is None else (time.monotonic() < end):
                pair_index = pair_position(config, index, i) % len(pairs)
                pair = pairs[pair_index]
                i += 1
                t0 = time.perf_counter()
                try:
                    result = client.predict(pair.text_a, pair.text_b)
                except RequestError as exc:  # any subclass, counted by its class name
                    name = type(exc).__name__
                    errors[name] += 1
                    samples.setdefault(name, str(exc))
                    progress[2 * index + 1] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                labels.append((result.label, pair.label, pair_index))
                timings.append(result.timings)
                progress[2 * index] += 1
            finished = time.monotonic()
            retries = {name: getattr(client.counters, name) for name in RETRY_COUNTERS}
    except threading.BrokenBarrierError:
        return  # the parent gave up on the start (it reports that), or another client failed first
    except Exception as exc:  # report, never hang the parent
        results.put(("failed", index, f"{type(exc).__name__}: {exc}"))
        barrier.abort()  # if still warming up, the parent need not wait out start_timeout_s
        return
    results.put(("ok", index, _ClientResult(latencies, labels, timings, dict(errors), started, finished,
                                            samples, warmed, retries)))


class _LogFormat(logging.Formatter):
    """``bertpool-bench: warning: bertpool.client: MESSAGE``: a library's log line says whose it is."""

    def format(self, record: logging.LogRecord) -> str:
        return f"bertpool-bench: {record.levelname.lower()}: {record.name}: {super().format(record)}"


def setup_bench_logging(level: int) -> None:
    """Log lines of the libraries the bench uses (the Client's "presuming the broker ... dead:
    reconnecting") go to stderr with the bench's prefix, at ``level`` and above (main: WARNING, or
    ERROR with --quiet), instead of bare through Python's last-resort handler. A no-op where logging
    is set up already (the bench used as a library)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=level, handlers=[handler])


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p999, mean and max of ``values`` (milliseconds), rounded to µs; all None if empty."""
    if not values:
        return {k: None for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    a = np.asarray(values)
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {"p50": round(float(q[0]), 3), "p90": round(float(q[1]), 3), "p99": round(float(q[2]), 3),
            "p999": round(float(q[3]), 3), "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)}


def wait_for_workers(address: str, n: int, timeout_s: float,
                     curve: security.CurveClientConfig | None = None) -> None:
    """Block until the broker at ``address`` reports ``n`` ready workers; RequestTimeout if not."""
    deadline = time.monotonic() + timeout_s
    with Client(address, curve=curve) as client:
        while True:
            try:
                if len(client.stats(timeout_s=max(0.1, min(5.0, deadline - time.monotonic())))["workers"]) >= n:
                    return
            except HandshakeFailed:
                raise  # the broker is up but will not talk to us: waiting cannot help
            except RequestError:
                pass  # broker not up yet: keep trying until the deadline
            if time.monotonic() > deadline:
                raise RequestTimeout(f"{n} workers not ready at {address} within {timeout_s} s")
            time.sleep(0.2)  # polling a remote counter; no event exists to wait on


def no_broker_message(address: str, timeout_s: float, cause: BaseException | None = None) -> str:
    # A plain timeout says nothing the sentence does not; another class (e.g. BrokerUnavailable) might.
    why = f" ({type(cause).__name__}: {cause})" if cause is not None and type(cause) is not RequestTimeout else ""
    return (f"no broker answered at {address} within {timeout_s:g} s: a STATS request got no reply{why}. "
            f"Is bertpool-serve (or bertpool-broker) running with --address {address}?")


def probe_broker(address: str, timeout_s: float,
                 curve: security.CurveClientConfig | None = None) -> dict[str, Any]:
    """The broker's STATS at ``address``.

    Raises RequestTimeout saying "no broker answered at ADDRESS" when nothing
    answers within ``timeout_s`` (or the client reports any other non-remote
    RequestError, e.g. a BrokerUnavailable), and BenchError when the peer
    answers STATS with an ERROR (not a bertpool broker of this version) or ends the connection
    handshake (a refused CURVE key, mismatched keys or mechanisms: the message says which).
    """
    try:
        with Client(address, curve=curve) as client:
            return client.stats(timeout_s=timeout_s)
    except HandshakeFailed as exc:
        raise BenchError(f"cannot talk to the broker: {exc}") from exc
    except RemoteError as exc:
        raise BenchError(f"the server at {address} refused a STATS request ({exc}): "
                           f"is it a bertpool broker of this version?") from exc
    except RequestError as exc:
        raise RequestTimeout(no_broker_message(address, timeout_s, exc)) from exc


def try_stats(address: str, timeout_s: float,
              curve: security.CurveClientConfig | None = None) -> dict[str, Any] | None:
    """The broker's STATS, or None if it does not answer within ``timeout_s`` (or refuses them)."""
    try:
        return probe_broker(address, timeout_s, curve)
    except (RequestError, BenchError):
        return None


def pool_info(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the broker's STATS says about the pool: worker count, backends and (when the workers
    report them) batch settings and model; None if there is no STATS."""
    if stats is None:
        return None
    workers = list(stats.get("workers", {}).values())
    info: dict[str, Any] = {"workers": len(workers),
                            "backends": dict(Counter(str(w.get("backend")) for w in workers))}
    for key in ("batch_size", "batch_timeout_ms", "model"):  # absent from STATS until workers report them
        values = sorted({w[key] for w in workers if isinstance(w.get(key), (int, float, str))}, key=str)
        info[key] = None if not values else values[0] if len(values) == 1 else values
    return info


def show_progress(quiet: bool, stream: TextIO | None = None) -> bool:
    """A progress bar only on a terminal, and never with --quiet (pipes and logs stay clean)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


class Progress:
    """A tqdm bar over the client processes' shared counters: replies so far (of ``total`` requests),
    the live reply rate (replies/s: failed requests are not in it, they are in ``errors``) and
    errors. Drawn on ``stream`` (stderr), so the report on stdout is unchanged."""

    def __init__(self, counters, total: int | None, desc: str, stream: TextIO) -> None:
        self._counters = counters
        self._errors = 0
        columns, lines = _size(stream)  # 0 x 0 on a pseudo-terminal with no size: tqdm would draw nothing
        self._bar = tqdm(total=total, desc=desc, unit=" replies", file=stream, ncols=columns or 100,
                         nrows=lines or 24, dynamic_ncols=bool(columns), mininterval=0.25, smoothing=0.3,
                         leave=True)

    def update(self) -> None:
        done, errors = sum(self._counters[0::2]), sum(self._counters[1::2])
        more_errors, self._errors = errors != self._errors, errors
        self._bar.set_postfix(errors=errors, refresh=False)
        if done != self._bar.n:
            self._bar.update(done - self._bar.n)
        elif more_errors:  # no reply since, but failures: show them (every request failing is news)
            self._bar.refresh()

    def close(self) -> None:
        self.update()
        self._bar.close()


def _size(stream: TextIO) -> tuple[int, int]:
    """The terminal's columns and lines, 0 x 0 when unknown."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError):
        return 0, 0


def next_result(results, deadline: float, timeout_message: str, on_empty: Callable[[], object] | None = None,
                slice_s: float = 1.0) -> Any:
    """The next item on ``results`` (a ``queue.Queue`` or a multiprocessing queue), waited for in
    slices of at most ``slice_s`` seconds until ``deadline`` (a ``time.monotonic()`` instant).

    The one home of the benches' bounded wait on the queue their client or load processes report
    on. Slices, not one long ``get``: a multiprocessing queue's wait is a ``poll()`` that overflows
    past about 24 days (--cycle x --timeout-s can ask for that), and between slices ``on_empty``
    runs: the caller's own checks (that the processes feeding ``results`` are alive, a progress bar
    redrawn). Whatever it raises ends the wait, as is. Returns an item as soon as one arrives; raises
    BenchError(``timeout_message``) once ``deadline`` has passed with none (at once if it already
    has). Bounded: each slice waits min(``slice_s``, time left), so the loop ends by ``deadline``.
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(timeout_message)
        try:
            return results.get(timeout=min(slice_s, left))
        except queue.Empty:
            pass
        if on_empty is not None:  # outside the except: its error is its own, not "while handling Empty"
            on_empty()


def _first_failure(results) -> str | None:
    """The message of the first client failure on ``results`` (each failing client puts one before it
    breaks the barrier), or None if none came within a second."""
    try:
        while True:
            status, index, value = results.get(timeout=1.0)
            if status == "failed":
                return f"client {index}: {value}"
    except queue.Empty:
        return None


def run_bench(config: BenchConfig, pairs: list[Pair], progress: bool = False,
              progress_stream: TextIO | None = None, desc: str | None = None) -> dict[str, Any]:
    """Run the benchmark against a live pool; return the report (see summarize()).

    Raises RequestTimeout ("no broker answered at ...") before starting any
    client if the broker does not answer STATS within ``connect_timeout_s``.
    With ``progress``, draws a bar with live throughput on ``progress_stream``
    (default stderr) during the measured phase.
    """
    if not pairs:
        raise ConfigError("no sentence pairs to send")
    if config.wait_workers:
        wait_for_workers(config.address, config.wait_workers, config.wait_timeout_s, config.curve)
    before = probe_broker(config.address, config.connect_timeout_s, config.curve)
    if not before.get("workers") and not config.wait_workers:
        # Not refused (workers still loading serve fine once ready), but said now, not after every
        # request has waited out its deadline (with the defaults, hours).
        print(f"bertpool-bench: warning: the broker at {config.address} has no ready workers yet; each "
              f"request waits up to --timeout-s {config.timeout_s:g} s for one (use --wait-workers N to "
              f"wait first)", file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")  # no inherited ZeroMQ state in the children
    barrier = ctx.Barrier(config.clients + 1)
    results = ctx.Queue()
    counters = ctx.RawArray("q", 2 * config.clients)  # per client: replies, errors (one writer each)
    log_level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_client_main,
                         args=(i, config, pairs, barrier, results, counters, os.getpid(), log_level), daemon=True)
             for i in range(config.clients)]
    try:
        return _run_clients(config, procs, barrier, results, counters, before, progress, progress_stream, desc)
    except BaseException:  # Ctrl-C, SIGTERM (see main), a bug: the clients must not run on without us
        _stop(procs, at_once=True)
        raise


def _run_clients(config: BenchConfig, procs, barrier, results, counters, before, progress: bool,
                 progress_stream, desc) -> dict[str, Any]:
    """run_bench's part with client processes running: start them, collect, report."""
    for p in procs:
        p.start()
    try:
        barrier.wait(config.start_timeout_s)
    except Exception as exc:  # BrokenBarrierError: timed out, or a client broke it
        _stop(procs)
        why = _first_failure(results)
        raise BenchError(f"a bench client failed while warming up: {why}" if why else
                         f"clients did not all start within {config.start_timeout_s:g} s (each connects and "
                         f"sends its --warmup {config.warmup} requests first)") from exc
    bar = None
    if progress:
        total = None if config.duration_s is not None else config.clients * config.cycle
        bar = Progress(counters, total, desc or counted(config.clients, "client"), progress_stream or sys.stderr)
    collected, failures = [], []
    limit = time.monotonic() + config.start_timeout_s + config.max_measured_s
    late = f"bench clients did not finish within {config.max_measured_s:g} s"
    try:
        while len(collected) + len(failures) < config.clients:  # one item per client
            status, index, value = next_result(results, limit, late, on_empty=bar.update if bar else None,
                                               slice_s=0.25 if bar else 1.0)  # 0.25: the bar redrawn often
            if bar:
                bar.update()
            (collected if status == "ok" else failures).append(value)
    finally:
        if bar:
            bar.close()
    _stop(procs)  # (on an exception, run_bench stops them at once)
    if failures:
        raise BenchError(f"{len(failures)} bench clients failed, first: {failures[0]}")
    report = summarize(config, collected)
    after = try_stats(config.address, config.connect_timeout_s, config.curve)
    pool_before, pool_after = pool_info(before), pool_info(after)
    report["pool"] = pool_after or pool_before
    # Who answered: STATS after the run says; if the broker (or its workers) went away since, the STATS
    # before it does, so the footer still says "served by" and warns of echo.
    report["backends"] = (pool_after or {}).get("backends") or pool_before["backends"]
    report["diagnosis"] = diagnose(config.address, report, after, config.connect_timeout_s)
    # A run that measured nothing (a --duration-s shorter than one request) has no errors, but no result either.
    report["ok"] = report["errors"] == 0 and report["requests"] > 0
    return report


# RequestError classes that mean "no answer before the request's deadline" (the Client's own wait, or
# the broker's or worker's deadline_exceeded).
DEADLINE_ERRORS = ("DeadlineExceeded", "RequestTimeout")


def diagnose(address: str, report: dict[str, Any], after: dict[str, Any] | None,
             timeout_s: float) -> str | None:
    """One plain sentence on why requests failed, or why none was measured, when STATS tells (None
    when every request got its answer)."""
    if not report["requests"]:
        duration = report["config"].get("duration_s")
        return (f"no request was measured: each client's --duration-s {duration:g} s ended before it sent "
                f"one; give a longer --duration-s" if duration is not None else "no request was measured")
    if not report["errors"]:
        return None
    if after is None:
        return no_broker_message(address, timeout_s) + " (it answered before the run: it went away)"
    if not after.get("workers"):
        return (f"the broker at {address} answers, but has no ready workers: start workers "
                f"(bertpool-workers) or wait for them with --wait-workers N")
    if not report["replies"]:
        refused = report["errors_by_type"].get("RemoteError", 0)  # ERROR replies: answered, but refused
        late = sum(report["errors_by_type"].get(name, 0) for name in DEADLINE_ERRORS)
        if late == report["errors"]:  # the pool is there, with workers: it is slower than the deadline
            return (f"the broker at {address} answers and has workers, but every request ran past its "
                    f"--timeout-s {report['config']['timeout_s']:g} s deadline: the pool takes longer than "
                    f"that per request (its batches, or its queue); give a longer --timeout-s")
        if not refused:
            return f"the broker at {address} answers, but no request got a reply"
        which = ("every request was" if refused == report["errors"]
                 else f"{refused} of {report['errors']} requests were")
        # The sample starts with the ERROR's code (e.g. "bad_text: text_a: empty text").
        return (f"the broker at {address} answers, but {which} refused with an ERROR reply, e.g. "
                f"{report['error_samples'].get('RemoteError')}")
    return None


def _stop(procs, at_once: bool = False) -> None:
    """Wait (5 s each) for the client processes to end, then terminate what is left; ``at_once``:
    terminate them all now (the bench was interrupted)."""
    for p in procs:
        if p.pid is None:
            continue  # never started
        if not at_once:
            p.join(5)
        if p.is_alive():
            p.terminate()
            p.join(10)


HISTOGRAM_BINS_PER_DECADE = 20  # log-spaced bins, the same grid for every run, so runs compare


def latency_histogram(values: list[float]) -> dict[str, list] | None:
    """Counts of ``values`` (ms) in log-spaced bins (HISTOGRAM_BINS_PER_DECADE per decade, edges at
    10 ** (k / bins_per_decade) for integer k, from 1 µs), covering [min, max]; None if empty."""
    if not values:
        return None
    a = np.maximum(np.asarray(values, dtype=float), 1e-3)
    lo = int(np.floor(np.log10(a.min()) * HISTOGRAM_BINS_PER_DECADE))
    hi = max(lo + 1, int(np.ceil(np.log10(a.max()) * HISTOGRAM_BINS_PER_DECADE)))
    edges = 10.0 ** (np.arange(lo, hi + 1) / HISTOGRAM_BINS_PER_DECADE)
    counts, _ = np.histogram(np.clip(a, edges[0], edges[-1]), bins=edges)
    return {"edges": [float(f"{e:.6g}") for e in edges], "counts": [int(c) for c in counts]}


def summarize(config: BenchConfig, results: list[_ClientResult]) -> dict[str, Any]:
    latencies = [x for r in results for x in r.latencies_ms]
    labels = [x for r in results for x in r.labels]
    errors: Counter = Counter()
    samples: dict[str, str] = {}
    for r in results:
        errors.update(r.errors)
        for name, message in r.error_samples.items():
            samples.setdefault(name, message)
    elapsed = max(r.finished for r in results) - min(r.started for r in results) if results else 0.0
    known = [(p, e) for p, e, _ in labels if e is not None]
    timings = [t for r in results for t in r.timings]
    server = {k: round(float(np.mean([t.get(k, 0.0) for t in timings])), 3) if timings else None
              for k in ("queue_ms", "batch_wait_ms", "compute_ms", "batch_size")}
    # Each reply's latency less its own batch's model time: what the pool adds (batch wait included),
    # request by request, so that compute times varying from batch to batch do not blur it.
    beyond = [lat - t["compute_ms"] for r in results for lat, t in zip(r.latencies_ms, r.timings)
              if isinstance(t.get("compute_ms"), (int, float))]
    return {
        "config": report_config(config),
        "clients": config.clients,
        "requests": len(latencies) + sum(errors.values()),
        "replies": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "error_samples": samples,
        # What the pool's own counts (its Prometheus metrics) hold beyond the measured requests: the
        # warm-up requests it answered, and what the Client resent by itself (after BUSY, after a lost
        # broker), warm-up included.
        "warmup_replies": sum(r.warmup_replies for r in results),
        "client_retries": {name: sum(r.retries.get(name, 0) for r in results) for name in RETRY_COUNTERS},
        "elapsed_s": round(elapsed, 4),
        "throughput_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(latencies),
        "latency_histogram_ms": latency_histogram(latencies),
        "server_mean": server,
        "beyond_compute_ms": percentiles(beyond),
        "accuracy": round(sum(p == e for p, e in known) / len(known), 4) if known else None,
        "labelled": len(known),
        "quality": quality(labels),
    }


def quality(labels: list[tuple[int, int | None, int]]) -> dict[str, Any] | None:
    """Accuracy, F1 and confusion counts over the distinct labelled pairs sent (None if none).

    Each pair counts once, with its first answer, so the numbers are the data
    set's own whatever the number of requests; ``inconsistent_pairs`` counts
    pairs that got different labels on different requests (0 for a
    deterministic model).
    """
    answers: dict[int, set[int]] = {}
    first: dict[int, tuple[int, int]] = {}
    for predicted, expected, index in labels:
        if expected is None:
            continue
        answers.setdefault(index, set()).add(predicted)
        first.setdefault(index, (predicted, expected))
    if not first:
        return None
    return {**binary_report(first.values()), "scope": "distinct pairs, first answer each",
            "inconsistent_pairs": sum(len(a) > 1 for a in answers.values())}


def load_pairs(tsv: str | None) -> tuple[list[Pair], str]:
    """Pairs from an MRPC-format TSV, else the pairs bertpool ships."""
    if tsv:
        return read_mrpc_tsv(tsv), str(tsv)
    return default_pairs(), "bertpool sample pairs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench",
        description="Load a bertpool server with C client processes x R requests each and report "
                    "throughput, latency percentiles and accuracy; or sweep several client counts "
                    "(--sweep-clients) and plot throughput against latency (--plot). Exit status: 0 all "
                    "requests answered, 1 some failed (requests sent while no worker is ready wait up to "
                    "--timeout-s each, then fail) or none was measured (a --duration-s too short for one "
                    "request), 2 the bench could not run (bad flag, no broker, --wait-workers timed out) or "
                    "could not write --json or --plot, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
        epilog="examples: bertpool-bench --clients 48 --cycle 128 --tsv ../shared/data/glue_mrpc_dev.tsv "
               "--json bench.json;  bertpool-bench --sweep-clients 1,4,16,48 --cycle 32 --json sweep.json "
               "--plot sweep.png")
    add_address_arguments(parser, backend=False)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--clients", type=int, default=None,
                      help=f"client processes, at most {MAX_CLIENTS} (default: 48)")
    load.add_argument("--sweep-clients", metavar="C1,C2,...",
                      help="run the load once per client count, e.g. 1,4,16,48: each step has its own "
                           "warm-up and --cycle requests per client (so C x cycle in all), or lasts "
                           "--duration-s; the report has one record per step")
    parser.add_argument("--cycle", type=int, default=None,
                        help=f"measured requests per client, at most {MAX_CYCLE} (default: {DEFAULT_CYCLE}; "
                             f"not with --duration-s)")
    parser.add_argument("--duration-s", type=float, default=None, metavar="S",
                        help="instead of --cycle, each client sends requests back to back for S seconds "
                             "(per sweep step); the fairer choice for sweeps, as every step then measures "
                             "for the same time")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured requests per client first (default: %(default)s)")
    parser.add_argument("--tsv", help="MRPC-format TSV of pairs (default: pairs bertpool ships)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="per-request deadline (default: %(default)s)")
    parser.add_argument("--connect-timeout-s", type=float, default=5.0,
                        help="before the run, wait this long for the broker to answer a STATS request; "
                             "no answer means no broker at --address, and the bench exits 2 (default: "
                             "%(default)s)")
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", type=output_file,
                        help="draw throughput against p50/p99 latency and a latency histogram to FILE "
                             "(needs matplotlib: pip install 'bertpool[plot]')")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is drawn on stderr only when stderr is a terminal)")
    parser.add_argument("--wait-workers", type=int, default=0, metavar="N",
                        help="first wait until the pool has N ready workers (default: do not wait)")
    parser.add_argument("--wait-timeout-s", type=float, default=600.0,
                        help="longest wait for --wait-workers (default: %(default)s)")
    parser.add_argument("--model-note", metavar="TEXT",
                        help="a line about the model served, printed, kept in the report and used in "
                             "the plot's title (e.g. 'random weights: chance-level accuracy')")
    security.add_client_arguments(parser, own="the bench clients' own (all of them use it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_bench_logging(logging.ERROR if args.quiet else logging.WARNING)
    # SIGTERM as Ctrl-C, and Ctrl-C even where it was inherited ignored (a background job): run_bench
    # then stops its client processes.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with sigterm_as_interrupt():
        return _bench(args, argv)


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    """main's work once the flags are parsed (from ``argv``; None: the command line): run, report,
    exit status."""
    from . import plot, sweep  # the sweep and plot modules import this one

    config, source, environment = None, None, None
    try:
        steps = sweep.parse_clients_list(args.sweep_clients) if args.sweep_clients is not None else None
        clients = steps[0] if steps else (48 if args.clients is None else args.clients)
        if args.cycle is not None and args.duration_s is not None:
            raise ConfigError(f"--cycle {args.cycle} and --duration-s {args.duration_s:g} cannot be combined: "
                              f"--cycle sends that many requests per client, --duration-s sends requests for "
                              f"that long; give one")
        config = BenchConfig(address=args.address, clients=clients,
                             cycle=DEFAULT_CYCLE if args.cycle is None else args.cycle,
                             warmup=args.warmup, timeout_s=args.timeout_s,
                             wait_workers=args.wait_workers, wait_timeout_s=args.wait_timeout_s,
                             duration_s=args.duration_s, connect_timeout_s=args.connect_timeout_s,
                             curve=security.client_config_from_args(args))
        pairs, source = load_pairs(args.tsv)
        if args.plot:
            plot.check_format(args.plot)  # matplotlib installed, and it writes that format: before the run
        check_writable("--json", args.json)
        check_writable("--plot", args.plot)
        environment = run_environment("bertpool-bench", argv)
        progress = show_progress(args.quiet)
        if steps:
            report = sweep.run_sweep(config, steps, pairs, progress=progress)
        else:
            report = run_bench(config, pairs, progress=progress)
    except BertpoolError as exc:
        if args.json and config is not None and isinstance(exc, (RequestError, BenchError)):
            try:
                write_json(args.json, {**failure_report(config, exc), "pairs_source": source,
                                       "model_note": args.model_note, "environment": environment})
            except ConfigError as write_exc:  # said too; the exit status is the bench's own failure's
                report_error("bertpool-bench", write_exc)
        return report_error("bertpool-bench", exc)
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        return report_interrupt("bertpool-bench", exc, "; its clients were stopped, no report")
    report["pairs_source"] = source
    report["model_note"] = args.model_note
    report["environment"] = environment
    print(sweep.format_sweep(report) if steps else format_report(report), flush=True)
    try:  # the report is on stdout already; a file that cannot be written (disk full) is one line, exit 2
        if args.json:
            write_json(args.json, report)
        if args.plot:
            plot.plot_report(report, args.plot)
    except BertpoolError as exc:
        return report_error("bertpool-bench", exc)
    return 0 if report["ok"] else 1


def report_config(config: BenchConfig) -> dict[str, Any]:
    """``config`` as a report shows it: whether CURVE was on, never the keys; ``cycle`` null when
    ``duration_s`` set the load instead (its default would read as requests sent)."""
    return {**asdict(config), "curve": config.curve is not None,
            "cycle": None if config.duration_s is not None else config.cycle}


def run_environment(prog: str, argv: list[str] | None) -> dict[str, Any]:
    """What a saved report needs for a later reader to compare it with another: the command line
    (``prog`` and its ``argv``; None: this process's ``sys.argv[1:]``, as argparse reads it), when it
    started (UTC), the versions that ran it and the host's facts: CPUs (all, and those this process
    may use), the load average when it started (on a shared machine the other jobs move every rate),
    platform and host name. The bertpool ``commit`` is
    ``git describe --always --dirty`` of the source tree, null when that is not a git checkout."""
    import zmq

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = None
    return {
        "command": [prog, *(sys.argv[1:] if argv is None else argv)],
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"bertpool": _installed_version("bertpool"), "bertpool_commit": _source_commit(),
                     "python": platform.python_version(), "numpy": np.__version__,
                     "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()},
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "cpus_usable": usable, "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


def _source_commit() -> str | None:
    """``git describe --always --dirty`` of the tree this module was loaded from, or None."""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):  # no git, or a tree too slow to read: the field is null
        return None
    if proc.returncode != 0:  # not a git checkout (an installed wheel)
        return None
    return proc.stdout.strip() or None


def failure_report(config: BenchConfig, exc: BaseException) -> dict[str, Any]:
    """The JSON written when the bench could not run (e.g. no broker at the address): a run's report
    with nothing measured (the same keys, so whatever reads reports reads this one too), plus
    ``error``."""
    return {**summarize(config, []), "pool": None, "backends": {}, "ok": False,
            "error": {"type": type(exc).__name__, "message": str(exc)}, "diagnosis": str(exc)}


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write ``report``; NaN or infinity in it is a bug, so it fails loudly (allow_nan=False). A file
    that cannot be written (disk full, no permission) is a ConfigError naming it."""
    write_output("--json", path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def ms(value: float | None) -> str:
    """A latency for text reports: two decimals, or "-" when there is none (no replies)."""
    return "-" if value is None else f"{value:.2f}"


def format_errors(report: dict[str, Any]) -> list[str]:
    """One line per error class with a sample message, and the diagnosis if any."""
    lines = []
    samples = report.get("error_samples", {})
    for name, count in sorted(report.get("errors_by_type", {}).items(), key=lambda kv: -kv[1]):
        sample = samples.get(name)
        lines.append(f"  {name} x {count}" + (f", e.g.: {sample}" if sample else ""))
    if lines:
        lines.insert(0, "errors by type:")
    if report.get("diagnosis"):
        lines.append(f"diagnosis: {report['diagnosis']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    lines = [f"clients {report['clients']}  requests {report['requests']}  errors {report['errors']}  "
             f"throughput {report['throughput_per_s']:.1f} replies/s  elapsed {report['elapsed_s']:.2f} s",
             f"latency ms  p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
             f"p99.9 {ms(lat['p999'])}  max {ms(lat['max'])}",
             format_server_mean(report.get("server_mean"))]
    lines += format_retries(report)
    lines += format_errors(report)
    lines += format_footer(report)
    return "\n".join(lines)


def format_retries(report: dict[str, Any]) -> list[str]:
    """What the Client recovered from by itself (resent, so not errors), when it had to."""
    r = report.get("client_retries") or {}
    if not any(r.values()):
        return []
    return [f"client retries  resent {r['busy_retries']} after BUSY, {r['lost_resends']} after a lost broker; "
            f"reconnected {r['reconnects']} times"]


def format_server_mean(server: dict[str, Any] | None) -> str:
    """The server timings' means, "-" where there is none (no replies)."""
    server = server or {}
    return (f"server mean ms  queue {ms(server.get('queue_ms'))}  batch wait {ms(server.get('batch_wait_ms'))}  "
            f"compute {ms(server.get('compute_ms'))};  rows per batch {ms(server.get('batch_size'))}")


def format_footer(report: dict[str, Any]) -> list[str]:
    """Backends, quality, model note and the echo warning (shared by the run and sweep reports)."""
    lines = []
    if report.get("backends"):
        lines.append("served by  " + ", ".join(f"{n} x {b}" for b, n in sorted(report["backends"].items())))
    q = report.get("quality")
    if q is None:
        lines.append("accuracy n/a (no labelled pairs answered)")
    else:
        c = q["confusion"]
        lines.append(f"accuracy {q['accuracy']:.4f}  F1 {q['f1']:.4f}  precision {q['precision']:.4f}  "
                     f"recall {q['recall']:.4f}  over {q['n']} distinct pairs  (tp {c['tp']} fp {c['fp']} "
                     f"tn {c['tn']} fn {c['fn']}; inconsistent pairs {q['inconsistent_pairs']})")
    if report.get("model_note"):
        lines.append(f"model: {report['model_note']}")
    if "echo" in (report.get("backends") or {}):
        lines.append("WARNING: echo workers answered: these answers are not a model's; accuracy is meaningless")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
