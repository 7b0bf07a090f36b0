"""Broker routing: credit-based dispatch, BUSY, re-queueing, frontend validation.

The broker runs on a thread; workers and clients are raw DEALER sockets so the
tests see exactly what crosses the wire.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest
import zmq

from bertpool.broker import broker as broker_module
from bertpool.broker.broker import MAX_BUSY_POLL_US, Broker, BrokerConfig, busy_poll
from bertpool.common import protocol as P
from bertpool.common.errors import ConfigError
from bertpool.common.metrics_export import LATENCY_BUCKETS_S as P_LATENCY_BUCKETS
from conftest import free_tcp_port

WAIT_MS = 5000


@pytest.fixture
def broker(tmp_path):
    """Factory: broker(**config) -> running Broker; stopped at teardown."""
    running = []

    def start(**kwargs) -> Broker:
        # Raw test sockets do not beat: heartbeats only where a test asks for them.
        kwargs.setdefault("heartbeat_interval_s", 60.0)
        config = BrokerConfig(frontend=f"ipc://{tmp_path}/f{len(running)}",
                              backend=f"ipc://{tmp_path}/b{len(running)}", **kwargs)
        b = Broker(config)
        b.bind()
        t = threading.Thread(target=b.run, daemon=True)
        t.start()
        b.test_thread = t
        running.append((b, t))
        return b

    yield start
    for b, t in running:
        b.stop(drain=False)
        t.join(5)
        assert not t.is_alive()


def recv(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(WAIT_MS), "nothing received in time"
    return sock.recv_multipart()


def nothing(sock: zmq.Socket, ms: int = 200) -> bool:
    return not sock.poll(ms)


def ready(worker: zmq.Socket, capacity: int, name: str, slot: str | None = None,
          incarnation: str | None = None, pid: int = 1) -> str:
    """Say READY; returns the incarnation it used."""
    incarnation = incarnation or P.new_incarnation()
    worker.send_multipart([P.VERSION, P.READY, P.ready_body(name, slot, incarnation, pid, capacity, "test", 1)])
    return incarnation


_stats_ids = itertools.count()


def stats(client: zmq.Socket) -> dict:
    """One STATS round trip; the reply must name the request."""
    rid = f"stats-{next(_stats_ids)}"
    client.send_multipart([P.VERSION, P.STATS, P.stats_request(rid)])
    version, kind, body = recv(client)
    assert kind == P.STATS and P.unpack(body)["id"] == rid
    return P.parse_stats_reply(P.unpack(body))


def wait_workers(broker: Broker, client: zmq.Socket, n: int) -> None:
    """Round-trip STATS until the broker has registered n workers (bounded)."""
    for _ in range(100):
        if len(stats(client)["workers"]) >= n:
            return
    raise AssertionError("workers never registered")


def request(client: zmq.Socket, rid) -> None:
    client.send_multipart([P.VERSION, P.REQUEST, P.text_request(rid, "a", "b")])


def test_credit_based_dispatch_never_exceeds_capacity(broker, sockets):
    b = broker()
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    ready(worker, 2, "w")
    wait_workers(b, client, 1)
    for i in range(5):
        request(client, i)
    got = [recv(worker) for _ in range(2)]
    assert nothing(worker)  # capacity 2: the third waits in the broker's queue
    assert [P.unpack(f[3])["id"] for f in got] == [0, 1]
    # One reply returns one credit, so exactly one more request arrives.
    version, kind, token, body, queued, deadline = got[0]
    assert len(token) == P.TOKEN_BYTES and len(queued) == 8 and deadline == b""
    worker.send_multipart([P.VERSION, P.REPLY, token, P.reply_body(0, [0.1, 0.9], {})])
    reply = recv(client)
    assert reply[:2] == [P.VERSION, P.REPLY] and P.unpack(reply[2])["id"] == 0
    assert P.unpack(recv(worker)[3])["id"] == 2
    assert nothing(worker)


def test_slow_worker_does_not_block_the_others(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    slow, fast = sockets(b.config.backend), sockets(b.config.backend)
    ready(slow, 1, "slow")
    ready(fast, 1, "fast")
    wait_workers(b, client, 2)
    for i in range(6):
        request(client, i)
    held = recv(slow)  # the slow worker holds its one request and never answers
    answered = 0
    for _ in range(5):
        frames = recv(fast)
        fast.send_multipart([P.VERSION, P.REPLY, frames[2], P.reply_body(0, [1.0, 0.0], {})])
        recv(client)
        answered += 1
    assert answered == 5 and nothing(slow)
    assert P.unpack(held[3])["id"] in range(6)


def test_busy_when_queue_is_full(broker, sockets):
    b = broker(max_queue=2)
    client = sockets(b.config.frontend)  # no workers: everything queues
    for i in range(3):
        request(client, f"r{i}")
    reply = recv(client)
    assert reply[1] == P.BUSY
    assert P.unpack(reply[2])["id"] == "r2"
    got = stats(client)
    assert got["queue"] == 2 and got["broker"]["busy"] == 1


def test_disconnect_requeues_held_requests_to_another_worker(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    first, second = sockets(b.config.backend), sockets(b.config.backend)
    ready(first, 4, "first")
    wait_workers(b, client, 1)
    for i in range(3):
        request(client, i)
    assert [P.unpack(recv(first)[3])["id"] for _ in range(3)] == [0, 1, 2]
    first.send_multipart([P.VERSION, P.DISCONNECT, P.pack({})])
    ready(second, 4, "second")
    assert [P.unpack(recv(second)[3])["id"] for _ in range(3)] == [0, 1, 2]


SLOT = "host:4242.ab12:core-0"


def test_restarted_worker_replaces_its_dead_predecessor(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    dead, restarted = sockets(b.config.backend), sockets(b.config.backend)
    ready(dead, 4, SLOT, slot=SLOT, pid=100)
    wait_workers(b, client, 1)
    request(client, "held")
    recv(dead)
    ready(restarted, 4, SLOT, slot=SLOT, pid=101)  # same slot, new process: the old one is gone
    assert P.unpack(recv(restarted)[3])["id"] == "held"
    got = stats(client)
    assert list(got["workers"]) == [SLOT] and got["broker"]["requeued"] == 1


@pytest.mark.parametrize("second_slot", ["host:777.cd34:core-0", None])
def test_ready_under_a_taken_name_never_evicts_a_live_worker(broker, sockets, second_slot):
    """Two supervisors (or hand-started workers) on one host may pick one name: both serve."""
    b = broker()
    client = sockets(b.config.frontend)
    first, second = sockets(b.config.backend), sockets(b.config.backend)
    ready(first, 1, "host:worker-0", slot=SLOT)
    wait_workers(b, client, 1)
    request(client, "held")
    assert P.unpack(recv(first)[3])["id"] == "held"
    ready(second, 1, "host:worker-0", slot=second_slot)
    wait_workers(b, client, 2)
    request(client, "next")
    assert P.unpack(recv(second)[3])["id"] == "next"
    got = stats(client)
    assert len(got["workers"]) == 2 and got["broker"]["requeued"] == 0
    assert nothing(first)  # what it holds stays with it


def test_late_disconnect_of_a_replaced_incarnation_is_ignored(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    dead, dead_outbox, restarted = (sockets(b.config.backend) for _ in range(3))
    old = ready(dead, 2, SLOT, slot=SLOT, pid=100)
    wait_workers(b, client, 1)
    ready(restarted, 2, SLOT, slot=SLOT, pid=101)
    # The old process's last word, on its reply socket, overtaken by its successor's READY.
    dead_outbox.send_multipart([P.VERSION, P.DISCONNECT, P.disconnect_body(SLOT, old)])
    request(client, "served")
    assert P.unpack(recv(restarted)[3])["id"] == "served"
    assert len(stats(client)["workers"]) == 1


def test_worker_error_reply_is_forwarded(broker, sockets):
    b = broker()
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    ready(worker, 1, "w")
    wait_workers(b, client, 1)
    request(client, "e")
    token = recv(worker)[2]
    worker.send_multipart([P.VERSION, P.ERROR, token, P.error_body("e", P.E_INFERENCE, "boom")])
    reply = recv(client)
    assert reply[1] == P.ERROR and P.unpack(reply[2])["code"] == P.E_INFERENCE


def test_a_worker_that_takes_many_gets_a_round_in_one_message_and_answers_in_one(broker, sockets):
    """READY with requests_per_message: what one dispatch round hands the worker goes in one
    REQUESTS message (bodies untouched, each under its own token); one REPLIES message carries
    answers of both kinds back, each routed to its client; an unknown token in it is dropped alone."""
    b = broker()
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    for i in range(6):
        request(client, i)
    stats(client)  # the broker has queued all six: one round dispatches them
    worker.send_multipart([P.VERSION, P.READY, P.ready_body("w", None, "inc", 1, 8, "test", 4,
                                                            requests_per_message=8)])
    message = P.parse_from_broker(recv(worker))
    assert message.kind == P.REQUESTS and nothing(worker)
    assert [P.unpack(r.body)["id"] for r in message.requests] == list(range(6))
    assert len({r.token for r in message.requests}) == 6
    answers = [(P.REPLY, r.token, P.reply_body(i, [0.2, 0.8], {})) for i, r in enumerate(message.requests[:5])]
    answers[2] = (P.ERROR, message.requests[2].token, P.error_body(2, P.E_INFERENCE, "boom"))
    answers.append((P.REPLY, b"\xff" * 8, P.reply_body("ghost", [0.5, 0.5], {})))
    worker.send_multipart(P.replies_frames(answers))
    got = {P.unpack(f[2])["id"]: f[1] for f in (recv(client) for _ in range(5))}
    assert got == {0: P.REPLY, 1: P.REPLY, 2: P.ERROR, 3: P.REPLY, 4: P.REPLY}
    assert nothing(client)
    assert stats(client)["broker"]["late_replies_dropped"] == 1


@pytest.mark.parametrize("per_message", [1, 3])
def test_dispatch_hands_out_whole_batches_in_messages_the_worker_takes(per_message):
    """A round gives the worker with the most free credit up to its batch_size at a time (a burst
    fills batches instead of spreading one request per worker), in single REQUESTs or REQUESTS of
    at most requests_per_message."""
    b = Broker(BrokerConfig(frontend="ipc:///nonexistent/f", backend="ipc:///nonexistent/b"))
    sent: list[tuple[bytes, list[bytes]]] = []
    b._send_worker = lambda identity, frames: sent.append((identity, frames)) or True
    for identity in (b"one", b"two"):
        b._on_ready(identity, P.parse_ready(P.unpack(P.ready_body(
            identity.decode(), None, identity.decode(), 1, 8, "test", 4, requests_per_message=per_message))))
    for i in range(6):
        b._accept(b"client", P.text_request(i, "a", "b"))
    b._dispatch()
    ids: dict[bytes, list[int]] = {}
    for identity, frames in sent:
        message = P.parse_from_broker(frames)
        requests = message.requests if message.kind == P.REQUESTS else [message]
        assert len(requests) <= per_message
        ids.setdefault(identity, []).extend(P.unpack(r.body)["id"] for r in requests)
    assert ids == {b"one": [0, 1, 2, 3], b"two": [4, 5]}
    assert len(sent) == (6 if per_message == 1 else 3)  # two: [0 1 2] [3]; one: [4 5]


def test_a_many_request_message_never_carries_more_bytes_than_one_request_may():
    """Bodies in one REQUESTS add up to at most max_request_bytes, so a worker whose MAXMSGSIZE
    takes the largest single request takes every message."""
    b = Broker(BrokerConfig(frontend="ipc:///nonexistent/f", backend="ipc:///nonexistent/b",
                            max_request_bytes=1000, max_queue_bytes=1 << 20))
    sent: list[list[bytes]] = []
    b._send_worker = lambda identity, frames: sent.append(frames) or True
    b._on_ready(b"w", P.parse_ready(P.unpack(P.ready_body("w", None, "w", 1, 16, "test", 16,
                                                          requests_per_message=16))))
    sizes = [400, 400, 400, 900, 100, 1000, 30, 30]
    for i, size in enumerate(sizes):
        body = P.text_request(i, "a", "b")
        b._accept(b"client", body + b"\x00" * (size - len(body)))  # padded to ``size`` bytes
    b._dispatch()
    messages = [P.parse_from_broker(frames).requests for frames in sent]
    assert [[len(r.body) for r in m] for m in messages] == [[400, 400], [400], [900, 100], [1000], [30, 30]]


def test_oversized_request_is_refused(broker, sockets):
    b = broker(max_request_bytes=100)
    client = sockets(b.config.frontend)
    client.send_multipart([P.VERSION, P.REQUEST, P.text_request(9, "x" * 200, "b")])
    reply = recv(client)
    assert reply[1] == P.ERROR and P.unpack(reply[2]) == {
        "id": 9, "code": P.E_TOO_LARGE, "message": P.unpack(reply[2])["message"]}


def test_malformed_worker_messages_are_ignored(broker, sockets):
    b = broker()
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    worker.send_multipart([b"junk"])
    worker.send_multipart([P.VERSION, P.READY, b"\xc1"])
    worker.send_multipart([P.VERSION, P.READY, P.pack({"capacity": -3})])
    worker.send_multipart([P.VERSION, P.REPLY, b"unknown-token", b"x"])
    ready(worker, 1, "w")
    wait_workers(b, client, 1)  # the broker survived all of the above


def test_bind_conflict_is_a_config_error(tmp_path):
    taken = f"tcp://127.0.0.1:{free_tcp_port()}"
    first = Broker(BrokerConfig(frontend=taken, backend=f"ipc://{tmp_path}/b1"))
    first.bind()
    try:
        with pytest.raises(ConfigError, match="cannot bind"):
            Broker(BrokerConfig(frontend=taken, backend=f"ipc://{tmp_path}/b2")).bind()
    finally:
        first.close()


def test_an_ipc_address_a_live_broker_listens_on_is_refused_and_a_stale_one_reused(tmp_path):
    """ZeroMQ's ipc bind replaces the socket file: a second broker on the same path would start
    "fine" and cut the first off from every new peer. It is refused while the first listens; the
    file a crashed broker left (nobody listening) is bound over."""
    import socket

    front = f"ipc://{tmp_path}/front"
    first = Broker(BrokerConfig(frontend=front, backend=f"ipc://{tmp_path}/b1"))
    first.bind()
    runner = threading.Thread(target=first.run, daemon=True)
    runner.start()
    try:
        with pytest.raises(ConfigError, match="already listening there"):
            Broker(BrokerConfig(frontend=f"ipc://{tmp_path}//front", backend=f"ipc://{tmp_path}/b2")).bind()
        with zmq.Context.instance().socket(zmq.DEALER) as client:  # the first still takes new clients
            client.connect(front)
            client.send_multipart([P.VERSION, P.HEARTBEAT, b""])
            assert client.poll(5000) and client.recv_multipart()[1] == P.HEARTBEAT
    finally:
        first.stop(drain=False)
        runner.join(10)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale"))  # a socket file nobody listens on
    stale.close()
    second = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/stale", backend=f"ipc://{tmp_path}/b3"))
    second.bind()
    second.close()


def test_a_broker_that_stops_removes_its_ipc_socket_files_but_no_others(tmp_path):
    """libzmq leaves an ipc socket file behind when the socket closes: a clean stop left both in place
    (and, on a shared /tmp, as many as brokers ever ran). A file bound over since is not ours to remove."""
    import os

    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b"))
    broker.bind()
    runner = threading.Thread(target=broker.run, daemon=True)
    runner.start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f"]
    broker.stop(drain=False)
    runner.join(10)
    assert list(tmp_path.iterdir()) == []

    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b"))
    broker.bind()
    os.unlink(tmp_path / "f")  # another broker bound the path since: a new file there
    (tmp_path / "f").write_text("someone else's")
    broker.close()
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and (tmp_path / "f").read_text() == "someone else's"


def test_two_spellings_of_one_ipc_file_are_one_address(tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        BrokerConfig(frontend=f"ipc://{tmp_path}/x", backend=f"ipc://{tmp_path}/./y/../x")


@pytest.mark.parametrize("address", ["127.0.0.1:5555", "http://x", "", "tcp://999.1.1.1:5555", "tcp://[::1]:5557"])
def test_bad_address_is_a_config_error(address):
    with pytest.raises(ConfigError):
        BrokerConfig(frontend=address)


def test_stats_interval_off_or_at_least_a_tenth_of_a_second_is_taken():
    assert BrokerConfig(stats_interval_s=0).stats_interval_s == 0
    assert BrokerConfig(stats_interval_s=0.1).stats_interval_s == 0.1


def test_replies_and_disconnect_may_come_on_the_workers_second_socket(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    inbox, outbox, other = sockets(b.config.backend), sockets(b.config.backend), sockets(b.config.backend)
    incarnation = ready(inbox, 2, "w")
    wait_workers(b, client, 1)
    request(client, "a")
    request(client, "b")
    token_a, _ = recv(inbox)[2], recv(inbox)[2]
    outbox.send_multipart([P.VERSION, P.REPLY, token_a, P.reply_body("a", [0.0, 1.0], {})])
    assert P.unpack(recv(client)[2])["id"] == "a"
    outbox.send_multipart([P.VERSION, P.DISCONNECT, P.disconnect_body("w", incarnation)])
    ready(other, 2, "other")
    assert P.unpack(recv(other)[3])["id"] == "b"  # what "w" still held moved on


def test_stats_reply_names_its_request_and_a_stats_without_id_is_refused(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    assert stats(client)["workers"] == {}  # stats() checks the reply's id
    client.send_multipart([P.VERSION, P.STATS, P.pack({})])
    version, kind, body = recv(client)
    assert kind == P.ERROR and P.unpack(body)["code"] == P.E_BAD_FIELD


def test_a_burst_larger_than_the_queue_goes_to_workers_with_room_before_any_busy(broker, sockets):
    """The broker reads many requests per wake-up: with a queue of 2 and a worker with 8 free credits,
    a burst of 10 used to get 8 BUSY (the queue filled before any dispatch); the worker takes 8 first."""
    b = broker(max_queue=2)
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    ready(worker, 8, "w")
    deadline = time.monotonic() + WAIT_MS / 1000
    while not stats(client)["workers"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i in range(10):
        client.send_multipart([P.VERSION, P.REQUEST, P.text_request(f"r{i}", "a", "b")])
    held = [recv_kind(worker, P.REQUEST) for _ in range(8)]
    assert len(held) == 8
    assert stats(client)["queue"] == 2 and nothing(client, 100)  # no BUSY came back


def test_stats_say_how_each_worker_serves(broker, sockets):
    """Each worker's STATS entry carries what its READY said about how it serves (batch size, batch
    timeout, model), so a bench can title its report; what a worker did not say is left out."""
    from bertpool.clients.bench import pool_info

    b = broker()
    client, full, plain = sockets(b.config.frontend), sockets(b.config.backend), sockets(b.config.backend)
    full.send_multipart(P.ready_frames("full", None, P.new_incarnation(), 1, 8, "tf", 4, batch_timeout_ms=5.0,
                                       model={"hash": "0123456789abcdef", "dtype": "float16", "target": "cpu"}))
    plain.send_multipart(P.ready_frames("plain", None, P.new_incarnation(), 2, 1, "echo", 1,
                                        model={"hash": "none", "dtype": "none", "target": "none"}))
    deadline = time.monotonic() + WAIT_MS / 1000
    while len((got := stats(client))["workers"]) < 2:
        assert time.monotonic() < deadline, got
        time.sleep(0.01)
    assert {k: got["workers"]["full"][k] for k in ("batch_size", "batch_timeout_ms", "model")} == \
        {"batch_size": 4, "batch_timeout_ms": 5.0, "model": "0123456789ab float16 cpu"}
    assert got["workers"]["plain"]["batch_size"] == 1  # echo: no model; no timeout said
    assert "model" not in got["workers"]["plain"] and "batch_timeout_ms" not in got["workers"]["plain"]
    info = pool_info(got)
    assert (info["batch_size"], info["batch_timeout_ms"], info["model"]) == ([1, 4], 5.0, "0123456789ab float16 cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_queue": 0}, "max_queue must be >= 1"),
    ({"max_queue": -1}, "max_queue must be >= 1"),
    ({"frontend_sndhwm_msgs": 0}, "frontend_sndhwm_msgs must be >= 1"),
])
def test_queue_bounds_that_serve_nothing_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**kwargs)


def _echo_worker(address: str, stop: threading.Event) -> None:
    """A worker that answers every request at once, until stop is set."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    ready(sock, 4, "echo")
    while not stop.is_set():
        if sock.poll(50):
            _, kind, token, body, *_ = sock.recv_multipart()
            if kind != P.REQUEST:
                continue
            sock.send_multipart([P.VERSION, P.REPLY, token,
                                 P.reply_body(P.unpack(body)["id"], [0.3, 0.7], {})])
    sock.close()


