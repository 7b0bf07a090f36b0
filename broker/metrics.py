"""The broker's Prometheus endpoint (``--metrics-address``): one scrape sees the whole pool.

The broker's loop only updates plain ints and bucket arrays (:class:`BrokerMetrics`,
no locks, no prometheus-client calls on the request path); a custom collector reads
them, the broker's counters and the workers' last STATS at scrape time, on the HTTP
server's thread, and builds the families there. One CollectorRegistry per broker.

Workers report through the broker: each STATS carries the worker process's
cumulative counters and histograms under a per-process ``epoch``; the broker adds
each stream's increase to pool totals (:class:`PoolTotals`), so the totals stay
monotonic while workers restart, re-register or answer on a second socket. A
stream first heard from a worker that had registered before (with an earlier
broker, before this one restarted) starts from a baseline: its lifetime so far
is not this broker's work.

Metric names (all prefixed ``bertpool_``; units in the names; label sets bounded by
error codes and pool size, never per request or per client) are listed in METRICS
and in the README's "Monitoring" section.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..common import prometheus
from ..common import protocol as P
from ..common.recent import Recent
from ..common.metrics_export import BATCH_FILL_BUCKETS_ROWS, LATENCY_BUCKETS_S, WORKER_HISTOGRAMS, BucketCounts

if TYPE_CHECKING:  # no import cycle at run time
    from .broker import Broker

log = logging.getLogger("bertpool.broker")

# Worker counters totalled over the pool (from STATS).
POOL_COUNTERS = ("inferences", "batches", "padded_rows")
# Counter streams remembered after their worker left, so one that re-registers continues from
# its last counts instead of being counted again (bounded: a stream is a few hundred bytes).
MAX_STREAMS = 1024
# Slots remembered (with their last pid) to tell a restart from a first registration or a
# re-registration of the same process.
MAX_SLOTS = 4096
# Outcome label for an error code a (misbehaving) worker sent that the protocol does not define.
OTHER_CODE = "other"

# name -> help, the exported families (a test checks every one is documented here and exported).
METRICS = {
    "bertpool_requests_total": "Requests answered, by outcome: ok, busy, or the ERROR code "
                               "(deadline_exceeded: expired; worker_lost; shutting_down; bad_*; ...)",
    "bertpool_requests_redispatched_total": "Requests re-sent to another worker after theirs died",
    "bertpool_replies_dropped_total": "Answers for clients dropped: client gone, or too many unread",
    "bertpool_late_replies_dropped_total": "Worker answers under a token no longer held (never delivered)",
    "bertpool_malformed_worker_messages_total": "Malformed worker messages dropped",
    "bertpool_inferences_total": "Real rows computed by the workers (padding excluded)",
    "bertpool_batches_total": "Model calls made by the workers",
    "bertpool_padded_rows_total": "Dummy rows added to fill fixed-size batches",
    "bertpool_worker_registrations_total": "Worker READYs accepted (first starts, restarts, re-registrations)",
    "bertpool_worker_restarts_total": "READYs for a supervisor slot that had registered before from another "
                                      "process (a restart; the same pid re-registering is not one)",
    "bertpool_workers_lost_total": "Workers removed as dead (silent, unreachable, or replaced by a restart; "
                                   "not a process re-registering)",
    "bertpool_queue_depth_requests": "Requests waiting in the broker's queue for a worker",
    "bertpool_queue_depth_bytes": "Bytes of request bodies waiting in the broker's queue",
    "bertpool_workers_alive": "Registered workers",
    "bertpool_capacity_requests": "Requests the registered workers may hold at once, together",
    "bertpool_worker_inflight_requests": "Requests a worker holds now, by worker (its slot, else its name)",
    "bertpool_request_latency_seconds": "Broker receipt of a request to the broker forwarding its worker's answer",
    "bertpool_queue_wait_seconds": "Broker receipt of a request to its dispatch to a worker",
    "bertpool_batch_wait_seconds": "Worker: a request's arrival to the start of its batch's model call",
    "bertpool_compute_seconds": "Worker: one model call (a whole batch, padding included)",
    "bertpool_batch_fill_rows": "Worker: real rows in one model call",
    "bertpool_build_info": "The broker's bertpool version (value 1)",
    "bertpool_model_info": "Workers serving each model: backend, model hash, dtype, target, version",
}


# The histograms collect() exports (the broker's own two, then the workers' from STATS).
HISTOGRAMS = ("bertpool_request_latency_seconds", "bertpool_queue_wait_seconds",
              *(f"bertpool_{name}" for name in WORKER_HISTOGRAMS))


class PoolTotals:
    """The pool's worker counters and histograms, totalled over every counter stream (worker
    process) the broker has heard from. Within a stream everything is cumulative and monotonic,
    so the newest state is the element-wise maximum of what arrived: STATS that overtake each
    other (a worker sends on two sockets) never count twice."""

    def __init__(self) -> None:
        self.counters = dict.fromkeys(POOL_COUNTERS, 0)
        self.histograms = {name: BucketCounts(bounds) for name, bounds in WORKER_HISTOGRAMS.items()}
        # Each stream's last counters and histograms; the one updated longest ago is forgotten first.
        self._streams: Recent[str, tuple[dict[str, int], dict[str, tuple[list[int], float]]]] = Recent(MAX_STREAMS)

    def knows(self, epoch: str) -> bool:
        """Whether a STATS of stream ``epoch`` was taken (and is still remembered)."""
        return epoch in self._streams

    def update(self, epoch: str, counters: dict[str, int],
               histograms: dict[str, tuple[list[int], float]] | None, baseline: bool = False) -> None:
        """Add what stream ``epoch`` did since its last STATS. ``baseline``: if this is the first
        STATS of the stream, only remember it (the counts so far were not made for this broker)."""
        add = not (baseline and epoch not in self._streams)
        last_counters, last_hists = self._streams.get(epoch) or ({}, {})
        seen_counters = dict(last_counters)
        for name in POOL_COUNTERS:
            value = counters.get(name)
            if value is not None and value > seen_counters.get(name, 0):
                if add:
                    self.counters[name] += value - seen_counters.get(name, 0)
                seen_counters[name] = value
        seen_hists = dict(last_hists)
        for name, (counts, total) in (histograms or {}).items():
            target = self.histograms.get(name)
            if target is None or len(counts) != len(target.counts):
                continue  # not one we export, or other buckets (another bertpool version)
            old_counts, old_total = last_hists.get(name, ([0] * len(counts), 0.0))
            new_counts = [max(a, b) for a, b in zip(old_counts, counts)]
            new_total = max(old_total, total)
            if add:
                target.add([n - o for n, o in zip(new_counts, old_counts)], new_total - old_total)
            seen_hists[name] = (new_counts, new_total)
        self._streams.touch(epoch, (seen_counters, seen_hists))


class BrokerMetrics:
    """What the broker's loop records for the exporter: plain ints and bucket arrays, updated on
    the loop's thread only (each call is a few attribute operations)."""

    def __init__(self, pool: PoolTotals) -> None:
        self.request_latency = BucketCounts(LATENCY_BUCKETS_S)  # receipt -> worker's answer forwarded
        self.queue_wait = BucketCounts(LATENCY_BUCKETS_S)       # receipt -> dispatch
        self.errors = dict.fromkeys((*P.ERROR_CODES, OTHER_CODE), 0)  # ERRORs sent to clients, by code
        self.pool = pool  # the broker's own (its STATS totals are these counters too)
        self.registrations = 0
        self.restarts = 0
        self._slot_pids: dict[str, int | None] = {}  # slot -> the pid of its last READY

    def count_error(self, code: str | None) -> None:
        key = code if code in self.errors else OTHER_CODE
        self.errors[key] += 1

    def on_ready(self, slot: str | None, pid: int | None) -> None:
        """A READY accepted: a restart when its slot registered before from another pid (a pid
        unknown on either side counts as another); the same pid is a re-registration (after a
        pause, a DISCONNECT or a broker stall), which no operator should read as a crash."""
        self.registrations += 1
        if slot is None:
            return
        if slot in self._slot_pids:
            if pid is None or self._slot_pids[slot] != pid:
                self.restarts += 1
            self._slot_pids[slot] = pid
        elif len(self._slot_pids) < MAX_SLOTS:
            self._slot_pids[slot] = pid


