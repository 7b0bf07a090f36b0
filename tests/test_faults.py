"""Fault injection on real processes: workers SIGKILLed and SIGSTOPped under load, the broker
SIGKILLed and restarted, deadlines, overload, clients that vanish, hostile frames, SIGTERM.

Every request carries distinct text whose echo-backend answer the test recomputes, so a reply
that went to the wrong request, a lost one and a duplicate are all caught. Heartbeats are short
(0.2 s) so recovery is quick; every wait is bounded; no assertion is on timing except that no
request waits anywhere near its client timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import zmq

from bertpool.clients.bench import wait_for_workers
from bertpool.clients.client import Client
from bertpool.common import protocol as P
from bertpool.common.errors import RequestError
from bertpool.common.tokenizer import BertTokenizer
from bertpool.workers.backends import BackendConfig, EchoBackend, echo_probabilities, fallback_vocab_path
from bertpool.workers.worker import Worker, WorkerConfig
from conftest import free_tcp_port, start_module, stop_processes

HEARTBEAT = ("--heartbeat-interval-s", "0.2", "--heartbeat-liveness", "3")
CLIENT_TIMEOUT_S = 60.0
TOKENIZER = BertTokenizer(fallback_vocab_path())


def expected(a: str, b: str) -> np.ndarray:
    f = TOKENIZER.encode_pairs([(a, b)])
    return echo_probabilities(f.input_ids, f.input_mask)[0]


@dataclass
class Load:
    """Client threads sending distinct requests one after another until stop(); every answer
    is checked against the echo backend's."""
    address: str
    clients: int
    stop_event: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    mismatches: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    late_replies: int = 0
    max_latency_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list = field(default_factory=list)
    client_settings: dict = field(default_factory=dict)  # ClientConfig fields beyond the timeout

    def start(self) -> "Load":
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def _run(self, c: int) -> None:
        with Client(self.address, timeout_s=CLIENT_TIMEOUT_S, **self.client_settings) as client:
            i = 0
            while not self.stop_event.is_set() and i < 100_000:
                a, b = f"client {c} asks {i}", f"text {i * 31 + c}"
                t0 = time.monotonic()
                try:
                    result = client.predict(a, b)
                except RequestError as exc:
                    with self.lock:
                        self.errors[getattr(exc, "code", type(exc).__name__)] += 1
                else:
                    want = expected(a, b)
                    with self.lock:
                        if np.allclose(result.probabilities, want):
                            self.ok += 1
                        else:
                            self.mismatches.append((c, i, result.probabilities, want))
                with self.lock:
                    self.max_latency_s = max(self.max_latency_s, time.monotonic() - t0)
                i += 1
            with self.lock:
                self.late_replies += client.counters.late_replies

    def wait_ok(self, more: int, timeout_s: float = 60.0) -> None:
        """Block until ``more`` further requests were answered correctly (bounded)."""
        target, deadline = self.ok + more, time.monotonic() + timeout_s
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled at {self.ok} (errors {self.errors})"
            time.sleep(0.02)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self.threads)

    def check(self) -> None:
        """Every request answered, correctly, once, and none near its timeout."""
        assert not self.mismatches, self.mismatches[:3]
        assert not self.errors, self.errors
        assert self.late_replies == 0  # no duplicate (or stray) reply reached a client
        assert self.max_latency_s < CLIENT_TIMEOUT_S / 3, self.max_latency_s


def worker_pids(stats: dict) -> dict[str, int]:
    return {name: w["pid"] for name, w in stats["workers"].items()}


def busiest_pid(pool) -> int:
    """The pid of a worker that holds requests right now (bounded wait)."""
    stats = pool.wait_stats(lambda s: any(w["inflight"] > 0 for w in s["workers"].values()))
    return max(stats["workers"].values(), key=lambda w: w["inflight"])["pid"]


