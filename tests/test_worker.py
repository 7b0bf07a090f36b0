"""A worker in-process against a raw ROUTER standing in for the broker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from bertpool.common import protocol as P
from bertpool.common.errors import ConfigError, ModelFormatError
from bertpool.workers.backends import (Backend, BackendConfig, EchoBackend, echo_probabilities,
                                       load_backend, run_padded)
from bertpool.workers import worker as worker_module
from bertpool.workers.worker import Worker, WorkerConfig, _Pending
from conftest import wait_or_kill

WAIT_MS = 10_000


class RecordingBackend(Backend):
    """Fixed batch 4; records every batch it sees; fails when a row's text says so."""
    name = "recording"
    batch_size = 4

    def __init__(self, fail_token: int | None = None):
        self.batches: list[np.ndarray] = []
        self.fail_token = fail_token

    def predict(self, input_ids, input_mask, segment_ids):
        assert input_ids.shape == (4, 128)
        self.batches.append(input_mask.sum(axis=1))
        if self.fail_token is not None and (input_ids == self.fail_token).any():
            raise RuntimeError("simulated accelerator fault")
        return echo_probabilities(input_ids, input_mask)


@pytest.fixture
def harness(tmp_path):
    """Factory: harness(backend, **config) -> (router, worker); worker stopped at teardown."""
    ctx = zmq.Context.instance()
    started = []

    def start(backend: Backend, **kwargs):
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        address = f"ipc://{tmp_path}/w{len(started)}"
        router.bind(address)
        # A raw ROUTER does not beat: heartbeats only where a test asks for them.
        kwargs.setdefault("heartbeat_interval_s", 60.0)
        worker = Worker(WorkerConfig(broker_address=address, **kwargs), backend=backend)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        assert router.poll(WAIT_MS)
        identity, version, kind, body = router.recv_multipart()
        ready = P.parse_ready(P.unpack(body))
        assert kind == P.READY and ready.capacity == worker.config.effective_capacity
        assert ready.requests_per_message == min(worker.config.effective_capacity, P.MAX_PER_MESSAGE)
        started.append((router, worker, thread))
        return router, identity, worker

    yield start
    for router, worker, thread in started:
        worker.stop()
        thread.join(10)
        assert not thread.is_alive()
        router.close()


def send(router, identity, token: int, body: bytes, deadline_s: float | None = None) -> None:
    router.send_multipart([identity, *P.request_frames(token.to_bytes(8, "big"), body, 0.001, deadline_s)])


def expand(frames: list[bytes]) -> list[tuple[bytes, bytes, list[bytes]]]:
    """A message the router received as ``(identity, kind, rest)`` items, a REPLIES message as one
    ``(identity, REPLY or ERROR, [token, body])`` item per answer it carries."""
    identity, _, kind, *rest = frames
    if kind != P.REPLIES:
        return [(identity, kind, rest)]
    return [(identity, k, [token, body]) for k, token, body in P.parse_from_worker(frames[1:]).replies]


def next_kinds(router) -> list[bytes]:
    """The kinds of the next message's items (see expand)."""
    return [kind for _, kind, _ in expand(router.recv_multipart())]


def kinds_until_disconnect(router) -> list[bytes]:
    """The kinds of the items received (see expand) up to and including a DISCONNECT, or up to a
    silence of WAIT_MS."""
    kinds: list[bytes] = []
    while router.poll(WAIT_MS):
        kinds += next_kinds(router)
        if kinds[-1] == P.DISCONNECT:
            break
    return kinds


def reply_messages(router, n: int) -> list[list[tuple[bytes, bytes, list[bytes]]]]:
    """The REPLY items (see expand) of each message the router receives that holds any, until n."""
    got: list[list[tuple[bytes, bytes, list[bytes]]]] = []
    while sum(map(len, got)) < n:
        assert router.poll(WAIT_MS), f"only {sum(map(len, got))} of {n} replies"
        answers = [item for item in expand(router.recv_multipart()) if item[1] == P.REPLY]
        if answers:
            got.append(answers)
    return got


def replies(router, n: int) -> dict[int, tuple[bytes, dict]]:
    """The next n REPLY/ERROR answers by token (STATS are skipped)."""
    out = {}
    while len(out) < n:
        assert router.poll(WAIT_MS), f"only {len(out)} of {n} replies"
        for _, kind, rest in expand(router.recv_multipart()):
            if kind in (P.REPLY, P.ERROR):  # STATS and HEARTBEAT are skipped
                out[int.from_bytes(rest[0], "big")] = (kind, P.unpack(rest[1]))
    return out


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_padding_to_fixed_batch_and_dummies_never_replied(harness, n):
    backend = RecordingBackend()
    router, ident, worker = harness(backend, batch_size=4, batch_timeout_ms=200, capacity=8)
    backend.batches.clear()  # forget the warm-up batch
    for i in range(n):
        send(router, ident, i, P.text_request(i, f"text {i}", "other"))
    got = replies(router, n)
    assert sorted(got) == list(range(n))
    assert all(kind == P.REPLY and body["id"] == tok for tok, (kind, body) in got.items())
    assert not router.poll(300) or next_kinds(router) == [P.STATS]  # nothing for dummies
    rows = np.concatenate(backend.batches)
    assert len(rows) % 4 == 0
    assert (rows == 2).sum() == len(rows) - n  # dummy rows: [CLS] [SEP] only
    assert worker.stats.inferences == n
    assert worker.stats.padded_rows == len(rows) - n


