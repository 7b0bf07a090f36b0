"""Client library: futures, timeouts, BUSY, ERROR, thread safety, closing."""

from __future__ import annotations

import gc
import os
import pickle
import re
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import pytest
import zmq

from bertpool.broker.broker import Broker, BrokerConfig
from bertpool.clients.client import Client, Prediction
from bertpool.common import protocol as P
from bertpool.common.errors import (BrokerUnavailable, ClientClosed, ConfigError, DeadlineExceeded, InputError,
                                    MalformedReply, RemoteError, RequestTimeout, ServerBusy, UsageError)
from conftest import free_tcp_port, run_threads, start_module, stop_processes

WAIT_MS = 5000


@pytest.fixture
def bare_broker(tmp_path):
    """A broker with no workers: requests queue until they time out or hit BUSY."""
    b = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b", max_queue=3))
    b.bind()
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    yield b
    b.stop()
    t.join(5)


def test_timeout_raises_typed_error(bare_broker):
    with Client(bare_broker.config.frontend, timeout_s=0.2) as client:
        with pytest.raises(DeadlineExceeded):  # a RequestTimeout, so `except RequestTimeout` still works
            client.predict("nobody", "answers")
        with pytest.raises(TimeoutError):  # also a builtin TimeoutError
            client.submit("a", "b", timeout_s=0.05).result()


def test_busy_raises_server_busy(bare_broker):
    with Client(bare_broker.config.frontend, timeout_s=2) as client:
        futures = [client.submit("a", str(i)) for i in range(4)]
        with pytest.raises(ServerBusy):
            futures[3].result()
        with pytest.raises(RequestTimeout):
            futures[0].result()


def test_close_fails_pending_requests(bare_broker):
    client = Client(bare_broker.config.frontend, timeout_s=30)
    future = client.submit("a", "b")
    client.close()
    with pytest.raises(ClientClosed):
        future.result(timeout=5)
    with pytest.raises(ClientClosed):
        client.submit("a", "b")
    client.close()  # idempotent


def test_stats(bare_broker):
    with Client(bare_broker.config.frontend) as client:
        stats = client.stats()
    assert stats["workers"] == {} and "broker" in stats


@pytest.mark.parametrize("kwargs", [
    {"address": "localhost:5555"}, {"timeout_s": 0}, {"max_in_flight": 0}, {"heartbeat_interval_s": 0},
    {"heartbeat_liveness": 0}, {"heartbeat_liveness": 1.5}, {"busy_retries": -1}, {"busy_retries": True},
    {"lost_retries": -1}, {"backoff_initial_s": 0}, {"backoff_initial_s": 0.5, "backoff_max_s": 0.1},
    {"timeout_s": "1"}, {"timeout_s": float("inf")}, {"timeout_s": float("nan")}, {"timeout_s": 1e12},
    {"backoff_max_s": float("inf")},
    {"heartbeat_liveness": 10**20},  # a broker dead for ages would still pass for alive
    {"heartbeat_interval_s": 3600, "heartbeat_liveness": 25},
])
def test_bad_client_config(kwargs):
    with pytest.raises(ConfigError):
        Client(**{"address": "tcp://127.0.0.1:5555", **kwargs})


@pytest.mark.parametrize("timeout_s", [0, float("inf"), 1e12, float("nan")])
def test_a_per_call_timeout_must_be_finite_and_at_most_a_day(bare_broker, timeout_s):
    """inf or 1e12 would overflow the waits (OverflowError) and outlive any deadline the wire can carry."""
    with Client(bare_broker.config.frontend) as client, pytest.raises(ConfigError, match="at most 86400 s"):
        client.submit("a", "b", timeout_s=timeout_s)


def test_non_string_text_is_a_type_error(bare_broker):
    with Client(bare_broker.config.frontend) as client, pytest.raises(TypeError):
        client.submit(b"bytes", "b")


def test_many_threads_share_one_client(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    results: dict[int, list[Prediction]] = {}
    with Client(pool.address, timeout_s=30) as client:
        def work(t: int) -> None:
            results[t] = client.predict_many([(f"thread {t}", f"item {i}") for i in range(25)],
                                             max_in_flight=5)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8))
    assert all(len(r) == 25 for r in results.values())
    ids = [p.id for r in results.values() for p in r]
    assert len(set(ids)) == len(ids)


def test_error_reply_raises_remote_error(start_pool):
    pool = start_pool("--backend", "echo", parallel=1)
    with Client(pool.address, timeout_s=10) as client:
        with pytest.raises(RemoteError) as err:
            client.predict("   ", "empty a")
    assert err.value.code == "bad_text"


# ------------------------------------------------ replies the client cannot use