def test_sigkill_workers_mid_batch_under_load(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "40", "--batch-timeout-ms", "2", *HEARTBEAT,
                      parallel=3)
    load = Load(pool.address, clients=16).start()
    killed = []
    try:
        load.wait_ok(50)
        for _ in range(3):
            pid = busiest_pid(pool)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            # The supervisor restarts it; the broker re-dispatched what it held.
            pool.wait_stats(lambda s: len(s["workers"]) == 3 and pid not in worker_pids(s).values())
            load.wait_ok(50)
    finally:
        load.stop()
    load.check()
    stats = pool.stats()
    sent = load.ok
    assert stats["broker"]["replies"] == sent  # each request answered exactly once
    assert stats["broker"]["redispatched"] >= 1 and stats["broker"]["worker_lost"] == 0
    assert not set(killed) & set(worker_pids(stats).values())


def test_sigstopped_worker_is_presumed_dead_and_comes_back_as_a_fresh_registration(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "100", "--batch-timeout-ms", "2", *HEARTBEAT,
                      parallel=3)
    load = Load(pool.address, clients=16).start()
    pid = None
    try:
        load.wait_ok(40)
        pid = busiest_pid(pool)
        os.kill(pid, signal.SIGSTOP)  # hangs with its sockets open: only heartbeats can tell
        pool.wait_stats(lambda s: s["broker"]["workers_lost"] >= 1 and pid not in worker_pids(s).values())
        load.wait_ok(40)  # the other two serve everything, including what it held
        os.kill(pid, signal.SIGCONT)
        # It notices it was dropped (DISCONNECT, or the broker's silence) and registers afresh.
        stats = pool.wait_stats(lambda s: pid in worker_pids(s).values() and len(s["workers"]) == 3)
        load.wait_ok(40)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        load.stop()
    load.check()
    stats = pool.wait_stats(lambda s: s["broker"]["replies"] == load.ok)
    assert stats["broker"]["redispatched"] >= 1
    # Whatever it answered after waking, under tokens it held before, was dropped (and counted),
    # or dropped by the worker itself: never delivered (checked above: no duplicates, all correct).
    assert stats["broker"]["replies"] == load.ok


def test_workers_re_register_with_a_broker_restarted_after_sigkill(tmp_path):
    front, back = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    broker_args = ("bertpool.broker.broker", "--address", front, "--worker-address", back,
                   "--stats-interval-s", "0", *HEARTBEAT)
    procs = [start_module(tmp_path, *broker_args),
             start_module(tmp_path, "bertpool.workers.supervisor", "--worker-address", back, "--parallel", "2",
                    "--batch-timeout-ms", "1", *HEARTBEAT)]
    try:
        wait_for_workers(front, 2, timeout_s=60)
        with Client(front, timeout_s=30) as client:
            pids = set(worker_pids(client.stats()).values())
            pairs = [(f"before {i}", f"restart {i}") for i in range(20)]
            assert all(np.allclose(r.probabilities, expected(*p)) for r, p in zip(client.predict_many(pairs), pairs))
            procs[0].kill()
            procs[0].wait()
            procs[0] = start_module(tmp_path, *broker_args)  # same addresses
            wait_for_workers(front, 2, timeout_s=60)
            pairs = [(f"after {i}", f"restart {i}") for i in range(20)]
            # The same client (its socket reconnects) is served by the same, re-registered, workers.
            results = client.predict_many(pairs)
            assert all(np.allclose(r.probabilities, expected(*p)) for r, p in zip(results, pairs))
            stats = client.stats()
        assert set(worker_pids(stats).values()) == pids  # re-registered, not restarted
        assert procs[1].poll() is None
    finally:
        stop_processes(*procs)