def test_many_requests_in_one_message_and_a_batch_answered_in_one(harness):
    """READY offers requests_per_message (its capacity); a REQUESTS message is served request by
    request (a malformed body in it fails alone, at once), and a batch's answers come back in one
    REPLIES message."""
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=60_000,
                                    capacity=8)
    tokens = [i.to_bytes(8, "big") for i in range(5)]
    router.send_multipart([ident, *P.requests_frames(
        [(tokens[0], P.text_request(0, "a", "b"), 0.001, None), (tokens[1], b"\xc1", 0.0, None),
         (tokens[2], P.text_request(2, "c", "d"), 0.0, 30.0), (tokens[3], P.text_request(3, "e", "f"), 0.0, None),
         (tokens[4], P.text_request(4, "g", "h"), 0.0, None)])])
    messages = []
    while sum(len(m) for m in messages) < 5:
        assert router.poll(WAIT_MS)
        messages.append([item for item in expand(router.recv_multipart()) if item[1] != P.STATS])
    bad, batch = [m for m in messages if m]
    assert [(kind, rest[0]) for _, kind, rest in bad] == [(P.ERROR, tokens[1])]
    assert [(kind, rest[0]) for _, kind, rest in batch] == [(P.REPLY, t) for t in tokens[:1] + tokens[2:]]
    assert [P.unpack(rest[1])["id"] for _, _, rest in batch] == [0, 2, 3, 4]


@pytest.mark.parametrize("hold_s, messages", [(10.0, [6]), (0.0, [2, 2, 2])])
def test_answers_of_batches_due_together_share_a_message_while_held_briefly(harness, monkeypatch, hold_s,
                                                                              messages):
    """Three batches due at once (six requests in one message, batch 2): with a hold long enough their
    answers leave in one REPLIES; with none, each batch's leave as it finishes."""
    monkeypatch.setattr(worker_module, "REPLY_HOLD_S", hold_s)
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=2, batch_timeout_ms=60_000,
                                    capacity=8)
    router.send_multipart([ident, *P.requests_frames(
        [(i.to_bytes(8, "big"), P.text_request(i, "a", f"b{i}"), 0.0, None) for i in range(6)])])
    got = reply_messages(router, 6)
    assert [len(m) for m in got] == messages
    assert all(P.unpack(rest[1])["timings"]["batch_size"] == 2 for m in got for _, _, rest in m)


def test_answers_beyond_one_message_leave_in_several(harness, monkeypatch):
    """A batch with more answers than a REPLIES may carry (here the limit is lowered to 2) answers
    every request, in messages of at most that many, instead of failing the worker."""
    monkeypatch.setattr(P, "MAX_PER_MESSAGE", 2)
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=5, batch_timeout_ms=60_000,
                                    capacity=5)
    for i in range(5):
        send(router, ident, i, P.text_request(i, "a", f"b{i}"))
    assert [len(m) for m in reply_messages(router, 5)] == [2, 2, 1] and not worker.failed


def test_a_capacity_beyond_one_message_still_registers_and_is_served(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=0,
                                    capacity=P.MAX_PER_MESSAGE + 1)  # the harness checks READY
    send(router, ident, 1, P.text_request(1, "a", "b"))
    assert replies(router, 1)[1][0] == P.REPLY


class NaNBackend(RecordingBackend):
    """Echo, except NaN for the rows holding ``fail_token`` (an overflow in the model)."""

    def predict(self, input_ids, input_mask, segment_ids):
        probs = echo_probabilities(input_ids, input_mask)
        probs[(input_ids == self.fail_token).any(axis=1)] = np.nan
        return probs


def test_a_row_with_non_finite_probabilities_is_an_error_not_a_prediction(harness):
    """NaN probabilities used to reach the client as a prediction (label 0, by argmax); that row is
    now ERROR inference_failed, and the batch's other rows are answered as usual."""
    router, ident, worker, replied = _one_batch_with_a_bad_row(harness, NaNBackend())
    got = {body["id"]: (kind, body) for kind, body in replied.values()}
    assert got["bad"][0] == P.ERROR and got["bad"][1]["code"] == P.E_INFERENCE
    assert "non-finite" in got["bad"][1]["message"]
    assert all(got[f"r{i}"][0] == P.REPLY for i in range(1, 4))
    assert worker.stats.as_dict()["errors"] == 1  # counted before the answers left


def _one_batch_with_a_bad_row(harness, backend: RecordingBackend):
    """One batch of 4: request "bad" holds ``backend``'s fail_token, "r1".."r3" do not; (router,
    identity, worker, the 4 replies)."""
    # A deadline no test run reaches: batches form by size alone, however slowly the sends arrive.
    router, ident, worker = harness(backend, batch_size=4, batch_timeout_ms=60_000, capacity=8)
    backend.fail_token = worker.tokenizer.encode_pairs([("boom", "x")]).input_ids[0][1]
    send(router, ident, 0, P.text_request("bad", "boom", "x"))
    for i in range(1, 4):
        send(router, ident, i, P.text_request(f"r{i}", "fine", "x"))
    return router, ident, worker, replies(router, 4)


def test_a_failing_batch_fails_each_of_its_requests_and_only_those(harness):
    backend = RecordingBackend()
    router, ident, worker, got = _one_batch_with_a_bad_row(harness, backend)
    assert {kind for kind, _ in got.values()} == {P.ERROR}
    assert {body["code"] for _, body in got.values()} == {P.E_INFERENCE}
    assert {body["id"] for _, body in got.values()} == {"bad", "r1", "r2", "r3"}
    # The worker survives and serves the next batch.
    for i in range(9, 13):
        send(router, ident, i, P.text_request(f"after{i}", "fine", "again"))
    after = replies(router, 4)
    assert [after[i][0] for i in range(9, 13)] == [P.REPLY] * 4
    assert worker.stats.inferences == 4 and worker.stats.errors == 4