def wait_stats(client: zmq.Socket, predicate, timeout_s: float = 30.0) -> dict:
    """Poll stats until ``predicate(stats)`` holds (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = stats(client)
        if predicate(got):
            return got
        assert time.monotonic() < deadline, f"stats never satisfied the condition; last: {got}"
        time.sleep(0.05)  # polling a counter; there is no event to wait on


def test_a_client_that_stops_reading_is_dropped_not_waited_for(broker, sockets):
    b = broker(max_queue=4, frontend_sndhwm_msgs=8)
    stop = threading.Event()
    worker = threading.Thread(target=_echo_worker, args=(b.config.backend, stop), daemon=True)
    worker.start()
    try:
        other = sockets(b.config.frontend)
        wait_workers(b, other, 1)
        stuck = zmq.Context.instance().socket(zmq.DEALER)
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.connect(b.config.frontend)
        n = 20_000  # far more replies than its queue and the OS socket buffers hold
        for i in range(n):
            request(stuck, i)  # and never read a reply
        got = wait_stats(other, lambda s: s["broker"]["requests"] + s["broker"]["busy"] >= n)
        assert got["broker"]["dropped"] > 0  # the broker dropped (and counted) what it could not send
        request(other, "served")
        reply = recv(other)
        assert reply[1] == P.REPLY and P.unpack(reply[2])["id"] == "served"
        stuck.close()
    finally:
        stop.set()
        worker.join(5)


# ------------------------------------------------ heartbeats and re-dispatch

def recv_kind(sock: zmq.Socket, kind: bytes) -> list[bytes]:
    """The next message of ``kind`` (skipping heartbeats and anything else; bounded in time)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[1] == kind:
                return frames
    raise AssertionError(f"no {P.KIND_NAMES[kind]} in time")


