"""What the pool measures for Prometheus: bucket bounds, plain histograms, the address flag.

Kept free of prometheus-client, so the workers (which only count, and send
their counts to the broker in STATS) never need it; the broker's exporter
(:mod:`bertpool.broker.metrics`) turns these into Prometheus families at scrape
time. (``common.metrics`` is unrelated: accuracy and F1 of predictions.)

Histograms are plain per-bucket counts, updated with one ``bisect`` and no
lock on the broker's single loop thread (``BucketCounts``), or under a small
lock on a worker, whose two threads share them (``WorkerHistograms``).
Prometheus semantics: bucket ``le=b`` holds observations ``<= b``; the last
count is the ``+Inf`` bucket's own.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any


# Latency buckets in seconds, for every *_seconds histogram (broker's and workers'):
# 0.5 ms (an echo round trip) to 10 s (a stuck request), about 2.5x apart.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Real rows per model call: every batch size up to 8 exactly, then coarser.
BATCH_FILL_BUCKETS_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128)

# The histograms a worker sends in STATS: wire name -> bucket bounds.
WORKER_HISTOGRAMS = {
    "batch_wait_seconds": LATENCY_BUCKETS_S,   # per request: arrival at the worker to its batch's start
    "compute_seconds": LATENCY_BUCKETS_S,      # per batch: the model call (padding included)
    "batch_fill_rows": BATCH_FILL_BUCKETS_ROWS,  # per batch: real rows in it
}


class BucketCounts:
    """One histogram as plain counts: ``observe`` is one bisect and two additions.

    Not locked: use it from one thread, and read it from another only for a
    scrape (``snapshot``), where one observation more or less does not matter.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is the +Inf bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's per-bucket counts (same bounds) and sum."""
        for i, c in enumerate(counts):
            self.counts[i] += c
        self.sum += total

    def snapshot(self) -> tuple[list[int], float]:
        return list(self.counts), self.sum


class WorkerHistograms:
    """A worker's WORKER_HISTOGRAMS, cumulative since the process started. The compute thread
    observes each batch; the I/O thread snapshots them for STATS: both under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._h = {name: BucketCounts(bounds) for name, bounds in WORKER_HISTOGRAMS.items()}

    def observe_batch(self, batch_waits_s: list[float], compute_s: float) -> None:
        """One model call: each real row's wait for the batch, and the call's duration."""
        with self._lock:
            waits = self._h["batch_wait_seconds"]
            for wait in batch_waits_s:
                waits.observe(wait)
            self._h["compute_seconds"].observe(compute_s)
            self._h["batch_fill_rows"].observe(len(batch_waits_s))

    def as_wire(self) -> dict[str, dict[str, Any]]:
        """A consistent snapshot in STATS's ``histograms`` format."""
        with self._lock:
            return {name: {"counts": list(h.counts), "sum": h.sum} for name, h in self._h.items()}