def test_batch_of_one_with_timeout_zero(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=1, batch_timeout_ms=0)
    for i in range(5):
        send(router, ident, i, P.text_request(i, "a", "b"))
    got = replies(router, 5)
    assert all(body["timings"]["batch_size"] == 1 for _, body in got.values())


def test_stop_answers_held_requests_then_says_disconnect(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig(echo_delay_ms=50)),
                                    batch_size=4, batch_timeout_ms=1000)
    for i in range(3):
        send(router, ident, i, P.text_request(i, "a", "b"))
    assert router.poll(WAIT_MS)
    worker.stop()
    kinds = kinds_until_disconnect(router)
    assert kinds.count(P.REPLY) == 3 and kinds[-1] == P.DISCONNECT


def test_run_padded_chunks_when_batch_exceeds_model_batch():
    backend = RecordingBackend()
    ids = np.zeros((6, 128), np.int32)
    mask = np.zeros((6, 128), np.int32)
    mask[:, :5] = 1
    out = run_padded(backend, ids, mask, ids, batch_size=8)
    assert out.shape == (6, 2) and len(backend.batches) == 2


@pytest.mark.parametrize("config, error", [
    (BackendConfig(name="nope"), ConfigError),
    (BackendConfig(name="tf"), ConfigError),                        # no --model
    (BackendConfig(name="tf", model_dir="/nonexistent"), ConfigError),
    # the Neuron package to import is the one the model's manifest names: a non-model is refused first
    (BackendConfig(name="neuron", model_dir="/tmp"), ModelFormatError),
])
def test_backend_errors_are_typed(config, error):
    with pytest.raises(error):
        load_backend(config)


def test_tf_backend_rejects_a_directory_that_is_no_model(tmp_path):
    pytest.importorskip("tensorflow")
    with pytest.raises(ModelFormatError):
        load_backend(BackendConfig(name="tf", model_dir=str(tmp_path)))


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_timeout_ms": -1}, {"capacity": -1},
                                    # past what READY carries, and what compile builds, and "never"
                                    {"capacity": P.INT32_MAX + 1}, {"batch_size": 1025},
                                    {"batch_timeout_ms": 1e308},
                                    # names the broker would refuse in READY
                                    {"name": "n" * (P.MAX_NAME_LEN + 1)}, {"slot": "s" * (P.MAX_NAME_LEN + 1)}])
def test_bad_worker_config(kwargs):
    with pytest.raises(ConfigError):
        WorkerConfig(**kwargs)


def test_worker_config_bounds_themselves_are_accepted():
    config = WorkerConfig(capacity=P.INT32_MAX, batch_size=1024, name="n" * P.MAX_NAME_LEN, slot="s" * P.MAX_NAME_LEN)
    assert config.effective_capacity == P.INT32_MAX