def drain_kind(sock: zmq.Socket, kind: bytes, ms: int = 300) -> list[list[bytes]]:
    """Every message of ``kind`` that arrives within ``ms`` of quiet."""
    got = []
    while sock.poll(ms):
        frames = sock.recv_multipart()
        if frames[1] == kind:
            got.append(frames)
    return got


def beat(sock: zmq.Socket) -> None:
    sock.send_multipart(P.heartbeat_frames())


def test_silent_worker_is_removed_its_requests_redispatched_and_its_late_reply_dropped(broker, sockets):
    b = broker(heartbeat_interval_s=0.1, heartbeat_liveness=3)
    client = sockets(b.config.frontend)
    hung, live = sockets(b.config.backend), sockets(b.config.backend)
    ready(hung, 2, "hung")
    wait_workers(b, client, 1)
    request(client, "r")
    old_token = recv_kind(hung, P.REQUEST)[2]
    assert recv_kind(hung, P.HEARTBEAT)  # the broker beats its workers
    got = wait_stats(client, lambda s: s["broker"]["workers_lost"] == 1)  # hung never beats back
    assert got["workers"] == {} and got["broker"]["redispatched"] == 1
    ready(live, 2, "live")
    frames = recv_kind(live, P.REQUEST)
    assert P.unpack(frames[3])["id"] == "r" and frames[2] != old_token  # fresh token
    # The hung worker wakes up and answers under its old token: dropped, counted, not delivered.
    hung.send_multipart(P.reply_frames(old_token, P.reply_body("r", [0.9, 0.1], {})))
    wait_stats(client, lambda s: s["broker"]["late_replies_dropped"] == 1)
    live.send_multipart(P.reply_frames(frames[2], P.reply_body("r", [0.2, 0.8], {})))
    reply = recv_kind(client, P.REPLY)
    assert P.parse_prediction(P.unpack(reply[2]))[0] == 1
    assert nothing(client)  # exactly one answer
    # Its next beat tells it it is unknown here: it must register afresh.
    beat(hung)
    frames = recv_kind(hung, P.DISCONNECT)
    assert P.parse_from_broker(frames).reason == P.DISCONNECT_UNKNOWN
    assert len(stats(client)["workers"]) == 1  # never evicts the live worker