@pytest.fixture
def fake_broker(tmp_path):
    """A raw ROUTER standing in for the broker: the test reads requests and writes any reply."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/fake"
    router.bind(address)
    yield router, address
    router.close()


def take(router: zmq.Socket) -> tuple[bytes, bytes, dict]:
    """The next message a client sent: (identity, kind, body)."""
    assert router.poll(WAIT_MS), "the client sent nothing"
    identity, version, kind, body = router.recv_multipart()
    assert version == P.VERSION
    return identity, kind, P.unpack(body)


def good_reply(router: zmq.Socket, identity: bytes, request_id) -> None:
    router.send_multipart([identity, P.VERSION, P.REPLY, P.reply_body(request_id, [0.25, 0.75], {})])


def assert_still_serving(client: Client, router: zmq.Socket) -> None:
    """The I/O thread survived: a later request still gets its answer."""
    future = client.submit("after", "the bad reply")
    identity, _, body = take(router)
    good_reply(router, identity, body["id"])
    assert future.result(timeout=WAIT_MS / 1000).label == 1


MALFORMED_REPLIES = {
    "probabilities_not_an_array": (P.REPLY, {"label": 1, "probabilities": "x", "timings": {}}),
    "probabilities_bad_bytes": (P.REPLY, {"label": 1, "timings": {}, "probabilities": {
        "__nd__": True, "dtype": "f4", "shape": [2], "data": b"123"}}),
    "probabilities_wrong_shape": (P.REPLY, {"label": 0, "timings": {},
                                            "probabilities": P.encode_array(np.zeros(5, np.float32))}),
    "missing_label": (P.REPLY, {"probabilities": P.encode_array(np.zeros(2, np.float32)), "timings": {}}),
    "label_not_an_int": (P.REPLY, {"label": "one", "timings": {},
                                   "probabilities": P.encode_array(np.zeros(2, np.float32))}),
    "label_a_list": (P.REPLY, {"label": [1], "timings": {},
                               "probabilities": P.encode_array(np.zeros(2, np.float32))}),
    "label_out_of_range": (P.REPLY, {"label": 7, "timings": {},
                                     "probabilities": P.encode_array(np.zeros(2, np.float32))}),
    "timings_not_a_map": (P.REPLY, {"label": 1, "timings": "fast",
                                    "probabilities": P.encode_array(np.zeros(2, np.float32))}),
    "timing_not_a_number": (P.REPLY, {"label": 1, "timings": {"queue_ms": "slow"},
                                      "probabilities": P.encode_array(np.zeros(2, np.float32))}),
    "error_code_not_a_string": (P.ERROR, {"code": [1], "message": "m"}),
    "busy_message_not_a_string": (P.BUSY, {"message": {"a": 1}}),
    "unknown_kind": (b"\x7f", {}),
}


@pytest.mark.parametrize("blocking", [False, True], ids=["submit", "predict"])  # predict: the short way (_lone)
@pytest.mark.parametrize("name", sorted(MALFORMED_REPLIES))
def test_malformed_reply_settles_its_request_and_the_client_survives(fake_broker, name, blocking):
    router, address = fake_broker
    kind, fields = MALFORMED_REPLIES[name]
    with Client(address, timeout_s=30) as client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.predict, "a", "b") if blocking else client.submit("a", "b")
        identity, _, body = take(router)
        router.send_multipart([identity, P.VERSION, kind, P.pack({"id": body["id"], **fields})])
        with pytest.raises(RemoteError) as err:  # settles at once, long before the 30 s deadline
            future.result(timeout=WAIT_MS / 1000)
        assert isinstance(err.value, MalformedReply) and err.value.code.startswith("bad_")
        assert_still_serving(client, router)


@pytest.mark.parametrize("frames", [
    [P.VERSION, P.REPLY, b"\xc1 not msgpack"],
    [P.VERSION, P.REPLY, P.msgpack.packb([1, 2])],
    [P.VERSION, P.REPLY, P.pack({"id": [1], "label": 1})],       # unhashable id
    [P.VERSION, P.REPLY, P.pack({"label": 1})],                  # no id
    [b"BP0", P.REPLY, P.pack({"id": "x"})],
    [P.VERSION, P.REPLY],
])
def test_reply_naming_no_request_is_counted_and_dropped(fake_broker, frames):
    router, address = fake_broker
    with Client(address, timeout_s=30) as client:
        future = client.submit("a", "b", timeout_s=0.5)
        identity, _, _ = take(router)
        router.send_multipart([identity, *frames])
        with pytest.raises(RequestTimeout):  # nothing says which request it was: its deadline ends it
            future.result(timeout=WAIT_MS / 1000)
        assert client.counters.malformed_replies == 1
        assert_still_serving(client, router)


def test_reply_to_an_unknown_id_is_counted_and_dropped(fake_broker):
    router, address = fake_broker
    with Client(address, timeout_s=30) as client:
        future = client.submit("a", "b", timeout_s=0.2)
        identity, _, body = take(router)
        with pytest.raises(RequestTimeout):
            future.result(timeout=WAIT_MS / 1000)
        good_reply(router, identity, body["id"])   # too late
        good_reply(router, identity, "never-sent")
        assert_still_serving(client, router)
        assert client.counters.late_replies == 1     # ours, but it had expired
        assert client.counters.unknown_replies == 1  # never ours


def test_late_stats_reply_is_dropped_not_given_to_the_next_call(fake_broker):
    router, address = fake_broker
    with Client(address, timeout_s=30) as client, ThreadPoolExecutor(1) as pool:
        with pytest.raises(RequestTimeout):
            client.stats(timeout_s=0.2)
        identity, kind, first = take(router)
        assert kind == P.STATS
        second = pool.submit(client.stats)
        _, _, body = take(router)
        for rid, answer in ((first["id"], "first"), (body["id"], "second")):  # the late one first
            router.send_multipart([identity, P.VERSION, P.STATS, P.stats_reply(rid, {"answer_to": answer})])
        assert second.result(timeout=WAIT_MS / 1000) == {"answer_to": "second"}
        assert client.counters.late_replies == 1


def test_close_while_many_threads_submit_settles_every_future(bare_broker):
    """Every future a submit() returned settles, however close() interleaves with it;
    a submit() that loses the race raises ClientClosed and nothing else."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so close() lands inside submit()s
    try:
        for _ in range(20):
            _close_during_submits(bare_broker.config.frontend)
    finally:
        sys.setswitchinterval(switch_interval)


def _close_during_submits(address: str) -> None:
    client = Client(address, timeout_s=30)
    futures: list[Future] = []
    unexpected: list[BaseException] = []
    some_sent = threading.Event()

    def submit_until_closed() -> None:
        for i in range(500):
            try:
                futures.append(client.submit("a", str(i)))
            except ClientClosed:
                return
            except BaseException as exc:  # surfaced below
                unexpected.append(exc)
                return
            if i == 20:
                some_sent.set()

    threads = [threading.Thread(target=submit_until_closed) for _ in range(8)]
    for t in threads:
        t.start()
    assert some_sent.wait(WAIT_MS / 1000)
    client.close()
    for t in threads:
        t.join(WAIT_MS / 1000)
    assert not any(t.is_alive() for t in threads)
    assert not unexpected, unexpected[:3]
    _, not_done = wait(futures, timeout=WAIT_MS / 1000)
    assert not not_done, f"{len(not_done)} of {len(futures)} futures never settled"
    assert all(isinstance(f.exception(), (ClientClosed, ServerBusy)) for f in futures)


class _CloseBeforePut:
    """An outbox whose first put() lets close() run first (as a thread switch could)."""

    def __init__(self, client: Client) -> None:
        self.queue, self.closer = client._outbox, threading.Thread(target=client.close)

    def put(self, item) -> None:
        if not self.closer.is_alive() and self.closer.ident is None:
            self.closer.start()
            self.closer.join(1.0)  # bounded: with the fix, close() waits for this submit()
        self.queue.put(item)

    def get_nowait(self):
        return self.queue.get_nowait()


def test_close_landing_between_check_and_enqueue_still_settles_the_future(bare_broker):
    client = Client(bare_broker.config.frontend, timeout_s=30)
    outbox = client._outbox = _CloseBeforePut(client)
    try:
        future = client.submit("a", "b")
    except ClientClosed:
        future = None
    outbox.closer.join(WAIT_MS / 1000)
    assert not outbox.closer.is_alive()
    if future is not None:
        with pytest.raises(ClientClosed):
            future.result(timeout=WAIT_MS / 1000)


# ------------------------------------- deadlines, retries, liveness, broker restarts

def test_positional_arguments_still_work_and_settings_go_by_keyword(fake_broker):
    _, address = fake_broker
    with Client(address, 5, 8, None, busy_retries=1, heartbeat_interval_s=0.5) as client:
        config = client.config
    assert (config.address, config.timeout_s, config.max_in_flight) == (address, 5, 8)
    assert (config.busy_retries, config.heartbeat_interval_s, config.lost_retries) == (1, 0.5, 2)


def reply(body: dict) -> list[tuple[bytes, bytes]]:
    return [(P.REPLY, P.reply_body(body["id"], [0.25, 0.75], {"compute_ms": 1.0}))]


def echo(kind: bytes, body: dict, seen: int) -> list[tuple[bytes, bytes]]:
    """Answer every REQUEST with a REPLY (label 1) and every STATS with a tiny map."""
    if kind == P.STATS:
        return [(P.STATS, P.stats_reply(body["id"], {"answered_by": "fake"}))]
    return reply(body)


def silent(kind: bytes, body: dict, seen: int) -> list:
    return []