def _retry(read: Callable[[], Any]) -> Any:
    """Run a read of the loop's containers from the scrape thread; a dict resized meanwhile raises
    RuntimeError, so try again (bounded)."""
    for _ in range(20):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


class BrokerCollector:
    """A prometheus-client custom collector reading one broker's state at scrape time."""

    def __init__(self, broker: Broker, version: str) -> None:
        self._broker = broker
        self._version = version

    def describe(self) -> list:
        """One empty family per exported metric (METRICS), of the type collect() yields.

        The registry learns the sample names from these: prometheus-client's ``?name[]=``
        filter (``/metrics?name[]=bertpool_inferences_total``) serves only collectors whose
        names it knows, so a collector describing nothing answered every filtered scrape with
        an empty body (200 OK, no samples: a target that looks healthy but reports nothing).
        Never touches the broker (registration happens before it serves)."""
        return prometheus.describe_families(METRICS, HISTOGRAMS)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        b = self._broker
        c, m = b.counters, b.metrics

        def counter(name: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name[:-len("_total")], METRICS[name], value=value)

        def gauge(name: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, METRICS[name], value=value)

        requests = CounterMetricFamily("bertpool_requests", METRICS["bertpool_requests_total"], labels=["outcome"])
        requests.add_metric(["ok"], c.replies)
        requests.add_metric(["busy"], c.busy)
        for code, n in dict(m.errors).items():
            requests.add_metric([code], n)
        yield requests
        yield counter("bertpool_requests_redispatched_total", c.redispatched)
        yield counter("bertpool_replies_dropped_total", c.dropped)
        yield counter("bertpool_late_replies_dropped_total", c.late_replies_dropped)
        yield counter("bertpool_malformed_worker_messages_total", c.dropped_malformed)
        pool = dict(m.pool.counters)
        for name in POOL_COUNTERS:
            yield counter(f"bertpool_{name}_total", pool[name])
        yield counter("bertpool_worker_registrations_total", m.registrations)
        yield counter("bertpool_worker_restarts_total", m.restarts)
        yield counter("bertpool_workers_lost_total", c.workers_lost)

        # The loop's containers: snapshot each worker's few fields at once.
        workers = _retry(lambda: [(w.slot or w.name, len(w.inflight), w.capacity, w.backend, w.ready)
                                  for w in list(b._workers.values())])
        yield gauge("bertpool_queue_depth_requests", len(b._queue))
        yield gauge("bertpool_queue_depth_bytes", b._queue_bytes)
        yield gauge("bertpool_workers_alive", len(workers))
        yield gauge("bertpool_capacity_requests", sum(w[2] for w in workers))
        inflight = GaugeMetricFamily("bertpool_worker_inflight_requests", METRICS["bertpool_worker_inflight_requests"],
                                     labels=["worker"])
        for label, held, *_ in workers:
            inflight.add_metric([label], held)
        yield inflight

        yield _histogram("bertpool_request_latency_seconds", m.request_latency)
        yield _histogram("bertpool_queue_wait_seconds", m.queue_wait)
        for name, h in m.pool.histograms.items():
            yield _histogram(f"bertpool_{name}", h)

        build = GaugeMetricFamily("bertpool_build_info", METRICS["bertpool_build_info"], labels=["version"])
        build.add_metric([self._version], 1)
        yield build
        models: collections.Counter = collections.Counter()
        for _, _, _, backend, ready in workers:
            models[(backend or "unknown", *(getattr(ready, k, None) or "unknown"
                                            for k in ("model_hash", "dtype", "target", "version")))] += 1
        info = GaugeMetricFamily("bertpool_model_info", METRICS["bertpool_model_info"],
                                 labels=["backend", "model_hash", "dtype", "target", "version"])
        for labels, n in sorted(models.items()):
            info.add_metric(list(labels), n)
        yield info


def _histogram(name: str, h: BucketCounts):
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    counts, total = h.snapshot()
    cumulative, buckets = 0, []
    for bound, n in zip((*h.bounds, float("inf")), counts):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))
    return HistogramMetricFamily(name, METRICS[name], buckets=buckets, sum_value=total)


class MetricsServer(prometheus.MetricsServer):
    """The HTTP endpoint (prometheus-client's WSGI server on a daemon thread) for one broker."""

    def __init__(self, broker: Broker, address: str) -> None:
        from .. import __version__

        super().__init__(address, [BrokerCollector(broker, __version__)])
        log.info("metrics on %s", self.url)


__all__ = ["BATCH_FILL_BUCKETS_ROWS", "LATENCY_BUCKETS_S", "METRICS", "BrokerMetrics", "MetricsServer",
           "PoolTotals"]