def test_broker_sigkilled_under_load_and_restarted_loses_no_request(tmp_path):
    """Clients with requests in flight (queued at the broker and held by workers) when the
    broker dies: they notice, reconnect and resend; the workers re-register with the new broker;
    every request is answered correctly, exactly once, and none waits near its timeout."""
    front, back = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    broker_args = ("bertpool.broker.broker", "--address", front, "--worker-address", back,
                   "--stats-interval-s", "0", *HEARTBEAT)
    procs = [start_module(tmp_path, *broker_args),
             start_module(tmp_path, "bertpool.workers.supervisor", "--worker-address", back, "--parallel", "2",
                    "--backend", "echo", "--echo-delay-ms", "20", "--batch-timeout-ms", "2", *HEARTBEAT)]
    # Resends are bounded per request: enough of them to outlast a broker restart on a busy machine.
    load = Load(front, clients=8, client_settings=dict(heartbeat_interval_s=0.2, heartbeat_liveness=3,
                                                       lost_retries=20))
    try:
        wait_for_workers(front, 2, timeout_s=60)
        load.start()
        load.wait_ok(40)
        for _ in range(2):
            procs[0].kill()
            procs[0].wait()
            procs[0] = start_module(tmp_path, *broker_args)  # same addresses
            wait_for_workers(front, 2, timeout_s=60)
            load.wait_ok(40)
    finally:
        load.stop()
        stop_processes(*procs)
    load.check()


def raw_client(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def answers(sock: zmq.Socket, n: int, timeout_s: float = 60.0) -> dict:
    """id -> (kind, body) for the next n answers (bounded)."""
    got, deadline = {}, time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} answers"
        if sock.poll(100):
            frames = sock.recv_multipart()
            kind, body = P.split_reply(frames)
            assert body["id"] not in got, f"answered twice: {body['id']}"
            got[body["id"]] = (kind, body)
    return got