class FakeBroker:
    """A stand-in broker: a ROUTER bound to ``address``, served by a thread that records every
    message and answers it with ``answer(kind, body, seen)`` (seen: how many times that id came,
    from 1), and HEARTBEATs at once when ``heartbeats``. Requests whose text_a is "hold" are kept
    unanswered until release(). stop() closes the socket, as a killed broker's would be."""

    def __init__(self, address: str, answer=echo, heartbeats: bool = True) -> None:
        self.address, self.answer, self.heartbeats = address, answer, heartbeats
        self.log: list[tuple[bytes, dict]] = []  # (kind, body) of every message, in order
        self._seen: dict = {}
        self._held: list[tuple[bytes, dict]] = []
        self._changed = threading.Condition()
        self._release = threading.Event()
        self._stop = threading.Event()
        self._router = zmq.Context.instance().socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(address)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._release.is_set():
                    self._release.clear()
                    for identity, body in self._held:
                        self._send(identity, reply(body))
                    self._held.clear()
                if not self._router.poll(10):
                    continue
                identity, version, kind, raw = self._router.recv_multipart()
                assert version == P.VERSION
                body = P.unpack(raw)
                with self._changed:
                    self.log.append((kind, body))
                    self._changed.notify_all()
                if kind == P.HEARTBEAT:
                    if self.heartbeats:
                        self._send(identity, [(P.HEARTBEAT, P.heartbeat_body())])
                    continue
                self._seen[body["id"]] = seen = self._seen.get(body["id"], 0) + 1
                if body.get("text_a") == "hold":
                    self._held.append((identity, body))
                else:
                    self._send(identity, self.answer(kind, body, seen))
        finally:
            self._router.close(linger=0)

    def _send(self, identity: bytes, messages) -> None:
        for kind, body in messages:
            self._router.send_multipart([identity, P.VERSION, kind, body])

    def requests(self) -> list[dict]:
        with self._changed:
            return [body for kind, body in self.log if kind == P.REQUEST]

    def count(self, kind: bytes) -> int:
        with self._changed:
            return sum(k == kind for k, _ in self.log)

    def wait_for(self, kind: bytes, n: int, timeout_s: float = WAIT_MS / 1000) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: sum(k == kind for k, _ in self.log) >= n, timeout_s), \
                f"fake broker got {sum(k == kind for k, _ in self.log)} of {n} {P.KIND_NAMES[kind]}"

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_MS / 1000)
        assert not self._thread.is_alive()


@pytest.fixture
def fake_brokers():
    """Factory of FakeBrokers, every one stopped at teardown."""
    started: list[FakeBroker] = []

    def start(address: str, answer=echo, heartbeats: bool = True) -> FakeBroker:
        started.append(FakeBroker(address, answer, heartbeats))
        return started[-1]
    yield start
    for broker in started:
        if broker._thread.is_alive():
            broker.stop()


FAST = {"heartbeat_interval_s": 0.05, "heartbeat_liveness": 3}  # presumed dead after 0.15 s of silence


def busy_then_reply(busy_times: int):
    def answer(kind: bytes, body: dict, seen: int):
        if seen <= busy_times:
            return [(P.BUSY, P.busy_body(body["id"], "queue full"))]
        return echo(kind, body, seen)
    return answer