@pytest.mark.parametrize("kwargs, message", [
    ({"echo_delay_ms": 1e308}, "echo_delay_ms must be a number >= 0 and at most 86400000 (a day), got 1e+308"),
    ({"echo_delay_ms": float("inf")}, "echo_delay_ms must be a number >= 0 and at most 86400000 (a day), got inf"),
    ({"threads": 1025}, "threads must be >= 0 and at most 1024, got 1025"),
    ({"threads": -1}, "threads must be >= 0 and at most 1024, got -1"),
])
def test_bad_backend_config(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        BackendConfig(**kwargs)
    assert str(caught.value) == message


def run_worker_cli(tmp_path, *args: str, timeout_s: float = 60.0) -> tuple[int | None, str]:
    """``bertpool-worker args`` against an address no broker binds, in its own session: (its exit code, or
    None if it still ran after ``timeout_s`` and was killed with its session; its output)."""
    log_path = tmp_path / f"worker-{len(list(tmp_path.glob('worker-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bertpool.workers.worker", "--worker-address",
                                 f"ipc://{tmp_path}/nobody", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return wait_or_kill(proc, timeout_s), log_path.read_text(errors="replace")


@pytest.mark.parametrize("args, message", [
    # each was a traceback (msgpack at READY, numpy or time.sleep at warm-up), or ran on and never served
    (["--capacity", "99999999999999999999"], "capacity must be >= 0 and at most 2147483647"),
    (["--batch-size", "99999999999999999999"], "batch_size must be >= 1 and at most 1024"),
    (["--echo-delay-ms", "1e308"], "echo_delay_ms must be a number >= 0 and at most 86400000"),
    (["--batch-timeout-ms", "1e308"], "batch_timeout_ms must be a number >= 0 and at most 60000"),
    (["--name", "x" * 3000], "name must be at most 256 characters"),
    (["--slot", "s" * 300], "slot must be at most 256 characters"),
    (["--model", "{model}", "--threads", "99999"], "threads must be >= 0 and at most 1024"),
])
def test_out_of_range_worker_flags_are_one_line_errors_at_start(tmp_path, args, message):
    """Exit 2 (EXIT_LOAD_FAILED: a supervisor stops the pool instead of restarting the worker) with one
    line saying why, before any model loads or any READY is said."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"never loaded: the flags are refused first")
    code, out = run_worker_cli(tmp_path, *[a.format(model=model) for a in args], timeout_s=30)
    assert code == worker_module.EXIT_LOAD_FAILED, out
    assert message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_tokenizer_failure_fails_only_text_requests(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_timeout_ms=1)
    features = worker.tokenizer.encode_pairs([("a", "b")])

    def broken(pairs):
        raise RuntimeError("simulated tokenizer fault")

    worker.tokenizer.encode_stacked = broken
    send(router, ident, 1, P.text_request("t", "a", "b"))
    send(router, ident, 2, P.features_request("f", features.input_ids[0], features.input_mask[0],
                                              features.segment_ids[0]))
    got = replies(router, 2)
    assert got[1][0] == P.ERROR and got[1][1]["code"] == P.E_BAD_TEXT
    assert got[2][0] == P.REPLY and got[2][1]["id"] == "f"


def _null_socket(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """A real socket whose messages are queued and never read (the worker sends through pyzmq's
    Cython layer, so a stand-in object will not do), and its reader (keep it referenced)."""
    sink = ctx.socket(zmq.PULL)
    sink.bind("inproc://null-sink")
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)
    out.connect("inproc://null-sink")
    return out, sink


def test_counters_updated_from_both_threads_stay_exact_and_consistent():
    """The I/O thread counts errors and snapshots the counters (what STATS sends) while the
    compute thread counts batches: no update is lost, and no snapshot shows half of a
    batch's update. A tracer hands over to the I/O side between every two lines of
    _run_batch, the worst interleaving a thread switch could produce."""
    worker = Worker(WorkerConfig(batch_size=4), backend=RecordingBackend())
    worker.load()
    features = worker.tokenizer.encode_pairs([("a", "b")])
    item = (0.0, _Pending(b"t" * 8, "r", np.stack((features.input_ids[0], features.input_mask[0],
                                                   features.segment_ids[0])), 0.0))
    rounds, wait_s = 50, WAIT_MS / 1000
    at_line, resume, finished = threading.Semaphore(0), threading.Semaphore(0), threading.Event()
    torn: list[dict] = []
    io_errors = [0]
    null_ctx = zmq.Context()
    null, _sink = _null_socket(null_ctx)

    def pause_at_each_line(frame, event, arg):
        if frame.f_code not in (Worker._run_batch.__code__, Worker._compute.__code__):
            return None
        if event == "line":
            at_line.release()
            resume.acquire(timeout=wait_s)
        return pause_at_each_line

    def compute() -> None:
        sys.settrace(pause_at_each_line)
        try:
            for _ in range(rounds):
                worker._run_batch([item] * 3)  # 3 real rows + 1 dummy
        finally:
            sys.settrace(None)
            finished.set()
            at_line.release()

    def io() -> None:
        while at_line.acquire(timeout=wait_s) and not finished.is_set():
            worker._reply_error(null, b"t" * 8, "r", P.E_BAD_TEXT, "bad")
            io_errors[0] += 1
            snap = worker.stats.as_dict()
            if snap["inferences"] != 3 * snap["batches"] or snap["padded_rows"] != snap["batches"]:
                torn.append(snap)
            resume.release()

    threads = [threading.Thread(target=compute), threading.Thread(target=io)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    null_ctx.destroy(linger=0)
    assert not any(t.is_alive() for t in threads)
    assert not torn, torn[:3]
    assert io_errors[0] >= rounds  # the I/O side really ran between the lines
    assert worker.stats.as_dict() == {"inferences": 3 * rounds, "batches": rounds, "padded_rows": rounds,
                                      "errors": io_errors[0], "expired": 0, "stale_dropped": 0,
                                      "reconnects": 0, "dropped_malformed": 0}


# ------------------------------------------------------------ reliability

def collect(router, until, beat_to: bytes | None = None, timeout_s: float = WAIT_MS / 1000):
    """Messages (identity, kind, rest) until ``until(messages)`` holds; beats ``beat_to`` every
    50 ms meanwhile, as a broker would. Bounded in time."""
    got, deadline, next_beat = [], time.monotonic() + timeout_s, 0.0
    while not until(got):
        assert time.monotonic() < deadline, f"condition never held; got {[m[1] for m in got]}"
        if beat_to is not None and time.monotonic() >= next_beat:
            router.send_multipart([beat_to, *P.heartbeat_frames()])
            next_beat = time.monotonic() + 0.05
        if router.poll(50):
            got += expand(router.recv_multipart())
    return got


def kinds(messages, kind) -> list:
    return [m for m in messages if m[1] == kind]


def test_worker_beats_from_its_io_thread_while_a_long_batch_runs(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig(echo_delay_ms=1500)), batch_size=1,
                                    batch_timeout_ms=0, heartbeat_interval_s=0.1, heartbeat_liveness=5)
    send(router, ident, 1, P.text_request(1, "slow", "model"))
    got = collect(router, lambda m: kinds(m, P.REPLY), beat_to=ident)
    assert len(kinds(got, P.HEARTBEAT)) >= 5  # 1.5 s of compute, a beat every 0.1 s
    assert not kinds(got, P.READY) and worker.stats.reconnects == 0


def test_worker_reregisters_when_the_broker_falls_silent_or_says_disconnect(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), heartbeat_interval_s=0.1,
                                    heartbeat_liveness=3)
    first = worker.incarnation
    got = collect(router, lambda m: kinds(m, P.READY))  # we never beat: it gives up on us
    identity, _, (body,) = kinds(got, P.READY)[0]
    second = P.parse_ready(P.unpack(body)).incarnation
    assert second not in (None, first) and identity != ident  # a new socket, a new registration
    router.send_multipart([identity, *P.broker_disconnect_frames(P.DISCONNECT_UNKNOWN)])
    got = collect(router, lambda m: kinds(m, P.READY), beat_to=identity)
    third_identity, _, (body,) = kinds(got, P.READY)[0]
    assert P.parse_ready(P.unpack(body)).incarnation not in (first, second)
    assert worker.stats.reconnects >= 2
    send(router, third_identity, 7, P.text_request(7, "still", "serving"))
    got = collect(router, lambda m: kinds(m, P.REPLY), beat_to=third_identity)
    assert int.from_bytes(kinds(got, P.REPLY)[0][2][0], "big") == 7


def test_what_a_worker_held_before_re_registering_is_dropped_not_answered(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig(echo_delay_ms=400)), batch_size=1,
                                    batch_timeout_ms=0, capacity=4)
    send(router, ident, 1, P.text_request(1, "computing", "now"))
    send(router, ident, 2, P.text_request(2, "waiting", "in the batcher"))
    router.send_multipart([ident, *P.broker_disconnect_frames(P.DISCONNECT_UNKNOWN)])
    got = collect(router, lambda m: worker.stats.stale_dropped >= 2 and kinds(m, P.READY), beat_to=ident)
    assert not kinds(got, P.REPLY) and not kinds(got, P.ERROR)


def test_worker_skips_requests_whose_deadline_passed_in_its_batcher(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=300)
    send(router, ident, 1, P.text_request(1, "too", "late"), deadline_s=0.02)
    send(router, ident, 2, P.text_request(2, "no", "deadline"))
    got = replies(router, 2)
    assert got[1][0] == P.ERROR and got[1][1]["code"] == P.E_DEADLINE
    assert got[2][0] == P.REPLY
    assert worker.stats.expired == 1 and worker.stats.inferences == 1


def test_malformed_broker_messages_are_counted_and_dropped(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_timeout_ms=0)
    for frames in ([b"junk"], [P.VERSION, P.REQUEST, b"short", b"x", b"q", b""],
                   [P.VERSION, P.REQUEST, b"t" * 8, b"x", b"q" * 8, b"bad"], [P.VERSION, b"\x99", b""],
                   [b"BP1", P.HEARTBEAT, P.heartbeat_body()]):
        router.send_multipart([ident, *frames])
    send(router, ident, 3, P.text_request(3, "fine", "request"))
    assert replies(router, 1)[3][0] == P.REPLY
    assert worker.stats.dropped_malformed == 5


@pytest.mark.parametrize("kwargs", [{"heartbeat_interval_s": 0}, {"heartbeat_liveness": 0},
                                    {"max_message_bytes": 1000},
                                    # an inline batch that long would silence the heartbeats past liveness
                                    {"inline_batch_ms": 250.0}, {"inline_batch_ms": 5000.0},
                                    {"inline_batch_ms": 3.0, "heartbeat_interval_s": 0.01},
                                    {"inline_batch_ms": float("nan")}, {"inline_batch_ms": -1}])
def test_bad_worker_reliability_config(kwargs):
    with pytest.raises(ConfigError):
        WorkerConfig(**kwargs)


# ------------------------------------------------------------ inline mode (no handoff)

class SwitchableBackend(EchoBackend):
    """Echo, but each batch sleeps ``delay_s`` (0 at first, so warm-up finds it fast)."""

    def __init__(self):
        super().__init__(BackendConfig())
        self.delay_s = 0.0

    def predict(self, input_ids, input_mask, segment_ids):
        time.sleep(self.delay_s)
        return super().predict(input_ids, input_mask, segment_ids)


@pytest.mark.parametrize("delay_ms, inline_batch_ms, inline", [(0, 1.0, True), (20, 1.0, False), (0, 0, False)])
def test_inline_mode_only_for_batches_under_the_limit(delay_ms, inline_batch_ms, inline):
    worker = Worker(WorkerConfig(inline_batch_ms=inline_batch_ms),
                    backend=EchoBackend(BackendConfig(echo_delay_ms=delay_ms)))
    worker.load()
    assert worker.inline is inline


def test_inline_worker_flushes_at_size_and_at_the_deadline(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=150)
    assert worker.inline and worker._compute_thread is None
    sent = time.monotonic()
    for i in range(5):
        send(router, ident, i, P.text_request(i, f"text {i}", "other"))
    got = replies(router, 5)
    assert sorted(b["timings"]["batch_size"] for _, b in got.values()) == [1, 4, 4, 4, 4]
    assert time.monotonic() - sent >= 0.15  # the fifth waited for its deadline: nothing else came
    assert worker.stats.batches == 2 and worker.stats.padded_rows == 3


def test_inline_stop_answers_held_requests_then_says_disconnect(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=60_000)
    assert worker.inline
    for i in range(3):
        send(router, ident, i, P.text_request(i, "a", "b"))
    deadline = time.monotonic() + WAIT_MS / 1000
    while len(worker._batcher) < 3:  # held, waiting for a fourth
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.stop()
    kinds = kinds_until_disconnect(router)
    assert kinds.count(P.REPLY) == 3 and kinds[-1] == P.DISCONNECT


def test_a_slow_batch_moves_batching_to_a_compute_thread(harness):
    backend = SwitchableBackend()
    router, ident, worker = harness(backend, batch_size=1, batch_timeout_ms=0)
    assert worker.inline
    backend.delay_s = 0.02  # now slower than inline_batch_ms, batch after batch
    for i in range(40):  # SLOW_RUN slow batches in a row move it
        send(router, ident, i, P.text_request(i, "now", "slow"))
        assert replies(router, 1)[i][0] == P.REPLY
        if not worker.inline:
            break
    deadline = time.monotonic() + WAIT_MS / 1000
    while worker.inline:  # it switches right after sending a reply
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert worker._compute_thread.is_alive()
    send(router, ident, 99, P.text_request(99, "still", "served"))
    assert replies(router, 1)[99][0] == P.REPLY


def test_an_inline_batch_past_the_liveness_window_keeps_the_worker_registered(tmp_path):
    """A model that turns slow after warm-up: its first slow batch still runs inline, holding the
    I/O thread past the broker's liveness window (3 x 0.1 s). Beats from the worker's other socket
    keep it registered: the broker neither presumes it dead nor re-queues the batch, and the worker
    never re-registers (it did both, and computed the batch twice)."""
    from bertpool.broker.broker import Broker, BrokerConfig
    from bertpool.clients.client import Client

    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b",
                                 heartbeat_interval_s=0.1, heartbeat_liveness=3))
    broker.bind()
    threading.Thread(target=broker.run, daemon=True).start()
    backend = SwitchableBackend()
    worker = Worker(WorkerConfig(broker_address=broker.config.backend, batch_size=1, batch_timeout_ms=0,
                                 heartbeat_interval_s=0.1, heartbeat_liveness=3), backend=backend)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with Client(broker.config.frontend, timeout_s=30) as client:
            assert client.predict("warm", "up").label in (0, 1)  # registered, and batching inline
            assert worker.inline
            backend.delay_s = 0.8  # now far past liveness x interval, in one inline batch
            assert client.predict("now", "slow").label in (0, 1)
            stats = client.stats()
        assert stats["broker"]["workers_lost"] == 0 and stats["broker"]["redispatched"] == 0, stats["broker"]
        assert worker.stats.as_dict()["reconnects"] == 0 and worker.stats.as_dict()["inferences"] == 2
    finally:
        worker.stop()
        thread.join(10)
        broker.stop()


def test_slow_batches_that_only_waited_for_a_cpu_stay_inline(harness, monkeypatch):
    """Time a batch spent runnable but preempted is not its own: a run of such batches keeps
    batching inline (the clock below says the thread waited for a CPU the whole time)."""
    class AlwaysWaiting:
        def __call__(self):
            return time.monotonic()

        def close(self):
            pass

    monkeypatch.setattr(worker_module, "CpuWaitClock", AlwaysWaiting)
    backend = SwitchableBackend()
    router, ident, worker = harness(backend, batch_size=1, batch_timeout_ms=0)
    backend.delay_s = 0.01  # ten times inline_batch_ms, but "preempted"
    for i in range(3 * worker_module.SLOW_RUN):
        send(router, ident, i, P.text_request(i, "busy", "host"))
        assert replies(router, 1)[i][0] == P.REPLY
    assert worker.inline and worker._compute_thread is None


def test_a_quick_inline_batch_reads_the_cpu_wait_clock_once(harness, monkeypatch):
    """The clock is read before each batch, and after it only when the batch took the limit or longer
    (a quicker one is quick however long it waited for a CPU): one pread less per lone request. The
    limit here (200 ms) is far above what an echo batch takes, even on a busy host."""
    reads = []

    class CountingClock:
        def __call__(self):
            reads.append(time.monotonic())
            return 0.0

        def close(self):
            pass

    monkeypatch.setattr(worker_module, "CpuWaitClock", CountingClock)
    router, ident, worker = harness(SwitchableBackend(), batch_size=1, batch_timeout_ms=0, inline_batch_ms=200,
                                    heartbeat_interval_s=1.0)
    assert worker.inline
    for i in range(5):
        send(router, ident, i, P.text_request(i, "quick", "batch"))
        assert replies(router, 1)[i][0] == P.REPLY
    assert len(reads) == 5 and worker.stats.as_dict()["batches"] == 5


def test_cpu_wait_clock_reads_this_threads_run_delay():
    clock = worker_module.CpuWaitClock()
    readings = [clock() for _ in range(3)]
    assert all(r >= 0.0 for r in readings) and readings == sorted(readings)
    clock.close()
    assert clock() == 0.0


def test_one_batch_as_long_as_a_quarter_beat_moves_batching_at_once(harness):
    backend = SwitchableBackend()
    router, ident, worker = harness(backend, batch_size=1, batch_timeout_ms=0, heartbeat_interval_s=0.2,
                                    heartbeat_liveness=50)
    assert worker.inline
    backend.delay_s = 0.06  # > 0.2 s / 4
    send(router, ident, 1, P.text_request(1, "one", "long batch"))
    assert replies(router, 1)[1][0] == P.REPLY
    deadline = time.monotonic() + WAIT_MS / 1000
    while worker.inline:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("delay_ms", [0, 2])  # inline, and with a compute thread
def test_batched_receive_never_starves_heartbeats(harness, delay_ms):
    """A flood of requests, always more waiting than one drain takes: the worker still beats every
    interval and still hears the broker's beats (it never re-registers)."""
    router, ident, worker = harness(EchoBackend(BackendConfig(echo_delay_ms=delay_ms)), batch_size=4,
                                    batch_timeout_ms=0, heartbeat_interval_s=0.1, heartbeat_liveness=3)
    body = P.text_request("f", "flood", "of requests")
    beats, answered, token, next_beat = 0, 0, 0, 0.0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        if token - answered < 600:  # a bounded backlog, so stop() finishes it quickly
            for _ in range(300):  # more than one bounded drain (256) per round
                send(router, ident, token, body)
                token += 1
        if time.monotonic() >= next_beat:
            router.send_multipart([ident, *P.heartbeat_frames()])
            next_beat = time.monotonic() + 0.05
        while router.poll(0):
            got = next_kinds(router)
            beats += got.count(P.HEARTBEAT)
            answered += got.count(P.REPLY)
    assert beats >= 8  # 1.5 s at one beat per 0.1 s, with slack for a loaded machine
    assert answered > 0 and worker.stats.reconnects == 0


@pytest.mark.parametrize("field, value, ok", [("input_mask", 2, False), ("input_mask", -1, False),
                                              ("segment_ids", 2, False), ("segment_ids", -1, False),
                                              ("input_ids", 10**6, False), ("input_ids", -5, False),
                                              ("segment_ids", 1, True)])
def test_feature_values_the_model_cannot_take_are_refused_alone(harness, field, value, ok):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=0)
    f = worker.tokenizer.encode_pairs([("a", "b")])
    arrays = {"input_ids": f.input_ids[0].copy(), "input_mask": f.input_mask[0].copy(),
              "segment_ids": f.segment_ids[0].copy()}
    arrays[field][1] = value
    send(router, ident, 1, P.features_request(1, **arrays))
    kind, body = replies(router, 1)[1]
    assert (kind, body.get("code")) == ((P.REPLY, None) if ok else (P.ERROR, P.E_BAD_FIELD))