def test_deadlines_expire_in_the_queue_and_in_the_worker(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "600", "--batch-size", "1",
                      "--batch-timeout-ms", "0", "--capacity", "1", *HEARTBEAT, parallel=1)
    sock = raw_client(pool.address)
    try:
        sock.send_multipart([P.VERSION, P.REQUEST, P.text_request("busy", "keeps the", "worker busy")])
        pool.wait_stats(lambda s: sum(w["inflight"] for w in s["workers"].values()) == 1)
        sock.send_multipart([P.VERSION, P.REQUEST, P.text_request("late", "a", "b", deadline_ms=100)])
        sock.send_multipart([P.VERSION, P.REQUEST, P.text_request("fine", "c", "d", deadline_ms=60_000)])
        got = answers(sock, 3)
    finally:
        sock.close()
    assert got["busy"][0] == P.REPLY and got["fine"][0] == P.REPLY
    assert got["late"][0] == P.ERROR and got["late"][1]["code"] == P.E_DEADLINE
    assert pool.stats()["broker"]["expired"] == 1


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_overload_at_ten_times_capacity_gets_busy_and_the_pool_still_serves(start_pool):
    # One worker, 4 per 20 ms batch: ~200 requests/s. 2,000 sent at once is 10 s of work.
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "20", "--batch-timeout-ms", "2",
                      "--max-queue", "32", *HEARTBEAT, parallel=1)
    socks = [raw_client(pool.address) for _ in range(4)]
    rss_before = _rss_kib(pool.process.pid)
    try:
        for k, sock in enumerate(socks):
            for i in range(500):
                sock.send_multipart([P.VERSION, P.REQUEST, P.text_request(f"{k}-{i}", f"flood {k}", f"n {i}")])
        results = [answers(sock, 500) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    kinds = Counter(kind for got in results for kind, _ in got.values())
    assert kinds[P.BUSY] > 0 and kinds[P.REPLY] > 0 and set(kinds) == {P.BUSY, P.REPLY}
    for k, got in enumerate(results):
        for rid, (kind, body) in got.items():
            if kind == P.REPLY:
                i = int(rid.split("-")[1])
                assert np.allclose(P.parse_prediction(body)[1], expected(f"flood {k}", f"n {i}"))
    stats = pool.stats()
    assert stats["broker"]["busy"] == kinds[P.BUSY] and stats["queue"] <= 32
    assert _rss_kib(pool.process.pid) - rss_before < 64 * 1024  # the broker's memory stayed bounded
    with Client(pool.address, timeout_s=30) as client:
        assert np.allclose(client.predict("after the", "flood").probabilities, expected("after the", "flood"))


def test_a_client_that_vanishes_with_requests_in_flight_disturbs_no_one(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "20", "--batch-timeout-ms", "2", *HEARTBEAT,
                      parallel=2)
    load = Load(pool.address, clients=4).start()
    try:
        load.wait_ok(20)
        for round_ in range(3):
            gone = raw_client(pool.address)
            for i in range(100):
                gone.send_multipart([P.VERSION, P.REQUEST, P.text_request(i, f"vanish {round_}", f"{i}")])
            gone.close()  # with 100 requests in flight
        # Its 300 requests were all taken and worked off (answers to it dropped, counted in
        # "dropped" when the broker already knew it was gone), while the others kept being served.
        pool.wait_stats(lambda s: s["broker"]["requests"] >= 300 and s["queue"] == 0)
        load.wait_ok(20)
    finally:
        load.stop()
    load.check()


# --------------------------------------------------------------- hostile input

def random_frames(rng: random.Random) -> list[bytes]:
    """A random, truncated or corrupted multipart message, biased toward almost-valid ones."""
    kinds = [P.REQUEST, P.REPLY, P.ERROR, P.BUSY, P.READY, P.STATS, P.HEARTBEAT, P.DISCONNECT, P.REQUESTS,
             P.REPLIES, b"\x00", b"\xff"]
    valid = [
        [P.VERSION, P.REQUEST, P.text_request(rng.randrange(1 << 40), "fuzz", "me")],
        [P.VERSION, P.REQUEST, P.pack({"id": "x", "deadline_ms": rng.choice([-1, 0, "x", 1e30, None])})],
        [P.VERSION, P.STATS, P.stats_request(rng.randrange(100))],
        P.heartbeat_frames(),
        P.reply_frames(rng.randbytes(8), P.reply_body("x", [0.5, 0.5], {})),
        P.error_frames(rng.randbytes(8), P.error_body("x", "c", "m")),
        P.stats_frames({"batches": rng.randrange(10)}),
        P.worker_disconnect_frames("w", P.new_incarnation()),
        P.request_frames(rng.randbytes(8), P.text_request(1, "a", "b"), 0.1, rng.choice([None, 0.001, 5.0])),
        P.requests_frames([(rng.randbytes(8), P.text_request(i, "a", "b"), 0.1, rng.choice([None, 0.001, 5.0]))
                           for i in range(rng.randrange(1, 5))]),
        P.replies_frames([(rng.choice([P.REPLY, P.ERROR]), rng.randbytes(8), P.reply_body("x", [0.5, 0.5], {}))
                          for _ in range(rng.randrange(1, 5))]),
        P.broker_disconnect_frames(P.DISCONNECT_UNKNOWN),
    ]
    how = rng.randrange(5)
    if how == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 7))]
    if how == 1:
        return [P.VERSION, rng.choice(kinds), *[rng.randbytes(rng.randrange(0, 32)) for _ in range(rng.randrange(0, 5))]]
    frames = list(rng.choice(valid))
    if how == 2:  # truncated
        cut = rng.randrange(1, len(frames) + 1)
        frames = frames[:cut]
        frames[-1] = frames[-1][:rng.randrange(0, len(frames[-1]) + 1)]
    elif how == 3 and frames:  # one byte flipped
        k = rng.randrange(len(frames))
        if frames[k]:
            j = rng.randrange(len(frames[k]))
            frames[k] = frames[k][:j] + bytes([frames[k][j] ^ 0xFF]) + frames[k][j + 1:]
    return frames or [b""]


