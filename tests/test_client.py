"""Client library: futures, timeouts, BUSY, ERROR, thread safety, closing."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import pytest
import zmq

from bertpool.broker.broker import Broker, BrokerConfig
from bertpool.clients.client import Client, Prediction
from bertpool.common import protocol as P
from bertpool.common.errors import (ClientClosed, ConfigError, MalformedReply, RemoteError, RequestTimeout,
                                    ServerBusy)

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
        with pytest.raises(RequestTimeout):
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


@pytest.mark.parametrize("kwargs", [{"address": "localhost:5555"}, {"timeout_s": 0}, {"max_in_flight": 0}])
def test_bad_client_config(kwargs):
    with pytest.raises(ConfigError):
        Client(**{"address": "tcp://127.0.0.1:5555", **kwargs})


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


@pytest.mark.parametrize("name", sorted(MALFORMED_REPLIES))
def test_malformed_reply_settles_its_request_and_the_client_survives(fake_broker, name):
    router, address = fake_broker
    kind, fields = MALFORMED_REPLIES[name]
    with Client(address, timeout_s=30) as client:
        future = client.submit("a", "b")
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
        assert client.counters.late_replies == 2


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