# ------------------------------------------------------------ what the broker would refuse

class LabelledBackend(EchoBackend):
    """Echo, saying ``info`` as its model labels in READY (a compiled model's come from its manifest)."""

    def __init__(self, info: dict[str, str]):
        super().__init__(BackendConfig())
        self.info = info

    def model_info(self) -> dict[str, str]:
        return self.info


@pytest.mark.parametrize("label", ["hash", "dtype", "target"])
def test_a_ready_the_broker_would_refuse_fails_the_load_instead_of_re_registering_forever(label):
    """A manifest label longer than READY allows (source.sha256 of 400 characters) made the broker drop
    every READY, unheard, and the worker re-register forever: now load() says why (exit 2)."""
    info = {"hash": "h" * P.MAX_LABEL_LEN, "dtype": "float32", "target": "cpu"}
    assert Worker(WorkerConfig(), backend=LabelledBackend(info)).load() is None  # at the bound: fine
    worker = Worker(WorkerConfig(), backend=LabelledBackend({**info, label: "x" * (P.MAX_LABEL_LEN + 1)}))
    with pytest.raises(ModelFormatError, match=f"the broker would refuse this worker's READY, so it could never "
                                               f"register: {label}: must be a str of at most {P.MAX_LABEL_LEN}"):
        worker.load()


