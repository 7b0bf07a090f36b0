"""The batcher's contract: flush at size or at the deadline, never empty, keep order."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest

from bertpool.common.errors import ConfigError
from bertpool.workers.batcher import (PRECISE_TIMER_SLACK_NS, Batcher, BatcherClosed, BatcherConfig,
                                      precise_deadlines)


def make(batch_size=4, batch_timeout_ms=50.0) -> Batcher:
    return Batcher(BatcherConfig(batch_size, batch_timeout_ms))


@pytest.mark.parametrize("size", [1, 4, 7])
def test_flushes_at_size_without_waiting_for_the_deadline(size):
    b = make(size, batch_timeout_ms=60_000)
    for i in range(size + 2):
        b.put(i)
    batch = b.next_batch(timeout_s=5)
    assert [item for _, item in batch] == list(range(size))
    assert len(b) == 2


def test_flushes_partial_batch_at_the_deadline_of_the_oldest_item():
    b = make(4, batch_timeout_ms=40)
    arrived = time.monotonic()
    b.put("a", arrived)
    b.put("b")
    batch = b.next_batch(timeout_s=5)
    waited = time.monotonic() - arrived
    assert [item for _, item in batch] == ["a", "b"]
    assert waited >= 0.039
    assert waited < 5  # bounded: it did not wait for the give-up timeout


def test_item_that_already_waited_flushes_at_once():
    b = make(4, batch_timeout_ms=10_000)
    b.put("old", time.monotonic() - 20)  # e.g. arrived while the model was busy
    assert [item for _, item in b.next_batch(timeout_s=1)] == ["old"]


def test_timeout_zero_flushes_whatever_is_there():
    b = make(4, batch_timeout_ms=0)
    b.put(1)
    b.put(2)
    assert [item for _, item in b.next_batch(timeout_s=1)] == [1, 2]


def test_never_returns_an_empty_batch_only_an_explicit_give_up():
    b = make(4, batch_timeout_ms=0)
    assert b.next_batch(timeout_s=0.01) == []  # nothing queued: the caller's timeout, not a batch


def test_consumer_wakes_when_first_item_arrives():
    b = make(1, batch_timeout_ms=0)
    got: list = []
    consumer = threading.Thread(target=lambda: got.extend(b.next_batch(timeout_s=10)))
    consumer.start()
    b.put("x")
    consumer.join(10)
    assert [item for _, item in got] == ["x"]


def test_close_drains_then_raises():
    b = make(4, batch_timeout_ms=60_000)
    b.put(1)
    b.close()
    assert [item for _, item in b.next_batch()] == [1]  # handed out at once, not at the deadline
    with pytest.raises(BatcherClosed):
        b.next_batch()
    with pytest.raises(BatcherClosed):
        b.put(2)


def test_concurrent_producers_lose_nothing_and_keep_per_producer_order():
    b = make(4, batch_timeout_ms=1)
    n_producers, per = 8, 250

    def produce(p):
        for i in range(per):
            b.put((p, i))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    for t in threads:
        t.start()
    got = []
    deadline = time.monotonic() + 30
    while len(got) < n_producers * per and time.monotonic() < deadline:
        batch = b.next_batch(timeout_s=1)
        assert len(batch) <= 4
        got.extend(item for _, item in batch)
    for t in threads:
        t.join(10)
    assert len(got) == n_producers * per
    for p in range(n_producers):
        assert [i for q, i in got if q == p] == list(range(per))


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be >= 1 and at most 1024, got 0"),
    # bertpool-compile's bound: a typo used to die in numpy at warm-up (or in a restart loop)
    ({"batch_size": 1025}, "batch_size must be >= 1 and at most 1024, got 1025"),
    ({"batch_size": 99999999999999999999}, "at most 1024, got 99999999999999999999"),
    ({"batch_timeout_ms": -1}, "batch_timeout_ms must be a number >= 0 and at most 60000 \\(a minute\\), got -1"),
    ({"batch_timeout_ms": float("nan")}, "batch_timeout_ms must be a number >= 0 .*, got nan"),
    # "wait for the batch to fill" must not become "never": 1e308 and inf were accepted
    ({"batch_timeout_ms": 60_000.001}, "at most 60000 \\(a minute\\), got 60000.001"),
    ({"batch_timeout_ms": 1e308}, "at most 60000 \\(a minute\\), got 1e\\+308"),
    ({"batch_timeout_ms": float("inf")}, "at most 60000 \\(a minute\\), got inf"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BatcherConfig(**kwargs)


def test_the_bounds_themselves_are_accepted():
    assert BatcherConfig(batch_size=1024, batch_timeout_ms=60_000).batch_timeout_ms == 60_000


# ------------------------------------------- burst handoff and the non-blocking consumer

@pytest.mark.parametrize("size", [1, 4])
def test_put_many_flushes_at_size_and_wakes_a_waiting_consumer(size):
    """A burst handed over at once (one lock, one wake-up) makes the same batches as puts would."""
    b = make(size, batch_timeout_ms=60_000)
    got = []
    consumer = threading.Thread(target=lambda: got.append(b.next_batch(timeout_s=10)))
    consumer.start()
    b.put_many(list(range(size + 2)))
    consumer.join(10)
    assert not consumer.is_alive()
    assert [item for _, item in got[0]] == list(range(size))
    assert len(b) == 2


def test_put_many_partial_burst_flushes_at_the_deadline():
    b = make(4, batch_timeout_ms=40)
    arrived = time.monotonic()
    b.put_many(["a", "b"], arrived)
    b.put_many([])  # nothing to hand over: no change, no wake-up
    batch = b.next_batch(timeout_s=5)
    assert [item for _, item in batch] == ["a", "b"]
    assert 0.039 <= time.monotonic() - arrived < 5


def test_take_due_never_blocks_and_never_returns_a_batch_before_it_is_due():
    b = make(4, batch_timeout_ms=60_000)
    assert b.take_due() == [] and b.due_at() is None  # empty: nothing due, never empty batches
    arrived = time.monotonic()
    b.put_many(["a", "b", "c"], arrived)
    assert b.take_due() == []  # partial, deadline far ahead
    assert b.due_at() == pytest.approx(arrived + 60.0)
    b.put("d")
    assert b.due_at() == arrived  # full: due now
    assert [item for _, item in b.take_due()] == ["a", "b", "c", "d"]


def test_take_due_flushes_a_partial_batch_at_its_deadline():
    b = make(4, batch_timeout_ms=30)
    b.put("a")
    deadline = time.monotonic() + 5
    while not (batch := b.take_due()):
        assert time.monotonic() < deadline
        time.sleep(max(0.0, b.due_at() - time.monotonic()))
    assert [item for _, item in batch] == ["a"]


def test_take_due_after_close_hands_out_everything_then_nothing():
    b = make(2, batch_timeout_ms=60_000)
    b.put_many([1, 2, 3])
    b.close()
    assert b.closed
    assert [item for _, item in b.take_due()] == [1, 2]
    assert [item for _, item in b.take_due()] == [3]
    assert b.take_due() == []
    with pytest.raises(BatcherClosed):
        b.put_many([4])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is a Linux setting")
def test_precise_deadlines_sets_this_threads_timer_slack_only():
    get_slack = lambda: ctypes.CDLL(None).prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
    seen = {}

    def thread():
        seen["before"] = get_slack()
        seen["took"] = precise_deadlines()
        seen["after"] = get_slack()

    t = threading.Thread(target=thread)
    t.start()
    t.join(10)
    assert seen["took"] and seen["after"] == PRECISE_TIMER_SLACK_NS != seen["before"]
    assert get_slack() != PRECISE_TIMER_SLACK_NS  # other threads keep theirs