def test_request_fails_worker_lost_after_max_redispatch(broker, sockets):
    b = broker(heartbeat_interval_s=0.1, heartbeat_liveness=2, max_redispatch=1)
    client = sockets(b.config.frontend)
    request(client, "doomed")
    for n in (1, 2):  # two workers in turn take it and go silent
        worker = sockets(b.config.backend)
        ready(worker, 1, f"w{n}")
        assert P.unpack(recv_kind(worker, P.REQUEST)[3])["id"] == "doomed"
        if n == 1:
            wait_stats(client, lambda s: s["broker"]["workers_lost"] == 1)
    reply = recv_kind(client, P.ERROR)
    assert P.parse_error(P.unpack(reply[2]))[0] == P.E_WORKER_LOST
    got = stats(client)["broker"]
    assert got["workers_lost"] == 2 and got["redispatched"] == 1 and got["worker_lost"] == 1


def test_a_busy_worker_that_beats_is_never_presumed_dead(broker, sockets):
    b = broker(heartbeat_interval_s=0.1, heartbeat_liveness=5)
    client = sockets(b.config.frontend)
    worker, outbox = sockets(b.config.backend), sockets(b.config.backend)
    ready(worker, 1, "busy")
    wait_workers(b, client, 1)
    request(client, "long")
    token = recv_kind(worker, P.REQUEST)[2]
    for _ in range(30):  # a long batch: only the I/O socket speaks, 1.5 s = 15 intervals
        beat(worker)
        time.sleep(0.05)
    outbox.send_multipart(P.reply_frames(token, P.reply_body("long", [0.5, 0.5], {})))  # compute socket
    assert P.unpack(recv_kind(client, P.REPLY)[2])["id"] == "long"
    got = stats(client)["broker"]
    assert got["workers_lost"] == 0 and got["redispatched"] == 0