# ------------------------------------------------------------ vocabulary against the model

class SizedBackend(EchoBackend):
    """Echo, posing as a model whose word embeddings have ``rows`` rows."""

    def __init__(self, rows: int):
        super().__init__(BackendConfig())
        self.vocab_size = rows


def test_a_vocab_of_another_size_than_the_models_embeddings_fails_the_load(tmp_path):
    """As bertpool-compile refuses it: a 4-token --vocab for a 2048-row model loaded and answered every word
    as [UNK] (a 30522-token one failed batches)."""
    vocab = tmp_path / "v_min.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    worker = Worker(WorkerConfig(vocab_path=str(vocab)), backend=SizedBackend(2048))
    with pytest.raises(ModelFormatError) as caught:
        worker.load()
    assert str(caught.value) == (f"vocabulary {vocab} has 4 tokens but bert/embeddings/word_embeddings has 2048 "
                                 f"rows; give --vocab the model's own vocab.txt, or drop --vocab")


def test_feature_ids_are_checked_against_the_models_embedding_rows(harness):
    from bertpool.common.tokenizer import BertTokenizer
    from bertpool.workers.backends import fallback_vocab_path

    rows = BertTokenizer(fallback_vocab_path()).vocab_size  # a vocabulary of the model's size passes the load
    router, ident, worker = harness(SizedBackend(rows), batch_size=4, batch_timeout_ms=0)
    f = worker.tokenizer.encode_pairs([("a", "b")])
    for token, top in ((1, rows - 1), (2, rows)):
        ids = f.input_ids[0].copy()
        ids[1] = top
        send(router, ident, token, P.features_request(token, ids, f.input_mask[0], f.segment_ids[0]))
        kind, body = replies(router, 1)[token]
        if top < rows:
            assert kind == P.REPLY
        else:
            assert (kind, body["code"]) == (P.ERROR, P.E_BAD_FIELD)
            assert body["message"] == f"input_ids: token id outside the model's vocabulary [0, {rows})"