def test_thousands_of_hostile_frames_at_the_broker_crash_nothing(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "2", *HEARTBEAT, parallel=1)
    rng = random.Random(8)
    ctx = zmq.Context.instance()
    for address, n_sockets in ((pool.worker_address, 8), (pool.address, 8)):
        socks = [raw_client(address) for _ in range(n_sockets)]
        for i in range(3000):
            socks[i % n_sockets].send_multipart(random_frames(rng))
        for sock in socks:  # read what came back, then go: fuzz "workers" must not keep requests
            while sock.poll(50):
                sock.recv_multipart()
            sock.close()
    del ctx
    # Any fuzz socket that registered as a worker is gone; the real one is still there.
    pool.wait_stats(lambda s: len(s["workers"]) == 1)
    with Client(pool.address, timeout_s=30) as client:
        pairs = [(f"after fuzz {i}", "still correct") for i in range(30)]
        results = client.predict_many(pairs)
        assert all(np.allclose(r.probabilities, expected(*p)) for r, p in zip(results, pairs))
        stats = client.stats()
    assert pool.process.poll() is None
    assert stats["broker"]["dropped_malformed"] > 0 and stats["broker"]["errors"] > 0


@pytest.mark.parametrize("first_read_late_s", [0.0, 1.0])  # 1.0: the worker reads only once the flood is sent
def test_thousands_of_hostile_frames_at_a_worker_crash_nothing(tmp_path, monkeypatch, first_read_late_s):
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    # A real broker never sends a worker more than its credits; this flood does. Past the high-water
    # marks (1000 queued each side) a plain ROUTER drops the rest in silence, the real request last
    # of all, whenever the worker thread reads slower than this one sends (seen once in a CI run; a
    # worker kept from reading for a second got 2000 of 2758). Mandatory routing waits instead.
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    address = f"ipc://{tmp_path}/w"
    router.bind(address)
    worker = Worker(WorkerConfig(broker_address=address, batch_timeout_ms=1, heartbeat_interval_s=60.0),
                    backend=EchoBackend(BackendConfig()))
    on_messages = worker._on_messages
    late = [first_read_late_s]

    def read_late(*args):
        if late:
            time.sleep(late.pop())
        return on_messages(*args)
    monkeypatch.setattr(worker, "_on_messages", read_late)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert router.poll(30_000)
        identity = router.recv_multipart()[0]
        rng = random.Random(9)
        sent = 0
        for _ in range(3000):
            frames = random_frames(rng)
            if len(frames) >= 2 and frames[1] == P.DISCONNECT:
                continue  # a valid DISCONNECT makes it re-register elsewhere: not hostile, tested apart
            router.send_multipart([identity, *frames])
            sent += 1
        token = b"\x00" * 7 + b"\x2a"
        router.send_multipart([identity, *P.request_frames(token, P.text_request("real", "a", "b"), 0, None)])
        answer, read = None, Counter()  # messages read, by kind
        deadline = time.monotonic() + 60
        while answer is None:  # answers to the fuzz come first; ours is the last
            assert thread.is_alive(), "the worker thread ended"
            # Say what the worker did, should the answer never come.
            assert time.monotonic() < deadline, (
                f"no answer to the real request in 60 s; read {dict(read)}; worker inline={worker.inline} "
                f"failed={worker.failed} queued={len(worker._batcher)} stats={worker.stats.as_dict()}")
            if router.poll(100):
                frames = router.recv_multipart()
                read[P.KIND_NAMES.get(frames[2], repr(frames[2][:8]))] += 1
                if frames[2] == P.REPLIES:
                    answer = dict((t, (k, b)) for k, t, b in P.parse_from_worker(frames[1:]).replies).get(token)
        assert answer[0] == P.REPLY, P.unpack(answer[1])  # an ERROR says why
        assert np.allclose(P.parse_prediction(P.unpack(answer[1]))[1], expected("a", "b"))
        assert worker.stats.dropped_malformed > 0 and not worker.failed
    finally:
        worker.stop()
        thread.join(15)
        router.close()
    assert not thread.is_alive()


# ----------------------------------------------------------------- shutdown