# ------------------------------------------------------------------ deadlines

def request_with_deadline(client: zmq.Socket, rid, deadline_ms) -> None:
    client.send_multipart([P.VERSION, P.REQUEST, P.text_request(rid, "a", "b", deadline_ms=deadline_ms)])


def test_expired_requests_are_answered_and_never_dispatched(broker, sockets):
    b = broker(heartbeat_interval_s=0.1)
    client = sockets(b.config.frontend)
    request_with_deadline(client, "soon", 30)  # no worker yet: it expires in the queue
    reply = recv_kind(client, P.ERROR)
    assert P.unpack(reply[2])["id"] == "soon" and P.parse_error(P.unpack(reply[2]))[0] == P.E_DEADLINE
    request_with_deadline(client, "later", 60_000)
    worker = sockets(b.config.backend)
    ready(worker, 2, "w")
    message = P.parse_from_broker(recv_kind(worker, P.REQUEST))
    assert P.unpack(message.body)["id"] == "later"
    assert 0 < message.deadline_ms <= 60_000  # the time left travels with it
    assert stats(client)["broker"]["expired"] == 1


@pytest.mark.parametrize("bad", [-1, 0, "soon", True, 1e12])
def test_malformed_deadline_is_a_bad_field(broker, sockets, bad):
    b = broker()
    client = sockets(b.config.frontend)
    client.send_multipart([P.VERSION, P.REQUEST, P.pack({"id": "d", "text_a": "a", "text_b": "b",
                                                         "deadline_ms": bad})])
    reply = recv_kind(client, P.ERROR)
    assert P.unpack(reply[2])["id"] == "d" and P.parse_error(P.unpack(reply[2]))[0] == P.E_BAD_FIELD


def test_request_held_past_its_deadline_by_a_hung_worker_is_answered_once(broker, sockets):
    b = broker(heartbeat_interval_s=0.1, heartbeat_liveness=1000)
    client = sockets(b.config.frontend)
    worker = sockets(b.config.backend)
    ready(worker, 1, "stuck")
    wait_workers(b, client, 1)
    request_with_deadline(client, "held", 200)
    token = recv_kind(worker, P.REQUEST)[2]
    reply = recv_kind(client, P.ERROR)  # the worker never answered
    assert P.parse_error(P.unpack(reply[2]))[0] == P.E_DEADLINE
    worker.send_multipart(P.reply_frames(token, P.reply_body("held", [0.5, 0.5], {})))
    wait_stats(client, lambda s: s["broker"]["late_replies_dropped"] == 1)
    assert not drain_kind(client, P.REPLY)  # never answered twice


# ------------------------------------------------------------------- overload

def test_queue_is_bounded_in_bytes(broker, sockets):
    b = broker(max_queue_bytes=1000, max_request_bytes=400, max_message_bytes=4000)
    client = sockets(b.config.frontend)  # no workers: everything queues
    body_of = lambda i: P.text_request(i, "x" * 250, "y")  # noqa: E731
    assert 3 * len(body_of(0)) <= 1000 < 4 * len(body_of(0))
    for i in range(4):
        client.send_multipart([P.VERSION, P.REQUEST, body_of(i)])
    reply = recv_kind(client, P.BUSY)
    assert P.unpack(reply[2])["id"] == 3
    got = stats(client)
    assert got["queue"] == 3 and got["queue_bytes"] <= 1000 and got["broker"]["busy"] == 1


