"""Dynamic batching: one class, one contract.

A :class:`Batcher` collects items from any number of producer threads and hands
them to one consumer in batches. ``next_batch()`` returns as soon as either

* ``batch_size`` items are queued (flush at size), or
* ``batch_timeout_ms`` has passed since the *oldest* queued item arrived
  (flush at the deadline),

and never returns an empty batch. ``batch_timeout_ms=0`` flushes whatever is
queued the moment there is at least one item. Items keep arrival order.
"""

from __future__ import annotations

import collections
import ctypes
import sys
import threading
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..common.errors import ConfigError
from ..compile.runtime import MAX_BATCH_SIZE  # the bound on a batch anything here builds or serves

T = TypeVar("T")

# Longest batch_timeout_ms: a minute. Batching trades milliseconds of latency for throughput, and a
# minute is already twice a Client's default request deadline (30 s): a lone request waiting longer
# for companions would only ever be answered after its client gave up. Far above any tuned value
# (README: 0-30 ms), it still allows "flush at size, in effect" for tests and benches; past it a typo
# (1e308 was accepted) turned "wait until the batch fills" into "never".
MAX_BATCH_TIMEOUT_MS = 60_000.0


_PR_SET_TIMERSLACK = 29  # linux/prctl.h
PRECISE_TIMER_SLACK_NS = 1000  # the slack precise_deadlines() asks for


def precise_deadlines() -> bool:
    """Let the calling thread's timed waits end within about a microsecond of their timeout, where
    Linux would otherwise add up to its default 50 us of timer slack (measured here: a batch
    deadline met 80-110 us late instead of 40-60 us). Call it on a thread that waits for batch
    deadlines; True where it took effect (Linux), False elsewhere (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, PRECISE_TIMER_SLACK_NS, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class BatcherClosed(Exception):
    """Raised by next_batch() once the batcher is closed and drained."""


@dataclass(frozen=True)
class BatcherConfig:
    batch_size: int = 4            # flush as soon as this many items are queued
    batch_timeout_ms: float = 5.0  # flush this long after the oldest queued item arrived

    def __post_init__(self) -> None:
        # The one check of these two settings: WorkerConfig runs it too, at parse time.
        # At most what bertpool-compile builds: a larger batch fits no model here, and a typo
        # (99999999999999999999) died in numpy at warm-up instead of here.
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be >= 1 and at most {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0 <= self.batch_timeout_ms <= MAX_BATCH_TIMEOUT_MS:  # NaN would never flush a partial batch
            raise ConfigError(f"batch_timeout_ms must be a number >= 0 and at most {MAX_BATCH_TIMEOUT_MS:.0f} "
                              f"(a minute), got {self.batch_timeout_ms}")


class Batcher(Generic[T]):
    """Thread-safe size-or-deadline batcher (see module docstring for the contract)."""

    def __init__(self, config: BatcherConfig) -> None:
        self.config = config
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T, arrived: float | None = None) -> None:
        """Queue one item; ``arrived`` (time.monotonic()) defaults to now."""
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._items.append((time.monotonic() if arrived is None else arrived, item))
            # Wake the consumer only when this item can change its decision.
            if len(self._items) == 1 or len(self._items) >= self.config.batch_size:
                self._cond.notify()

    def put_many(self, items: list[T], arrived: float | None = None) -> None:
        """Queue ``items`` in order, all arrived at ``arrived`` (default now), under one lock and
        with at most one wake-up of the consumer: the cheap way to hand over a burst received
        together. Same contract as put() for each item: the batch boundaries do not depend on
        how items were handed over (a full batch is due at once, a partial one at its deadline)."""
        if not items:
            return
        stamp = time.monotonic() if arrived is None else arrived
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            was = len(self._items)
            self._items.extend((stamp, item) for item in items)
            if was == 0 or len(self._items) >= self.config.batch_size:
                self._cond.notify()

    @property
    def closed(self) -> bool:
        """close() was called."""
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def next_batch(self, timeout_s: float | None = None) -> list[tuple[float, T]]:
        """Block until a batch is due; return ``[(arrived, item), ...]`` (1..max items).

        Returns ``[]`` only when ``timeout_s`` elapses with nothing queued (a
        batch already started is always waited out to its deadline).
        Raises BatcherClosed once closed and empty; items queued before close()
        are still handed out.
        """
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                now = time.monotonic()
                if self._items:
                    due = self._items[0][0] + self.config.batch_timeout_ms / 1000.0
                    if (len(self._items) >= self.config.batch_size or now >= due
                            or self._closed):
                        return self._take()
                    wait = due - now
                elif self._closed:
                    raise BatcherClosed("batcher is closed")
                elif give_up is not None and now >= give_up:
                    return []
                else:
                    wait = None if give_up is None else give_up - now
                self._cond.wait(wait)

    def take_due(self) -> list[tuple[float, T]]:
        """The batch next_batch() would return now, without waiting: ``[]`` when none is due yet
        (nothing queued, or fewer than max items whose deadline is still ahead). After close(),
        whatever is queued is due. For a consumer that also does other work (the worker's I/O
        thread); pair it with :meth:`due_at` to know how long it may block elsewhere."""
        with self._cond:
            if self._items and (len(self._items) >= self.config.batch_size or self._closed
                                or time.monotonic() >= self._due()):
                return self._take()
            return []

    def due_at(self) -> float | None:
        """time.monotonic() at which the queued items make a batch due (None: nothing queued)."""
        with self._cond:
            if not self._items:
                return None
            if len(self._items) >= self.config.batch_size or self._closed:
                return self._items[0][0]
            return self._due()

    def _due(self) -> float:
        return self._items[0][0] + self.config.batch_timeout_ms / 1000.0

    def close(self) -> None:
        """Stop accepting items; the consumer drains what is queued, then gets BatcherClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[tuple[float, T]]:
        n = min(len(self._items), self.config.batch_size)
        return [self._items.popleft() for _ in range(n)]