# ------------------------------------------------------------ ambiguous or empty requests

def test_a_request_with_both_text_and_features_is_refused_not_answered_from_the_text(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=0)
    f = worker.tokenizer.encode_pairs([("a", "b")])
    body = P.unpack(P.features_request("both", f.input_ids[0], f.input_mask[0], f.segment_ids[0]))
    body.update(text_a="other", text_b="text")
    send(router, ident, 1, P.pack(body))
    send(router, ident, 2, P.text_request("text", "other", "text"))  # the same text alone is served
    got = replies(router, 2)
    kind, reply = got[1]
    assert (kind, reply["id"], reply["code"]) == (P.ERROR, "both", P.E_BAD_FIELD)
    assert "both text (text_a, text_b) and features" in reply["message"]
    assert got[2][0] == P.REPLY and worker.stats.errors == 1


def test_features_with_no_real_token_are_refused(harness):
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_size=4, batch_timeout_ms=0)
    f = worker.tokenizer.encode_pairs([("a", "b")])
    send(router, ident, 1, P.features_request("empty", f.input_ids[0], np.zeros_like(f.input_mask[0]),
                                              f.segment_ids[0]))
    kind, body = replies(router, 1)[1]
    assert (kind, body["code"]) == (P.ERROR, P.E_BAD_FIELD) and "no real token" in body["message"]


# ------------------------------------------------------------ DISCONNECT: its reason, and no hot loop