def test_oversized_frame_is_refused_before_it_is_read(broker, sockets):
    b = broker(max_request_bytes=1000, max_message_bytes=2000, max_queue_bytes=10_000)
    hostile, client = sockets(b.config.frontend), sockets(b.config.frontend)
    hostile.send_multipart([P.VERSION, P.REQUEST, P.text_request("huge", "x" * 100_000, "y")])
    client.send_multipart([P.VERSION, P.REQUEST, P.text_request("big", "x" * 1500, "y")])
    reply = recv_kind(client, P.ERROR)  # under MAXMSGSIZE, over max_request_bytes: a typed error
    assert P.parse_error(P.unpack(reply[2]))[0] == P.E_TOO_LARGE
    assert nothing(hostile)  # disconnected by ZeroMQ, never read
    assert stats(client)["broker"]["requests"] == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"max_queue_bytes": 10, "max_request_bytes": 100}, "max_queue_bytes"),
    ({"max_message_bytes": 100, "max_request_bytes": 100}, "max_message_bytes"),
    ({"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
    ({"heartbeat_liveness": 0}, "heartbeat_liveness"),
    ({"max_redispatch": -1}, "max_redispatch"),
    ({"drain_timeout_s": -1}, "drain_timeout_s"),
    ({"frontend_rcvhwm_msgs": 0}, "frontend_rcvhwm_msgs"),
    # A liveness window over a day disabled failure detection (99999999999999999999 was taken).
    ({"heartbeat_liveness": 99999999999999999999}, "heartbeat_liveness x heartbeat_interval_s must be at most"),
    ({"heartbeat_interval_s": 3600, "heartbeat_liveness": 25}, "at most 86400 s"),
    # 1e-9 printed some 90,000 stats lines a second; inf or NaN is no interval either.
    ({"stats_interval_s": 1e-9}, r"stats_interval_s must be 0 \(off\) or in \[0.1, 86400\] s"),
    ({"stats_interval_s": 0.05}, "stats_interval_s"), ({"stats_interval_s": -1}, "stats_interval_s"),
    ({"stats_interval_s": float("inf")}, "stats_interval_s"), ({"stats_interval_s": float("nan")}, "stats_interval_s"),
])
def test_reliability_settings_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**kwargs)


# ----------------------------------------------------------- client liveness

def test_client_heartbeat_is_answered_at_once(broker, sockets):
    b = broker()
    client = sockets(b.config.frontend)
    client.send_multipart([P.VERSION, P.HEARTBEAT, P.heartbeat_body()])
    frames = recv(client)
    assert frames[:2] == [P.VERSION, P.HEARTBEAT] and P.unpack(frames[2]) == {}


@pytest.mark.parametrize("frames, code", [
    ([b"BP1", P.REQUEST, P.text_request(1, "a", "b")], P.E_BAD_VERSION),
    ([P.VERSION, P.REQUEST], P.E_BAD_FRAMES),
    ([P.VERSION, P.REQUEST, b"x", b"y"], P.E_BAD_FRAMES),
    ([P.VERSION, P.READY, P.pack({"id": 1})], P.E_BAD_KIND),
    ([P.VERSION, P.STATS, b"\xc1"], P.E_BAD_ENCODING),
])
def test_malformed_client_messages_get_typed_errors(broker, sockets, frames, code):
    b = broker()
    client = sockets(b.config.frontend)
    client.send_multipart(frames)
    reply = recv_kind(client, P.ERROR)
    assert P.parse_error(P.unpack(reply[2]))[0] == code


# ------------------------------------------------------------- graceful stop

def test_stop_refuses_new_work_lets_held_requests_finish_and_dismisses_workers(broker, sockets):
    b = broker(drain_timeout_s=30)
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    ready(worker, 1, "w")
    wait_workers(b, client, 1)
    request(client, "held")
    token = recv_kind(worker, P.REQUEST)[2]
    b.stop()
    request(client, "new")
    reply = recv_kind(client, P.ERROR)
    assert P.unpack(reply[2])["id"] == "new" and P.parse_error(P.unpack(reply[2]))[0] == P.E_SHUTDOWN
    worker.send_multipart(P.reply_frames(token, P.reply_body("held", [0.5, 0.5], {})))
    assert P.unpack(recv_kind(client, P.REPLY)[2])["id"] == "held"
    frames = recv_kind(worker, P.DISCONNECT)
    assert P.parse_from_broker(frames).reason == P.DISCONNECT_SHUTDOWN
    b.test_thread.join(10)
    assert not b.test_thread.is_alive()


def test_drain_timeout_answers_what_is_left_shutting_down(broker, sockets):
    b = broker(drain_timeout_s=0.3)
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    ready(worker, 1, "stuck")
    wait_workers(b, client, 1)
    request(client, "held")
    request(client, "queued")
    recv_kind(worker, P.REQUEST)
    b.stop()
    answers = {P.unpack(recv_kind(client, P.ERROR)[2])["id"] for _ in range(2)}
    assert answers == {"held", "queued"}
    b.test_thread.join(10)
    assert not b.test_thread.is_alive() and b.counters.shutting_down == 2


# ------------------------------------------------- re-registrations, pool totals

def test_a_ready_while_draining_is_not_answered_so_no_hot_loop(broker, sockets):
    """Draining, the broker answered every READY with DISCONNECT; the worker re-registered at once on
    a new socket, and the two ping-ponged some 1,500 times a second. Now a READY gets no answer; the
    worker's next beat (an interval later) gets one DISCONNECT shutting_down, and the drain ends."""
    b = broker(drain_timeout_s=30)
    client, holder = sockets(b.config.frontend), sockets(b.config.backend)
    ready(holder, 1, "holder")
    wait_workers(b, client, 1)
    request(client, "held")
    token = recv_kind(holder, P.REQUEST)[2]  # the drain lasts until this is answered
    b.stop()
    late = sockets(b.config.backend)
    ready(late, 1, "late")
    assert nothing(late, 300)  # no DISCONNECT per READY
    beat(late)
    frames = recv_kind(late, P.DISCONNECT)
    assert P.parse_from_broker(frames).reason == P.DISCONNECT_SHUTDOWN
    again = sockets(b.config.backend)  # a worker that re-registers at once: still no answer
    ready(again, 1, "late")
    assert nothing(again, 300)
    holder.send_multipart(P.reply_frames(token, P.reply_body("held", [0.5, 0.5], {})))
    assert P.unpack(recv_kind(client, P.REPLY)[2])["id"] == "held"
    b.test_thread.join(10)
    assert not b.test_thread.is_alive() and b.counters.disconnects_sent == 1