def test_deadline_ms_is_sent_and_shrinks_on_a_resend(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", busy_then_reply(1))
    with Client(broker.address, timeout_s=5, backoff_initial_s=0.05, backoff_max_s=0.05) as client:
        assert client.predict("a", "b").label == 1
        client.submit_features(np.ones(8, np.int32), np.ones(8, np.int32), np.zeros(8, np.int32), timeout_s=2).result(WAIT_MS / 1000)
        assert client.stats() == {"answered_by": "fake"}  # BUSY once, then answered
    first, resend, features, features_resend = broker.requests()
    assert first["id"] == resend["id"]
    assert 4000 < P.parse_deadline_ms(first) <= 5000                     # the time left when sent
    assert P.parse_deadline_ms(resend) <= P.parse_deadline_ms(first) - 25  # minus the backoff at least
    assert 1000 < P.parse_deadline_ms(features) <= 2000
    assert P.parse_deadline_ms(features_resend) < P.parse_deadline_ms(features)
    assert all("deadline_ms" not in body for kind, body in broker.log if kind == P.STATS)


def test_busy_twice_then_reply_succeeds_after_backoff(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", busy_then_reply(2))
    with Client(broker.address, timeout_s=5, busy_retries=3, backoff_initial_s=0.01) as client:
        prediction = client.predict("a", "b")
        assert prediction.label == 1
        assert client.counters.busy_retries == 2
    assert [r["id"] for r in broker.requests()] == [prediction.id] * 3


@pytest.mark.parametrize("busy_retries", [0, 2])
def test_busy_forever_fails_with_server_busy_after_busy_retries(tmp_path, fake_brokers, busy_retries):
    broker = fake_brokers(f"ipc://{tmp_path}/b", busy_then_reply(10 ** 6))
    with Client(broker.address, timeout_s=10, busy_retries=busy_retries, backoff_initial_s=0.01) as client:
        with pytest.raises(ServerBusy, match="queue full"):
            client.predict("a", "b")
    assert len(broker.requests()) == 1 + busy_retries


def test_busy_retry_never_waits_past_the_deadline(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", busy_then_reply(10 ** 6))
    with Client(broker.address, timeout_s=0.5, backoff_initial_s=5, backoff_max_s=5) as client:
        future = client.submit("a", "b")
        error = future.exception(timeout=WAIT_MS / 1000)
    assert isinstance(error, ServerBusy) and "deadline" in str(error)  # at once, not a timeout later
    assert len(broker.requests()) == 1


def test_server_deadline_exceeded_raises_deadline_exceeded(tmp_path, fake_brokers):
    def expired(kind, body, seen):
        return [(P.ERROR, P.error_body(body["id"], P.E_DEADLINE, "expired in the queue"))]
    broker = fake_brokers(f"ipc://{tmp_path}/b", expired)
    with Client(broker.address, timeout_s=10) as client:
        with pytest.raises(DeadlineExceeded, match="expired in the queue") as err:
            client.predict("a", "b")
    assert isinstance(err.value, RequestTimeout) and isinstance(err.value, TimeoutError)
    assert len(broker.requests()) == 1  # not retried


@pytest.mark.parametrize("lost_retries", [0, 1])
def test_shutting_down_is_resent_after_a_backoff_within_lost_retries(tmp_path, fake_brokers, lost_retries):
    def shutting_down_once(kind, body, seen):
        if seen == 1:
            return [(P.ERROR, P.error_body(body["id"], P.E_SHUTDOWN, "broker stopping"))]
        return reply(body)
    broker = fake_brokers(f"ipc://{tmp_path}/b", shutting_down_once)
    with Client(broker.address, timeout_s=10, lost_retries=lost_retries, backoff_initial_s=0.01) as client:
        future = client.submit("a", "b")
        if lost_retries:
            assert future.result(WAIT_MS / 1000).label == 1
            assert client.counters.lost_resends == 1
        else:
            with pytest.raises(RemoteError) as err:
                future.result(WAIT_MS / 1000)
            assert err.value.code == P.E_SHUTDOWN
    assert len(broker.requests()) == 1 + lost_retries


@pytest.mark.parametrize("code", [P.E_WORKER_LOST, P.E_INFERENCE])
def test_other_errors_are_not_retried(tmp_path, fake_brokers, code):
    broker = fake_brokers(f"ipc://{tmp_path}/b", lambda k, body, s: [(P.ERROR, P.error_body(body["id"], code, "no"))])
    with Client(broker.address, timeout_s=10) as client, pytest.raises(RemoteError) as err:
        client.predict("a", "b")
    assert err.value.code == code and len(broker.requests()) == 1


def test_duplicate_and_unknown_replies_are_dropped_and_counted(tmp_path, fake_brokers):
    def twice_and_a_stranger(kind, body, seen):
        return reply(body) + reply(body) + reply({"id": "nobody-sent-this"})
    broker = fake_brokers(f"ipc://{tmp_path}/b", twice_and_a_stranger)
    with Client(broker.address, timeout_s=10) as client:
        first = client.predict("a", "b")
        second = client.predict("c", "d")  # replies come in order: the first's extras were read by now
        assert (first.label, second.label) == (1, 1)
        counters = client.counters
        assert counters.duplicate_replies >= 1 and counters.unknown_replies >= 1
        assert counters.late_replies == 0


def test_broker_restart_resends_what_was_in_flight(tmp_path, fake_brokers):
    """The broker dies with requests in flight and a new one binds the same address: the client
    notices the closed connection at once (heartbeats are far too slow to, here), reconnects, and
    the new broker answers every request, under its original id."""
    address = f"ipc://{tmp_path}/b"
    first = fake_brokers(address, silent)
    with Client(address, timeout_s=10, heartbeat_interval_s=60) as client:
        futures = [client.submit("a", str(i)) for i in range(4)]
        first.wait_for(P.REQUEST, 4)
        sent = {r["id"]: r["deadline_ms"] for r in first.requests()}
        first.stop()
        second = fake_brokers(address, echo)
        results = [f.result(WAIT_MS / 1000) for f in futures]
        assert client.counters.reconnects >= 1 and client.counters.lost_resends >= 4
    assert sorted(p.id for p in results) == sorted(sent)
    resent = {r["id"]: r["deadline_ms"] for r in second.requests()}
    assert set(resent) == set(sent) and all(resent[i] < sent[i] for i in sent)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_broker_down_for_a_while_then_back(tmp_path, fake_brokers, transport):
    """Heartbeats and reconnects keep going while no broker listens; the new one serves them."""
    address = f"ipc://{tmp_path}/b" if transport == "ipc" else f"tcp://127.0.0.1:{free_tcp_port()}"
    first = fake_brokers(address, silent)
    with Client(address, timeout_s=10, lost_retries=50, **FAST) as client:
        future = client.submit("a", "b")
        first.wait_for(P.HEARTBEAT, 1)
        first.stop()
        deadline = time.monotonic() + WAIT_MS / 1000
        while client.counters.reconnects < 2 and time.monotonic() < deadline:  # at least one in the void
            threading.Event().wait(0.02)
        assert client.counters.reconnects >= 2
        second = fake_brokers(address, echo)
        assert future.result(WAIT_MS / 1000).label == 1
    assert second.requests()[0]["id"] == future.result().id


def test_hung_broker_is_presumed_dead_by_heartbeat(tmp_path, fake_brokers):
    """A broker that keeps its socket open but answers nothing (frozen) is presumed dead after
    heartbeat_liveness silent intervals; the client reconnects and a new broker (bound over the
    same ipc path) answers the resent request."""
    address = f"ipc://{tmp_path}/b"
    hung = fake_brokers(address, silent, heartbeats=False)
    with Client(address, timeout_s=10, **FAST) as client:
        future = client.submit("a", "b")
        hung.wait_for(P.REQUEST, 1)
        second = fake_brokers(address, echo)  # takes the path over; the hung one keeps its connection
        assert future.result(WAIT_MS / 1000).label == 1
        assert client.counters.reconnects == 1
    assert hung.count(P.HEARTBEAT) >= 2  # pinged before it gave up on it
    assert [r["id"] for r in second.requests()] == [future.result().id]


def test_with_no_broker_coming_back_requests_fail_with_broker_unavailable(tmp_path, fake_brokers):
    address = f"ipc://{tmp_path}/b"
    first = fake_brokers(address, silent)
    with Client(address, timeout_s=30, lost_retries=2, **FAST) as client:
        future = client.submit("a", "b")
        first.wait_for(P.HEARTBEAT, 1)  # so the client has heard from it
        first.stop()
        error = future.exception(timeout=WAIT_MS / 1000)  # well before its 30 s deadline
    assert isinstance(error, BrokerUnavailable), error
    assert f"no broker answered at {address}" in str(error) and "sent 3 times" in str(error)


def test_a_broker_lost_while_idle_is_named_when_the_next_call_fails(tmp_path, fake_brokers):
    """The broker dies between calls (its closed connection goes unread while nothing is in flight):
    the next call's error says the connection closed and has not come back, even when its deadline
    comes before any heartbeat could tell (the close is news, not old news)."""
    address = f"ipc://{tmp_path}/b"
    first = fake_brokers(address, echo)
    with Client(address, timeout_s=1, heartbeat_interval_s=60) as client:
        assert client.predict("a", "b").label == 1
        first.stop()
        with pytest.raises(DeadlineExceeded) as error:
            client.predict("a", "b")
    assert f"the connection to the broker at {address} closed" in str(error.value), error.value
    assert "has not come back" in str(error.value)


def test_a_broker_lost_while_idle_is_given_up_after_one_unanswered_ping(tmp_path, fake_brokers):
    """Liveness counts from the close seen while idle: the next call pings at once and gives up one
    interval later, instead of first waiting out liveness intervals of fresh silence (two pings)."""
    address = f"ipc://{tmp_path}/b"
    first = fake_brokers(address, echo)
    with Client(address, timeout_s=30, lost_retries=0, heartbeat_interval_s=0.1, heartbeat_liveness=3) as client:
        assert client.predict("a", "b").label == 1
        first.stop()
        time.sleep(0.5)  # idle (this is the scenario, not a wait for an event): past liveness x interval
        with pytest.raises(BrokerUnavailable):
            client.predict("a", "b")
        assert client.counters.heartbeats_sent == 1


def test_a_client_pointed_at_the_worker_endpoint_is_told_so_at_once(bare_broker):
    """The broker's --worker-address is an easy mistake for its --address: the broker's worker side
    answers the client's heartbeat with DISCONNECT, which the client used to drop as a malformed reply,
    and then wait out its deadline; now the request fails at once, naming the mistake."""
    with Client(bare_broker.config.backend, timeout_s=30, heartbeat_interval_s=0.1) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="worker endpoint .* clients connect to the broker's --address"):
            client.predict("a", "b")
        assert time.monotonic() - started < 20  # far from the 30 s deadline: it did not wait it out
        assert client.counters.malformed_replies == 0
        sends = client.counters.heartbeats_sent
        with pytest.raises(BrokerUnavailable, match="worker endpoint"):  # known now: at once, nothing sent
            client.predict("a", "b")
        assert client.counters.heartbeats_sent == sends


def test_nothing_at_the_address_says_so(fake_brokers, caplog):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    with Client(address, timeout_s=30, lost_retries=1, **FAST) as client:
        error = client.submit("a", "b").exception(timeout=WAIT_MS / 1000)
        assert isinstance(error, BrokerUnavailable), error
        assert f"nothing answered at {address} — is a broker running there?" in str(error)
        with pytest.raises(DeadlineExceeded, match="is a broker running there"):
            client.predict("a", "b", timeout_s=0.05)
    # Its log, too, speaks of no broker, not of one presumed dead.
    logged = [r.getMessage() for r in caplog.records if r.name == "bertpool.client"]
    assert logged and all(f"nothing answers at {address}" in m for m in logged), logged


def test_broker_that_ignores_heartbeats_is_alive_while_replies_flow(tmp_path, fake_brokers):
    """Any message is a beat: a slow request is not resent while other replies keep coming, even
    from a broker that never answers HEARTBEAT."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo, heartbeats=False)
    with Client(broker.address, timeout_s=10, heartbeat_interval_s=0.1, heartbeat_liveness=4) as client:
        slow = client.submit("hold", "until released")
        broker.wait_for(P.REQUEST, 1)
        started = time.monotonic()
        for i in range(500):  # bounded; ~1.2 s of traffic, 3 liveness periods
            assert client.predict("quick", str(i)).label == 1
            threading.Event().wait(0.01)
            if time.monotonic() - started > 1.2:
                break
        broker.release()
        assert slow.result(WAIT_MS / 1000).label == 1
        assert client.counters.reconnects == 0
    assert sum(r["text_a"] == "hold" for r in broker.requests()) == 1


def test_idle_client_sends_no_heartbeats(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo, heartbeats=False)
    with Client(broker.address, timeout_s=10, heartbeat_interval_s=0.1, heartbeat_liveness=3) as client:
        client.predict("a", "b")
        pings = client.counters.heartbeats_sent  # 0 unless this machine took 0.1 s to answer
        threading.Event().wait(0.6)  # idle for two liveness periods: silence is expected then
        assert client.counters.heartbeats_sent == pings
        client.predict("c", "d")
        assert client.counters.reconnects == 0
    assert [r["text_a"] for r in broker.requests()] == ["a", "c"]


def test_close_from_a_done_callback(tmp_path, fake_brokers):
    """close() in a done-callback (which runs on the client's I/O thread) neither deadlocks nor
    raises; what is still pending then settles with ClientClosed."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    client = Client(broker.address, timeout_s=30)
    errors: list[BaseException] = []
    called = threading.Event()

    def close_in_callback(_future: Future) -> None:
        try:
            client.close()
        except BaseException as exc:  # checked below
            errors.append(exc)
        finally:
            called.set()

    held = client.submit("hold", "forever")
    broker.wait_for(P.REQUEST, 1)
    client.submit("a", "b").add_done_callback(close_in_callback)
    assert called.wait(WAIT_MS / 1000)
    assert not errors, errors
    with pytest.raises(ClientClosed):
        held.result(WAIT_MS / 1000)
    client._thread.join(WAIT_MS / 1000)
    assert not client._thread.is_alive()
    with pytest.raises(ClientClosed):
        client.submit("a", "b")
    client.close()  # and again from this thread


def test_blocking_call_from_a_done_callback_raises_instead_of_deadlocking(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    outcome: list = []
    called = threading.Event()

    def predict_in_callback(_future: Future) -> None:
        try:
            outcome.append(client.predict("c", "d"))
        except BaseException as exc:
            outcome.append(exc)
        called.set()

    with Client(broker.address, timeout_s=30) as client:
        client.submit("a", "b").add_done_callback(predict_in_callback)
        assert called.wait(WAIT_MS / 1000)
        assert type(outcome[0]) is UsageError and "deadlock" in str(outcome[0])
        assert client.predict("still", "serving").label == 1


def test_real_broker_answers_heartbeats_so_a_long_wait_is_not_a_dead_broker(bare_broker):
    """The broker has no worker, so the request waits in its queue for the whole deadline: the
    client pings, hears HEARTBEATs back, and never reconnects nor resends."""
    with Client(bare_broker.config.frontend, timeout_s=0.8, heartbeat_interval_s=0.1,
                heartbeat_liveness=5) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict("nobody", "computes this")
        assert client.counters.heartbeats_sent >= 3
        assert client.counters.reconnects == 0 and client.counters.lost_resends == 0
        assert client.counters.malformed_replies == 0
    assert bare_broker.counters.errors == 0


def test_real_broker_sigkilled_and_restarted_with_requests_in_flight(tmp_path):
    """bertpool-broker SIGKILLed holding queued requests; a new one on the same addresses, then a
    worker: the client resends what the dead broker held and every request is answered."""
    front, back = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    broker_args = ("--address", front, "--worker-address", back, "--stats-interval-s", "0")
    procs = [start_module(tmp_path, "bertpool.broker.broker", *broker_args)]
    try:
        # lost_retries covers many seconds of restart: 0.9 s of silence per resend
        with Client(front, timeout_s=60, heartbeat_interval_s=0.3, lost_retries=30) as client:
            futures = [client.submit("queued", f"in the first broker {i}") for i in range(4)]
            deadline = time.monotonic() + 30
            while client.stats()["queue"] < 4:  # no worker yet: the broker holds all four
                assert time.monotonic() < deadline, "the first broker never queued the requests"
                threading.Event().wait(0.05)
            os.killpg(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            procs.append(start_module(tmp_path, "bertpool.broker.broker", *broker_args))
            procs.append(start_module(tmp_path, "bertpool.workers.supervisor", "--worker-address", back,
                                "--parallel", "1", "--batch-timeout-ms", "1"))
            results = [f.result(timeout=60) for f in futures]
            stats = client.stats()
            assert client.counters.reconnects >= 1 and client.counters.lost_resends >= 4
    finally:
        stop_processes(*reversed(procs))
    assert sorted(r.id for r in results) == sorted(f.result().id for f in futures)
    assert all(r.label in (0, 1) for r in results)
    assert stats["broker"]["replies"] >= 4  # by the new broker


def test_a_full_send_queue_never_blocks_the_client():
    """Nothing listens, so sends pile up in the DEALER's queue to its high-water mark: the I/O thread
    must not block on a send, and every request still settles at its deadline."""
    with Client(f"tcp://127.0.0.1:{free_tcp_port()}", timeout_s=1.0, heartbeat_interval_s=60) as client:
        futures = [client.submit("a", str(i)) for i in range(3000)]
        _, not_done = wait(futures, timeout=WAIT_MS / 1000 * 2)
        assert not not_done, f"{len(not_done)} of {len(futures)} futures never settled"
        assert all(isinstance(f.exception(), DeadlineExceeded) for f in futures)


# ------------------------- a caller blocked in predict() drives the socket itself

def wait_until(condition, timeout_s: float = WAIT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never came true"
        threading.Event().wait(0.005)


def by_text(kind: bytes, body: dict, seen: int):
    """label = int(text_b) % 2, so every answer says which request it belongs to."""
    if kind == P.STATS:
        return echo(kind, body, seen)
    label = int(body["text_b"]) % 2
    return [(P.REPLY, P.reply_body(body["id"], [1.0 - label, float(label)], {}))]


def driven_predict(client: Client, *args, **kwargs):
    """predict() on a new thread, once it drives the socket: (thread, outcome list)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(client.predict(*args, **kwargs))
        except BaseException as exc:  # checked by the caller
            outcome.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: client._driver_ident == thread.ident)
    return thread, outcome


@pytest.mark.parametrize("threads", [1, 8])
def test_threads_calling_predict_at_once_each_get_their_own_answer(tmp_path, fake_brokers, threads):
    broker = fake_brokers(f"ipc://{tmp_path}/b", by_text)
    wrong: list = []
    with Client(broker.address, timeout_s=30) as client:
        def work(t: int) -> None:
            for i in range(60):
                n = t * 1000 + i
                try:
                    if client.predict("t", str(n)).label != n % 2:
                        wrong.append(n)
                except BaseException as exc:  # surfaced below
                    wrong.append(exc)
        run_threads(work, threads, WAIT_MS / 1000 * 4)
        assert client.stats() == {"answered_by": "fake"}
        assert client.counters.duplicate_replies == client.counters.late_replies == 0
    assert not wrong, wrong[:3]
    assert len({r["id"] for r in broker.requests()}) == threads * 60


def test_requests_of_others_are_served_by_the_thread_that_drives(tmp_path, fake_brokers):
    """While one caller waits in predict() driving the socket, other threads' predict() and
    submit() calls are sent and answered (it reads their replies), not held until it returns."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", by_text)
    with Client(broker.address, timeout_s=30) as client:
        driver, outcome = driven_predict(client, "hold", "1")
        assert client.predict("quick", "3").label == 1
        futures = [client.submit("async", str(i)) for i in range(20)]
        assert [f.result(WAIT_MS / 1000).label for f in futures] == [i % 2 for i in range(20)]
        assert driver.is_alive() and client._driver_ident == driver.ident  # still waiting, still driving
        broker.release()
        driver.join(WAIT_MS / 1000)
        assert outcome[0].label == 1


def test_a_request_left_pending_when_its_driver_returns_is_settled(tmp_path, fake_brokers):
    """The I/O thread takes over what the driving caller leaves behind: here a request that is
    never answered, which must still fail at its deadline."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    with Client(broker.address, timeout_s=30) as client:
        driver, outcome = driven_predict(client, "hold", "1")
        never = client.submit("hold", "2", timeout_s=0.3)
        broker.wait_for(P.REQUEST, 2)
        with pytest.raises(DeadlineExceeded):
            never.result(WAIT_MS / 1000)
        broker.release()
        driver.join(WAIT_MS / 1000)
        assert outcome[0].label == 1


def test_close_during_a_driven_call_fails_it_with_client_closed(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    client = Client(broker.address, timeout_s=30)
    driver, outcome = driven_predict(client, "hold", "forever")
    broker.wait_for(P.REQUEST, 1)
    client.close()
    driver.join(WAIT_MS / 1000)
    assert not driver.is_alive() and isinstance(outcome[0], ClientClosed)
    assert not client._thread.is_alive()
    with pytest.raises(ClientClosed):
        client.predict("a", "b")


def test_close_while_many_threads_predict_ends_every_call(tmp_path, fake_brokers):
    """Each predict() racing close() returns an answer or raises ClientClosed; none hangs."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(5):
            client = Client(broker.address, timeout_s=30)
            unexpected: list = []
            answered = threading.Semaphore(0)

            def work() -> None:
                for i in range(2000):
                    try:
                        client.predict("a", str(i))
                    except ClientClosed:
                        return
                    except BaseException as exc:  # surfaced below
                        unexpected.append(exc)
                        return
                    answered.release()
            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for _ in range(20):
                assert answered.acquire(timeout=WAIT_MS / 1000)
            client.close()
            for t in threads:
                t.join(WAIT_MS / 1000)
            assert not any(t.is_alive() for t in threads)
            assert not unexpected, unexpected[:3]
    finally:
        sys.setswitchinterval(switch_interval)


def test_deadline_while_driving(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b", silent)
    with Client(broker.address, timeout_s=30, heartbeat_interval_s=60) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.predict("nobody", "answers", timeout_s=0.2)
        assert time.monotonic() - started < WAIT_MS / 1000
        with pytest.raises(DeadlineExceeded):
            client.stats(timeout_s=0.1)
        assert client.counters.reconnects == 0


def test_broker_restart_during_a_driven_call(tmp_path, fake_brokers):
    """The calling thread that drives notices the closed connection, reconnects and resends."""
    address = f"ipc://{tmp_path}/b"
    first = fake_brokers(address, silent)
    with Client(address, timeout_s=10, heartbeat_interval_s=60) as client:
        driver, outcome = driven_predict(client, "a", "b")
        first.wait_for(P.REQUEST, 1)
        first.stop()
        second = fake_brokers(address, echo)
        driver.join(WAIT_MS / 1000)
        assert outcome[0].label == 1, outcome
        assert client.counters.reconnects >= 1 and client.counters.lost_resends >= 1
    assert [r["id"] for r in second.requests()] == [outcome[0].id]


def test_hung_broker_found_by_heartbeats_during_a_driven_call(tmp_path, fake_brokers):
    address = f"ipc://{tmp_path}/b"
    hung = fake_brokers(address, silent, heartbeats=False)
    with Client(address, timeout_s=10, **FAST) as client:
        driver, outcome = driven_predict(client, "a", "b")
        hung.wait_for(P.REQUEST, 1)
        fake_brokers(address, echo)  # takes the path over; the hung one keeps its connection
        driver.join(WAIT_MS / 1000)
        assert outcome[0].label == 1, outcome
        assert client.counters.reconnects == 1
    assert hung.count(P.HEARTBEAT) >= 2


@pytest.mark.parametrize("answer", [busy_then_reply(2), lambda k, body, s: (
    [(P.ERROR, P.error_body(body["id"], P.E_SHUTDOWN, "restarting"))] if s == 1 else echo(k, body, s))])
def test_retries_after_a_backoff_while_driving(tmp_path, fake_brokers, answer):
    broker = fake_brokers(f"ipc://{tmp_path}/b", answer)
    with Client(broker.address, timeout_s=10, backoff_initial_s=0.02, backoff_max_s=0.05) as client:
        assert client.predict("a", "b").label == 1
    assert len(broker.requests()) in (2, 3)


def test_done_callback_on_a_driving_thread_may_close_but_not_block(tmp_path, fake_brokers):
    """A future settled by a thread blocked in predict() runs its callbacks there: close() from one
    returns at once (the driven call then fails with ClientClosed), a blocking call raises."""
    broker = fake_brokers(f"ipc://{tmp_path}/b", echo)
    client = Client(broker.address, timeout_s=30)
    seen: list = []
    called = threading.Event()

    def callback(_future: Future) -> None:
        try:
            client.predict("inside", "callback")
        except BaseException as exc:  # checked below
            seen.append(exc)
        seen.append(threading.get_ident())
        client.close()
        called.set()

    driver, outcome = driven_predict(client, "hold", "forever")
    client.submit("a", "b").add_done_callback(callback)
    assert called.wait(WAIT_MS / 1000)
    driver.join(WAIT_MS / 1000)
    assert type(seen[0]) is UsageError and "deadlock" in str(seen[0])
    assert seen[1] == driver.ident  # the driving caller delivered the reply
    assert isinstance(outcome[0], ClientClosed)
    client._thread.join(WAIT_MS / 1000)
    assert not client._thread.is_alive()
    client.close()


@pytest.mark.parametrize("method, busy_first", [
    ("_finish", False),    # on the short way (_lone), answering
    ("_on_reply", True),   # on the short way, handing a BUSY to the general machinery
    ("_finish", True),     # in the general machinery, answering the resend
])
def test_a_bug_while_driving_closes_the_client_instead_of_stranding_callers(tmp_path, fake_brokers, method,
                                                                            busy_first):
    broker = fake_brokers(f"ipc://{tmp_path}/b", busy_then_reply(1) if busy_first else echo)
    client = Client(broker.address, timeout_s=30, backoff_initial_s=0.01, backoff_max_s=0.02)

    def bug(*args, **kwargs) -> None:
        raise ValueError("a bug in reply handling")
    setattr(client, method, bug)
    with pytest.raises(ClientClosed):
        client.predict("a", "b")
    client._thread.join(WAIT_MS / 1000)
    assert not client._thread.is_alive()
    with pytest.raises(ClientClosed):
        client.submit("c", "d")
    client.close()


# ------------------------------------------------ input that cannot travel, misuse

def test_a_text_that_cannot_travel_fails_at_the_call_and_nothing_else(start_pool):
    """A lone surrogate (text decoded with errors="surrogateescape") or a text over MAX_TEXT_CHARS is
    refused at the call with InputError; requests in flight and the client itself carry on."""
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "200", parallel=1)
    with Client(pool.address, timeout_s=30) as client:
        others = [client.submit("an innocent", f"request {i}") for i in range(3)]
        for call in (client.submit, client.predict):
            with pytest.raises(InputError, match="text_a: not encodable as UTF-8") as err:
                call("caf\udce9", "b")
            assert err.value.code == P.E_BAD_TEXT
            with pytest.raises(InputError, match=f"more than {P.MAX_TEXT_CHARS}"):
                call("a", "x " * P.MAX_TEXT_CHARS)  # far below the link's limit, not near it
            with pytest.raises(TypeError, match="text_b must be str"):
                call("a", b"bytes")
        assert all(f.result(30).label in (0, 1) for f in others)
        assert client.predict("caf\u00e9", "still served").label in (0, 1)


@pytest.mark.parametrize("change, message", [
    (lambda ids: ids + 2 ** 32, "values outside int32"),         # would wrap to the same ids
    (lambda ids: ids + 0.9, "integer values required"),          # would truncate to the same ids
    (lambda ids: ids.reshape(2, -1), "expected [S]"),
    (lambda ids: ids[:0], "expected [S]"),
    (lambda ids: [], "shape [0], expected [S]"),                 # an empty list is float64 to NumPy
    (lambda ids: np.ones(P.MAX_FEATURE_LEN + 1, np.int64), "expected [S]"),
])
def test_features_that_are_not_int32_rows_are_refused_not_cast(change, message):
    ids = np.arange(8, dtype=np.int64)
    with Client("ipc:///nonexistent-bertpool", timeout_s=1) as client:
        with pytest.raises(InputError, match=re.escape(message)):
            client.submit_features(change(ids), np.ones(8, np.int32), np.zeros(8, np.int32))


@pytest.mark.parametrize("timeout_s", [np.float32(0.5), np.float64(0.5), np.int64(1)])
def test_a_numpy_number_is_a_timeout_like_any_other(bare_broker, timeout_s):
    """A timeout read from a NumPy array was refused: "must be > 0 and at most 86400 s, got 0.5"."""
    with Client(bare_broker.config.frontend, timeout_s=timeout_s) as client:
        assert client.stats(timeout_s=timeout_s)["workers"] == {}
        with pytest.raises(DeadlineExceeded):  # no worker: its deadline, as the NumPy number said
            client.predict("a", "b", timeout_s=timeout_s)


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_predict_many_refuses_a_bad_window(window):
    with Client("ipc:///nonexistent-bertpool", timeout_s=1) as client:
        with pytest.raises(ConfigError, match="max_in_flight"):
            client.predict_many([("a", "b")], max_in_flight=window)


def test_a_forked_child_gets_client_closed_at_once():
    """A fork has none of the parent's threads and shares its sockets: the child's calls fail at once
    with ClientClosed instead of spinning or waiting forever."""
    with Client("ipc:///nonexistent-bertpool", timeout_s=30) as client:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                client.submit("from", "the child")
            except ClientClosed as exc:
                code = 0 if "forked" in str(exc) else 2
            except BaseException:
                code = 3
            os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the child hung"
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_slow_done_callback_does_not_make_a_live_broker_look_dead(start_pool):
    """Silence while the client's own thread ran a callback is not the broker's: it is pinged first,
    answers, and the request in flight is served, not failed (lost_retries=0) or sent again."""
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "1000", "--batch-size", "1", parallel=1)
    with Client(pool.address, timeout_s=30, heartbeat_interval_s=0.2, heartbeat_liveness=3,
                lost_retries=0) as client:
        first = client.submit("first", "request")
        first.add_done_callback(lambda _: time.sleep(1.0))  # five heartbeat intervals
        second = client.submit("second", "request")
        assert second.result(30).label in (0, 1)
        assert client.counters.reconnects == 0 and client.counters.lost_resends == 0


def test_settled_requests_do_not_pile_up_in_the_deadline_heap(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "0", parallel=1)
    with Client(pool.address, timeout_s=3600) as client:
        for _ in range(3000):
            client.predict("a", "b")
        assert len(client._deadlines) <= 1024 + 2  # white-box: the memory a long timeout would hold


def test_a_lone_blocking_call_takes_the_short_way(tmp_path, fake_brokers, monkeypatch):
    """White-box: predict() and stats() with nothing else pending are sent and answered with no Future
    and no deadline-heap entry (Client._lone, the cost one client calling in a loop pays per request);
    a later duplicate of such an answer is still told from a late one; submit() still gets a Future."""
    import bertpool.clients.client as client_module
    made: list[Future] = []

    class CountedFuture(Future):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)
    monkeypatch.setattr(client_module, "Future", CountedFuture)
    twice: list[bool] = []
    broker = fake_brokers(f"ipc://{tmp_path}/b", lambda kind, body, seen: echo(kind, body, seen) * (1 + len(twice)))
    with Client(broker.address, timeout_s=30) as client:
        # The link's first events (connected, handshake done) may come during the first call's wait,
        # which then goes the long way: that is what the short way does with any event.
        client.predict("first", "call")
        made.clear()
        heap = list(client._deadlines)
        answers = [client.predict("t", str(i)) for i in range(20)]
        assert [a.label for a in answers] == [1] * 20 and client.stats() == {"answered_by": "fake"}
        assert made == [] and client._deadlines == heap and not client._pending and not client._in_flight
        assert client.submit("a", "b").result(WAIT_MS / 1000).label == 1
        assert len(made) == 1
        twice.append(True)
        assert client.predict("answered", "twice").label == 1
        twice.clear()
        assert client.predict("after", "the duplicate").label == 1  # reads the duplicate first
        assert client.counters.duplicate_replies == 1
        assert client.counters.late_replies == client.counters.unknown_replies == 0


# ------------------------------------------- what a demanding user tries (client audit)

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_client_dropped_without_close_is_collected_with_its_thread_and_sockets(bare_broker):
    """A Client its user forgets to close (one per web request, say) must not live on, with its I/O
    thread and sockets, for the life of the process: once nothing is pending it is collected."""
    with Client(bare_broker.config.frontend, timeout_s=5) as warm:  # the ZeroMQ context's own fds
        warm.stats()
    before = open_fds()
    client = Client(bare_broker.config.frontend, timeout_s=5)
    client.stats()  # driven by this thread
    with pytest.raises(DeadlineExceeded):  # driven by the I/O thread (no worker: it expires)
        client.submit("a", "b", timeout_s=0.1).result(WAIT_MS / 1000)
    thread, ref = client._thread, weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None, "the Client was never collected"
    thread.join(WAIT_MS / 1000)
    assert not thread.is_alive(), "its I/O thread outlived it"
    wait_until(lambda: open_fds() <= before)  # ZeroMQ's I/O thread closes the connections a little later


def test_a_dropped_client_still_settles_what_it_was_asked(bare_broker, fake_brokers, tmp_path):
    """The other side of the above: a Client dropped with requests pending is kept until they settle
    (a one-liner ``Client(address).submit(...)`` must not lose its request)."""
    expired = Client(bare_broker.config.frontend, timeout_s=0.2).submit("nobody", "answers")
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    answered = [Client(broker.address, timeout_s=10).submit("a", str(i)) for i in range(5)]
    gc.collect()
    with pytest.raises(DeadlineExceeded):  # its deadline, not ClientClosed
        expired.result(WAIT_MS / 1000)
    assert [f.result(WAIT_MS / 1000).label for f in answered] == [1] * 5
    assert Client(broker.address, timeout_s=10).predict("one", "liner").label == 1


def test_predict_many_stops_sending_at_the_first_failure(tmp_path, fake_brokers):
    """A failure predict_many will raise anyway must not wait for the rest of the input to be sent and
    fail too (a dead broker would cost len(pairs) / max_in_flight deadlines instead of one)."""
    def fail_requests(kind: bytes, body: dict, seen: int):
        return echo(kind, body, seen) if kind == P.STATS else [(P.ERROR, P.error_body(body["id"], P.E_INFERENCE, "no"))]
    broker = fake_brokers(f"ipc://{tmp_path}/b", fail_requests)
    with Client(broker.address, timeout_s=10) as client:
        with pytest.raises(RemoteError) as err:
            client.predict_many([("a", str(i)) for i in range(40)], max_in_flight=2)
        assert err.value.code == P.E_INFERENCE
        assert client.stats() == {"answered_by": "fake"}  # after every REQUEST sent: the link is FIFO
    assert len(broker.requests()) <= 2


@pytest.mark.parametrize("bad, error, message", [
    ("ab", TypeError, "must be a (text_a, text_b) pair, got str"),  # would unpack into ("a", "b")
    (("a",), TypeError, "must be a (text_a, text_b) pair, got tuple"),
    (("a", "b", "c"), TypeError, "must be a (text_a, text_b) pair, got tuple"),
    (None, TypeError, "must be a (text_a, text_b) pair, got NoneType"),
    (("a", b"b"), TypeError, "text_b must be str, got bytes"),
    (("caf\udce9", "b"), InputError, "text_a: not encodable as UTF-8"),
])
def test_predict_many_checks_every_pair_before_sending_any(tmp_path, fake_brokers, bad, error, message):
    """A bad item late in the input raises at once, naming its index, and nothing was sent (not the
    good pairs before it either, which would be computed for nobody); never a bare unpacking error."""
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    with Client(broker.address, timeout_s=10) as client:
        with pytest.raises(error, match=re.escape("pairs[10]") + ".*" + re.escape(message)):
            client.predict_many([("good", str(i)) for i in range(10)] + [bad] + [("more", "after")],
                                max_in_flight=2)
        assert client.stats() == {"answered_by": "fake"}  # anything sent before would have come first
        assert broker.requests() == []
        assert [p.label for p in client.predict_many(iter([("a", "b"), ["c", "d"]]))] == [1, 1]


def test_a_client_cannot_be_pickled_and_says_why():
    """Passing a Client to a spawned process fails at once, saying what to do, not deep in a lock."""
    with Client("ipc:///nonexistent-bertpool", timeout_s=1) as client:
        with pytest.raises(TypeError, match="cannot be pickled.*create its own Client"):
            pickle.dumps(client)


@pytest.mark.parametrize("kwargs, message", [
    ({"curve": "keys/client.key_secret"}, "curve must be a CurveClientConfig or None, got str"),
    ({"context": "ctx"}, "context must be a zmq.Context or None, got str"),
])
def test_a_wrong_type_of_curve_or_context_is_a_config_error(kwargs, message):
    """Not an AttributeError from deep in the socket setup (which also left two sockets open)."""
    before = open_fds()
    with pytest.raises(ConfigError, match=re.escape(message)):
        Client("ipc:///nonexistent-bertpool", timeout_s=1, **kwargs)
    assert open_fds() <= before


# ------------------------------------------- lifetime and errors as a user meets them (clientux audit)

def test_every_call_on_a_closed_client_says_it_is_closed_and_what_to_do(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    client = Client(broker.address, timeout_s=5)
    assert client.predict("a", "b").label == 1
    with client:  # a with block closes it too
        pass
    calls = {"predict": lambda: client.predict("a", "b"), "submit": lambda: client.submit("a", "b"),
             "stats": lambda: client.stats(), "predict_many": lambda: client.predict_many([("a", "b")]),
             "submit_features": lambda: client.submit_features([1, 2], [1, 1], [0, 0])}
    for name, call in calls.items():
        with pytest.raises(ClientClosed, match=r"close\(\) was called.*create a new Client") as err:
            call()
        assert "cannot be reopened" in str(err.value), name
    client.close()  # idempotent after a with block


def test_a_client_closed_by_an_internal_failure_says_so_not_that_close_was_called(tmp_path, fake_brokers,
                                                                                   monkeypatch):
    """A user who never called close() must not be told they did: the ClientClosed names the failure."""
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    with Client(broker.address, timeout_s=5) as client:
        def broken(*_args, **_kwargs):
            raise OSError("simulated I/O bug")
        monkeypatch.setattr(client, "_finish", broken)
        with pytest.raises(ClientClosed, match="the Client closed .*simulated I/O bug"):
            client.predict("a", "b")
        monkeypatch.undo()
        with pytest.raises(ClientClosed, match=r"I/O failed on a calling thread.*create a new Client") as err:
            client.submit("c", "d")
        assert "close() was called" not in str(err.value)


def test_predict_ends_at_its_deadline_while_a_done_callback_holds_the_delivering_thread(tmp_path, fake_brokers):
    """While the I/O thread runs a user's done-callback, no timer fires; a predict() waiting on it
    must still end at its own deadline, not when the callback returns."""
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    entered, release = threading.Event(), threading.Event()
    released_by_guard = threading.Event()

    def hog(_future) -> None:
        entered.set()
        if not release.wait(WAIT_MS / 1000):  # bounded: without the fix predict() would wait for this
            released_by_guard.set()

    with Client(broker.address, timeout_s=30) as client:
        future = client.submit("callback", "holds the I/O thread")
        future.add_done_callback(hog)
        assert entered.wait(WAIT_MS / 1000)
        with pytest.raises(DeadlineExceeded) as err:
            client.predict("x", "y", timeout_s=0.2)
        assert not released_by_guard.is_set(), "predict() waited for the callback, past its deadline"
        assert "busy meanwhile" in str(err.value) and "done-callback" in str(err.value)
        release.set()
        assert client.predict("after", "the callback").label == 1  # the client is unharmed
        assert client.stats(timeout_s=5) == {"answered_by": "fake"}


def test_many_clients_past_the_contexts_socket_limit_are_told_which_limit(tmp_path, fake_brokers):
    """EMFILE from ZeroMQ is the context's MAX_SOCKETS long before the process's file limit: the
    error must name that limit and the remedy, not say to raise ulimit -n (which changes nothing)."""
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 10)  # each Client holds 5 (with its link's monitor pair): two fit
    before_fds, before_threads = open_fds(), threading.active_count()
    clients = [Client(broker.address, timeout_s=5, context=ctx) for _ in range(2)]
    try:
        with pytest.raises(ConfigError, match=r"MAX_SOCKETS=10.*share one") as err:
            Client(broker.address, timeout_s=5, context=ctx)
        assert "ulimit" not in str(err.value)
        assert [c.predict("a", str(i)).label for i, c in enumerate(clients)] == [1, 1]  # unharmed
    finally:
        for c in clients:
            c.close()
    def room_again() -> bool:  # closed sockets leave the count once ZeroMQ's reaper is done with them
        try:
            Client(broker.address, timeout_s=5, context=ctx).close()
        except ConfigError:
            return False
        return True
    wait_until(room_again)
    ctx.term()
    wait_until(lambda: threading.active_count() <= before_threads)
    wait_until(lambda: open_fds() <= before_fds)


def test_a_hundred_clients_in_one_process_leave_no_thread_or_descriptor(tmp_path, fake_brokers):
    broker = fake_brokers(f"ipc://{tmp_path}/b")
    with Client(broker.address, timeout_s=5) as warm:  # the shared context's own descriptors
        warm.stats()
    before_fds, before_threads = open_fds(), threading.active_count()
    clients = [Client(broker.address, timeout_s=5) for _ in range(100)]
    assert open_fds() - before_fds <= 8 * 100  # about 6 each (README), + the in-process broker's end
    assert all(f.result(WAIT_MS / 1000).label == 1 for f in [c.submit("a", "b") for c in clients])
    for c in clients:
        c.close()
    wait_until(lambda: threading.active_count() <= before_threads)
    wait_until(lambda: open_fds() <= before_fds)


def test_a_client_made_before_its_broker_serves_once_the_broker_is_up(tmp_path, fake_brokers):
    """No broker at construction is not an error: a request sent meanwhile waits (and is resent on a
    fresh connection, as for a lost broker) and is answered once a broker binds the address."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    with Client(address, timeout_s=30, **FAST, lost_retries=100) as client:
        early = client.submit("sent", "before the broker")
        wait_until(lambda: client.counters.reconnects >= 1)  # it noticed nobody answers, and retried
        broker = fake_brokers(address)
        assert early.result(WAIT_MS / 1000).label == 1
        assert client.predict("after", "the broker").label == 1
        assert broker.requests()