def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "1500", "--batch-timeout-ms", "1", *HEARTBEAT,
                      parallel=1)
    with Client(pool.address, timeout_s=60) as client:
        pairs = [(f"in flight {i}", "at sigterm") for i in range(4)]
        futures = [client.submit(*p) for p in pairs]
        pool.wait_stats(lambda s: sum(w["inflight"] for w in s["workers"].values()) == 4)
        pool.process.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]  # the worker finishes its batch: all four answered
        assert all(np.allclose(r.probabilities, expected(*p)) for r, p in zip(results, pairs))
    assert pool.process.wait(60) == 0
    assert "Traceback" not in pool.log()


def test_broker_sigterm_refuses_new_work_and_exits_zero(tmp_path):
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    broker = start_module(tmp_path, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                    "--stats-interval-s", "0", "--drain-timeout-s", "30", *HEARTBEAT)
    worker = raw_client(back)
    client = raw_client(front)
    try:
        worker.send_multipart(P.ready_frames("raw", None, P.new_incarnation(), 1, 1, "test", 1))
        wait_for_workers(front, 1, timeout_s=60)
        client.send_multipart([P.VERSION, P.REQUEST, P.text_request("held", "a", "b")])
        deadline = time.monotonic() + 30
        while True:  # beat like a worker until the request arrives
            assert time.monotonic() < deadline
            worker.send_multipart(P.heartbeat_frames())
            if worker.poll(100) and (frames := worker.recv_multipart())[1] == P.REQUEST:
                break
        broker.send_signal(signal.SIGTERM)
        refused = None
        while refused is None:  # new work is refused while the held request may still finish
            assert time.monotonic() < deadline
            worker.send_multipart(P.heartbeat_frames())
            client.send_multipart([P.VERSION, P.REQUEST, P.text_request("new", "c", "d")])
            if client.poll(200):
                kind, body = P.split_reply(client.recv_multipart())
                if kind == P.ERROR and body["id"] == "new":
                    refused = body["code"]
        assert refused == P.E_SHUTDOWN
        worker.send_multipart(P.reply_frames(frames[2], P.reply_body("held", [0.5, 0.5], {})))
        got = {}
        while "held" not in got:
            assert time.monotonic() < deadline and client.poll(5000)
            kind, body = P.split_reply(client.recv_multipart())
            got[body["id"]] = kind
        assert got["held"] == P.REPLY
        while True:  # and the worker is told to leave
            assert worker.poll(5000)
            frames = worker.recv_multipart()
            if frames[1] == P.DISCONNECT:
                break
        assert broker.wait(30) == 0
    finally:
        worker.close()
        client.close()
        stop_processes(broker)


def test_bench_faults_report_says_how_and_where_it_ran_and_when_each_fault_was(tmp_path):
    """bench-faults' JSON had its settings only: no command line, versions or host; and a fault's time
    was a bare "at" (seconds since the epoch, unsaid)."""
    from test_bench import assert_environment

    out = tmp_path / "faults.json"
    argv = ["--duration-s", "1", "--clients", "2", "--client-procs", "1", "--parallel", "2", "--kill-every-s", "0.5",
            "--phases", "kill", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "bertpool.bench.faults", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert_environment(report, "bertpool-bench-faults", argv)
    faults = report["phases"]["kill"]["per_fault"]
    assert faults and all("at" not in f and f["at_unix_s"] > 1.6e9 for f in faults)


def test_bench_faults_exits_1_when_requests_are_lost(tmp_path):
    """bench-faults exited 0 whatever it found, so a script or CI job read lost requests as a pass.
    Here every answer comes after the client gave up (a 20 ms batch against a 5 ms client timeout):
    exit 1, the report still written, and the error line counts what was lost."""
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.bench.faults", "--duration-s", "1", "--clients", "2",
                           "--client-procs", "1", "--parallel", "2", "--kill-every-s", "0.5", "--phases", "kill",
                           "--client-timeout-s", "0.005", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    kill = json.loads(out.read_text())["phases"]["kill"]
    assert kill["lost"] > 0 and kill["answered_correctly"] == 0
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"bertpool-bench-faults: error: kill phase, of {kill['requests']} requests sent: "
                            f"{kill['lost']} lost"), error