def test_the_same_process_re_registering_is_neither_a_restart_nor_a_loss(broker, sockets, caplog):
    """A READY for a registered slot from the same pid (the worker re-registered after a pause, a
    DISCONNECT or a broker stall) was taken as the slot's restart: the old registration counted as a
    lost worker, and with --max-redispatch 0 what it held failed worker_lost. It is re-registered:
    what it held is re-queued without a loss."""
    caplog.set_level(logging.INFO, logger="bertpool.broker")
    b = broker(max_redispatch=0)
    client, first, second = sockets(b.config.frontend), sockets(b.config.backend), sockets(b.config.backend)
    ready(first, 1, SLOT, slot=SLOT, pid=4242)
    wait_workers(b, client, 1)
    request(client, "held")
    recv_kind(first, P.REQUEST)
    ready(second, 1, SLOT, slot=SLOT, pid=4242)
    assert P.unpack(recv_kind(second, P.REQUEST)[3])["id"] == "held"  # re-queued, not failed
    got = stats(client)
    assert list(got["workers"]) == [SLOT]
    assert (got["broker"]["workers_lost"], got["broker"]["worker_lost"], got["broker"]["requeued"]) == (0, 0, 1)
    assert f"worker {SLOT} removed (re-registered)" in caplog.text and f"worker {SLOT} re-registered" in caplog.text
    assert "restart" not in caplog.text


def test_the_removal_log_says_how_many_requests_failed_worker_lost(broker, sockets, caplog):
    """The log said "0 requests re-queued" while 2 clients got worker_lost: it now says both."""
    caplog.set_level(logging.INFO, logger="bertpool.broker")
    b = broker(max_redispatch=0)
    client, dead, restarted = sockets(b.config.frontend), sockets(b.config.backend), sockets(b.config.backend)
    ready(dead, 2, SLOT, slot=SLOT, pid=100)
    wait_workers(b, client, 1)
    request(client, "a")
    request(client, "b")
    recv_kind(dead, P.REQUEST), recv_kind(dead, P.REQUEST)
    ready(restarted, 2, SLOT, slot=SLOT, pid=101)  # a new process: the old one died holding both
    codes = [P.parse_error(P.unpack(recv_kind(client, P.ERROR)[2]))[0] for _ in range(2)]
    assert codes == [P.E_WORKER_LOST] * 2
    stats(client)  # the broker logged the removal before it read this
    assert (f"worker {SLOT} removed (replaced by its restart); 0 requests re-queued, 2 failed worker_lost, "
            f"0 already answered deadline_exceeded") in caplog.text


def test_a_malformed_ready_is_a_warning_once_per_worker(broker, sockets, caplog):
    """A READY the broker refuses (here a name over MAX_NAME_LEN) left the worker re-registering forever
    with nothing in the broker's log above DEBUG. Now one WARNING per worker (its pid: each retry comes
    on a new socket), then DEBUG."""
    caplog.set_level(logging.DEBUG, logger="bertpool.broker")
    b = broker()
    client = sockets(b.config.frontend)
    long_name = "x" * (P.MAX_NAME_LEN + 1)
    for pid in (77, 77, 78):
        sockets(b.config.backend).send_multipart(
            [P.VERSION, P.READY, P.ready_body(long_name, None, P.new_incarnation(), pid, 1, "test", 1)])
    wait_stats(client, lambda s: s["broker"]["dropped_malformed"] == 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("malformed READY" in w and "worker: must be a str" in w for w in warnings)
    assert sorted("(pid 77)" in w for w in warnings) == [False, True]  # one each (sockets race: any order)
    assert sum("(pid 78)" in w for w in warnings) == 1
    assert all(long_name not in w for w in warnings)


def _stats_frames(inferences: int, epoch: str, reconnects: int = 0, compute_s: float = 0.0) -> list[bytes]:
    counts = [0] * (len(P_LATENCY_BUCKETS) + 1)
    counts[0] = inferences
    return P.stats_frames({"inferences": inferences, "batches": inferences, "padded_rows": 0,
                           "reconnects": reconnects}, epoch,
                          {"compute_seconds": {"counts": counts, "sum": compute_s}})


def test_stats_from_a_socket_that_never_registered_are_dropped(broker, sockets):
    """One STATS from any peer on the worker endpoint, unregistered, was added to the pool totals for
    good. Now STATS count from a registered socket, from one that answered a request handed out here
    (a worker's compute socket), or under an epoch one of those sent; others are dropped and counted."""
    b = broker()
    client, inbox, outbox, stranger = (sockets(b.config.frontend), *(sockets(b.config.backend) for _ in range(3)))
    stranger.send_multipart(_stats_frames(1000, "forged"))
    wait_stats(client, lambda s: s["broker"]["stats_dropped"] == 1)
    ready(inbox, 1, "w")
    wait_workers(b, client, 1)
    request(client, "r")
    token = recv_kind(inbox, P.REQUEST)[2]
    outbox.send_multipart(P.reply_frames(token, P.reply_body("r", [0.5, 0.5], {})))  # its compute socket
    recv_kind(client, P.REPLY)
    outbox.send_multipart(_stats_frames(1, "compute-epoch"))  # taken: that socket answered a request
    got = wait_stats(client, lambda s: s["totals"]["inferences"] == 1)
    assert got["broker"]["stats_dropped"] == 1 and b.pool_totals.histograms["compute_seconds"].counts[0] == 1
    inbox.send_multipart(_stats_frames(3, "worker-epoch"))
    wait_stats(client, lambda s: s["totals"]["inferences"] == 4)
    sockets(b.config.backend).send_multipart(_stats_frames(5, "worker-epoch"))  # a known epoch: taken
    wait_stats(client, lambda s: s["totals"]["inferences"] == 6)
    stranger.send_multipart(_stats_frames(10**6, "forged"))
    got = wait_stats(client, lambda s: s["broker"]["stats_dropped"] == 2)
    assert got["totals"]["inferences"] == 6 and got["broker"]["dropped_malformed"] == 0
    # Values no worker reports are malformed, from anyone.
    inbox.send_multipart(P.stats_frames({"inferences": 2**63}, "worker-epoch"))
    inbox.send_multipart([P.VERSION, P.STATS, P.pack({"inferences": 6, "epoch": "worker-epoch", "histograms": {
        "compute_seconds": {"counts": [0] * (len(P_LATENCY_BUCKETS) + 1), "sum": float("inf")}}})])
    got = wait_stats(client, lambda s: s["broker"]["dropped_malformed"] == 2)
    assert got["totals"]["inferences"] == 6 and b.pool_totals.histograms["compute_seconds"].sum == 0.0


def test_the_first_stats_of_a_worker_that_registered_before_is_a_baseline(broker, sockets):
    """After a broker restart, a long-lived worker's first STATS added its whole lifetime to the new
    broker's totals (inferences_total above requests_total{ok}). A stream first heard with
    reconnects > 0 (the process registered before, maybe elsewhere) is now a baseline; a fresh one
    (reconnects 0, or a worker that does not say) counts in full."""
    b = broker()
    client, old, fresh = sockets(b.config.frontend), sockets(b.config.backend), sockets(b.config.backend)
    ready(old, 1, "old")
    ready(fresh, 1, "fresh")
    wait_workers(b, client, 2)
    old.send_multipart(_stats_frames(1000, "old-epoch", reconnects=2, compute_s=50.0))
    fresh.send_multipart(_stats_frames(3, "fresh-epoch", compute_s=0.5))
    wait_stats(client, lambda s: s["totals"]["inferences"] == 3)
    old.send_multipart(_stats_frames(1004, "old-epoch", reconnects=2, compute_s=50.25))
    got = wait_stats(client, lambda s: s["totals"]["inferences"] == 7)
    assert got["totals"]["batches"] == 7
    compute = b.pool_totals.histograms["compute_seconds"]
    assert compute.counts[0] == 7 and compute.sum == pytest.approx(0.75)


# ----------------------------------------------------------------- busy polling


class _Poller:
    """A stand-in for zmq.Poller: answers each poll() from ``answers`` (then nothing), noting its timeout."""

    def __init__(self, answers=()) -> None:
        self.answers, self.timeouts = list(answers), []

    def poll(self, timeout):
        self.timeouts.append(timeout)
        return self.answers.pop(0) if self.answers else []


def test_busy_poll_blocks_at_once_when_its_window_is_past():
    poller = _Poller()
    assert busy_poll(poller, 50, spin_until=0.0) == [] and poller.timeouts == [50]


def test_busy_poll_returns_the_first_events_found_without_blocking():
    poller = _Poller([[], [], [("sock", zmq.POLLIN)]])
    assert busy_poll(poller, 50, spin_until=time.monotonic() + 60) == [("sock", zmq.POLLIN)]
    assert poller.timeouts == [0, 0, 0]


def test_busy_poll_blocks_once_its_window_ends_with_nothing_found():
    poller = _Poller()
    assert busy_poll(poller, 50, spin_until=time.monotonic() + 0.002) == []
    assert poller.timeouts[-1] == 50 and set(poller.timeouts[:-1]) <= {0}


@pytest.mark.parametrize("value", [-1.0, MAX_BUSY_POLL_US + 1, float("nan"), float("inf")])
def test_busy_poll_outside_its_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"busy_poll_us must be in \[0, 10000\] us"):
        BrokerConfig(busy_poll_us=value)