def test_re_registrations_answered_disconnect_again_back_off_doubling_up_to_the_liveness_window():
    """The wait before each re-registration (the broker said DISCONNECT): none at first; after one the
    broker refused again, REREGISTER_FIRST_BACKOFF of an interval, doubling, at most interval x liveness;
    none again once the broker sent anything else (it took our READY)."""
    worker = Worker(WorkerConfig(heartbeat_interval_s=0.25, heartbeat_liveness=8), backend=EchoBackend(BackendConfig()))
    waits: list[float] = []
    worker._reconnect = lambda why, level, delay_s: waits.append(delay_s)
    for _ in range(10):
        worker._on_disconnect(P.DISCONNECT_SHUTDOWN)
    first = 0.25 * worker_module.REREGISTER_FIRST_BACKOFF
    assert waits == pytest.approx([0.0] + [min(first * 2 ** i, 2.0) for i in range(9)])
    assert waits[-2:] == [2.0, 2.0]
    assert worker._on_messages(None, [P.heartbeat_frames()]) is None  # a beat: the registration stands
    worker._on_disconnect(P.DISCONNECT_UNKNOWN)
    assert waits[-1] == 0.0


def test_a_broker_saying_disconnect_to_every_ready_gets_a_few_not_a_flood(harness, caplog):
    """A draining broker answers every READY with DISCONNECT(shutting_down). The worker re-registered at
    once each time (~1,500 READYs and WARNINGs a second, for the whole drain); now it backs off, logs the
    reason (INFO: shutting down is expected), and once registered re-registers at once again."""
    caplog.set_level(logging.INFO, logger="bertpool.worker")
    # Backoff from 0.025 s doubling up to 2 s; the broker is presumed silent after 2 s.
    router, ident, worker = harness(EchoBackend(BackendConfig()), batch_timeout_ms=0, heartbeat_interval_s=0.25,
                                    heartbeat_liveness=8)

    def next_ready(timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if router.poll(50):
                frames = router.recv_multipart()
                if frames[2] == P.READY:
                    return frames[0]
        raise AssertionError(f"no READY within {timeout_s} s")

    identity, readies, refuse_until = ident, 0, time.monotonic() + 2.0
    while True:  # refuse every READY for 2 s (backoffs 0, .025, .05, ..., 1.6 s: 7 READYs), take the next
        router.send_multipart([identity, *P.broker_disconnect_frames(P.DISCONNECT_SHUTDOWN)])
        identity = next_ready(10)
        readies += 1
        if time.monotonic() >= refuse_until:
            break
        assert readies < 20, "re-registering in a loop"
    assert readies >= 3
    send(router, identity, 7, P.text_request(7, "registered", "again"))
    got = collect(router, lambda m: kinds(m, P.REPLY), beat_to=identity)
    assert int.from_bytes(kinds(got, P.REPLY)[0][2][0], "big") == 7
    # Registered: a DISCONNECT now (the broker restarted) is re-registered at once, not after 2 s.
    said = time.monotonic()
    router.send_multipart([identity, *P.broker_disconnect_frames(P.DISCONNECT_UNKNOWN)])
    next_ready(10)
    assert time.monotonic() - said < 1.0
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "DISCONNECT" in r.getMessage()]
    assert [m for m in said if "(shutting_down)" in m[1]] and all(
        level == logging.INFO for level, m in said if "(shutting_down)" in m)
    assert [level for level, m in said if "(unknown_worker)" in m] == [logging.WARNING]
    assert len(said) == readies + 1


def test_an_untyped_load_failure_is_final_with_its_type_and_a_traceback(tmp_path, monkeypatch, capsys, caplog):
    """A backend's own exception while loading (a native runtime's, not one of ours) ends the worker
    as a load failure (exit 2, never restarted), its reason in the supervisor's error file with its
    type, and its traceback in the log, since it may be a bug."""
    from bertpool.workers import worker as worker_module

    def broken_load(self):
        raise RuntimeError("the runtime cannot open its device")

    monkeypatch.setattr(worker_module.Worker, "load", broken_load)
    for name in ("ignore_hangup", "setup_logging"):  # main() runs in the test's process: keep its set-up
        monkeypatch.setattr(worker_module, name, lambda: None)
    error = tmp_path / "w.error"
    code = worker_module.main(["--backend", "echo", "--worker-address", f"ipc://{tmp_path}/back.ipc",
                               "--load-error-file", str(error)])
    assert code == worker_module.EXIT_LOAD_FAILED
    assert error.read_text() == "RuntimeError: the runtime cannot open its device\n"
    assert "bertpool-worker: error: RuntimeError: the runtime cannot open its device" in capsys.readouterr().err
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


@pytest.mark.parametrize("given, expected", [(None, "false"), ("true", "true")])
def test_main_turns_off_the_tokenizers_thread_pool_before_the_tokenizer_is_built(tmp_path, monkeypatch, given,
                                                                                 expected):
    """bertpool-worker started by hand (not by a supervisor, which sets it in its workers' environment)
    ran HF tokenizers' thread pool, which only adds latency to a worker's small batches. main() sets
    TOKENIZERS_PARALLELISM=false before the tokenizer is built, keeping a value the user chose. Seen at
    the moment the worker builds its tokenizer: no timing involved."""
    from bertpool.common.tokenizer import PARALLELISM_ENV

    monkeypatch.setenv(PARALLELISM_ENV, "restored after the test")  # so delenv below is undone too
    if given is None:
        monkeypatch.delenv(PARALLELISM_ENV)
    else:
        monkeypatch.setenv(PARALLELISM_ENV, given)
    seen = []

    def spy_tokenizer(*args, **kwargs):
        seen.append(os.environ.get(PARALLELISM_ENV))
        raise ConfigError("stopped by the test once the tokenizer was asked for")

    monkeypatch.setattr(worker_module, "BertTokenizer", spy_tokenizer)
    for name in ("ignore_hangup", "setup_logging"):  # main() runs in the test's process: keep its set-up
        monkeypatch.setattr(worker_module, name, lambda: None)
    code = worker_module.main(["--backend", "echo", "--worker-address", f"ipc://{tmp_path}/back.ipc"])
    assert code == worker_module.EXIT_LOAD_FAILED and seen == [expected]