def test_a_busy_polling_broker_spins_at_low_load_only_and_serves_as_ever(broker, sockets, monkeypatch):
    """With busy_poll_us, the broker spins after a message while nothing is queued and its workers
    hold no more requests than there are workers; with requests queued it sleeps as before. Replies
    flow either way."""
    spins: list[float] = []  # spin_until of each busy_poll call, in order
    called = threading.Condition()
    real = broker_module.busy_poll

    def recording(poller, wait_ms, spin_until):
        with called:
            spins.append(spin_until)
            called.notify_all()
        return real(poller, wait_ms, spin_until)

    def next_spin_until() -> float:
        """The spin_until of the broker's next busy_poll call (made after all it has handled)."""
        with called:
            seen = len(spins)
            assert called.wait_for(lambda: len(spins) > seen, timeout=WAIT_MS / 1000)
            return spins[seen]

    monkeypatch.setattr(broker_module, "busy_poll", recording)
    b = broker(busy_poll_us=MAX_BUSY_POLL_US)
    client, worker = sockets(b.config.frontend), sockets(b.config.backend)
    request(client, "queued")  # no worker yet: it waits in the queue
    stats(client)
    assert next_spin_until() == 0.0
    ready(worker, 1, "w")  # takes the queued request: one held by one worker, none queued
    version, kind, token, *_ = recv(worker)
    assert kind == P.REQUEST and next_spin_until() > 0.0
    for i in range(3):
        request(client, i)  # the worker's credit is spent: these are queued
    stats(client)
    assert next_spin_until() == 0.0
    worker.send_multipart([P.VERSION, P.REPLY, token, P.reply_body("queued", [0.1, 0.9], {})])
    assert P.unpack(recv(client)[2])["id"] == "queued"


def test_a_lone_message_is_drained_without_a_recv_that_raises_again(monkeypatch):
    """_drain reads a wake-up's lone message and stops on ZMQ_EVENTS, not on a recv raising Again (the
    dearer of the two on a lone request's path); a burst is still handled whole, and read empty."""
    from bertpool.common import fastzmq

    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://drain")
        dealer.connect("inproc://drain")
        calls, handled = [], []
        real_recv = fastzmq._recv
        monkeypatch.setattr(fastzmq, "_recv", lambda *a: calls.append(1) or real_recv(*a))
        dealer.send_multipart([b"lone"])
        assert router.poll(10_000)
        assert Broker._drain(router, handled.append) is True
        assert len(handled) == 1 and len(calls) == 2  # identity and body: no third recv, to raise Again
        for i in range(3):
            dealer.send_multipart([str(i).encode()])
        for _ in range(3):
            if len(handled) == 4:
                break
            assert router.poll(10_000)
            assert Broker._drain(router, handled.append) is True
        assert [m[1] for m in handled] == [b"lone", b"0", b"1", b"2"]
    finally:
        ctx.destroy(linger=0)
