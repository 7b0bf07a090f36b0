"""End to end: bertpool-serve (broker + supervised workers) with the echo backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from bertpool.clients.bench import wait_for_workers
from bertpool.clients.client import Client
from bertpool.common import protocol as P
from bertpool.common.tokenizer import BertTokenizer
from bertpool.workers.backends import echo_probabilities, fallback_vocab_path
from conftest import alive, children_of, free_tcp_port, run_threads, wait_gone, wait_or_kill


def expected_echo(tokenizer: BertTokenizer, a: str, b: str) -> np.ndarray:
    f = tokenizer.encode_pairs([(a, b)])
    return echo_probabilities(f.input_ids, f.input_mask)[0]


def assert_echo_answers(results, pairs) -> None:
    """Each result is the echo backend's answer to the pair at the same index (and the pairs' answers differ)."""
    tokenizer = BertTokenizer(fallback_vocab_path())
    wants = [expected_echo(tokenizer, a, b) for a, b in pairs]
    assert len({tuple(np.round(w, 6)) for w in wants}) == len(wants)  # distinct: a swap would show
    for result, want, pair in zip(results, wants, pairs, strict=True):
        assert np.allclose(result.probabilities, want), (pair, result.probabilities, want)
        assert result.label == int(np.argmax(want)), pair


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_48_clients_every_reply_matches_its_request(start_pool, transport):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "2", parallel=4, transport=transport)
    tokenizer = BertTokenizer(fallback_vocab_path())
    n_clients, cycle = 48, 32
    mismatches: list[str] = []
    failures: list[BaseException] = []

    def one_client(c: int) -> None:
        try:
            with Client(pool.address, timeout_s=60) as client:
                for i in range(cycle):
                    a, b = f"client {c} request {i}", f"pair text {i * 7 + c}"
                    result = client.predict(a, b)
                    want = expected_echo(tokenizer, a, b)
                    if not np.allclose(result.probabilities, want) or result.label != int(np.argmax(want)):
                        mismatches.append(f"{c}/{i}: got {result.probabilities}, want {want}")
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    run_threads(one_client, n_clients, 120)
    assert not failures, failures[:3]
    assert not mismatches, mismatches[:3]
    total = n_clients * cycle
    # Workers report counters every second: wait until all have reported the last batch.
    stats = pool.wait_stats(lambda s: s["totals"]["inferences"] >= total)
    assert stats["totals"]["inferences"] == total  # real inferences only: no warm-up, no dummy rows
    assert stats["broker"]["replies"] == total
    assert stats["broker"]["errors"] == 0
    assert len(stats["workers"]) == 4
    # Each worker's settings, as its READY said them (a bench titles its report with them).
    assert {(w["batch_size"], w["batch_timeout_ms"]) for w in stats["workers"].values()} == {(4, 2.0)}
    assert pool.stop() == 0


def test_the_readmes_client_example_runs_as_written(start_pool, capsys):
    """The README's Client snippet, run verbatim against a pool (only its address changed)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Client library"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    assert '"tcp://127.0.0.1:5555"' in code
    pool = start_pool("--backend", "echo", parallel=1)
    exec(compile(code.replace('"tcp://127.0.0.1:5555"', repr(pool.address)), "README.md", "exec"), {})
    assert "failed:" not in capsys.readouterr().out


def test_batches_fill_under_load_and_pad_only_the_rest(start_pool):
    # All 42 are sent at once; a 1 s deadline (not 50 ms) lets full batches form on a loaded machine,
    # and the last 2 rows wait it out and run padded.
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "20", "--batch-timeout-ms", "1000", parallel=1)
    pairs = [(f"a {i}", f"b {i}") for i in range(42)]
    with Client(pool.address, timeout_s=30) as client:
        results = client.predict_many(pairs, max_in_flight=42)
    assert max(r.timings["batch_size"] for r in results) == 4
    assert_echo_answers(results, pairs)
    stats = pool.wait_stats(lambda s: s["totals"]["inferences"] >= 42)
    totals = stats["totals"]
    assert totals["inferences"] == 42 and totals["padded_rows"] >= 2
    # Every batch is padded to 4 rows: padded rows make up the difference exactly.
    assert totals["batches"] * 4 == totals["inferences"] + totals["padded_rows"]


def test_single_request_latency_is_timeout_plus_compute(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "30", parallel=1)
    with Client(pool.address, timeout_s=30) as client:
        result = client.predict("just one", "request")
    # Alone, it waits out the batch deadline, then runs as a batch of one.
    assert result.timings["batch_size"] == 1
    assert result.timings["batch_wait_ms"] >= 29.0
    assert set(result.timings) >= {"queue_ms", "batch_wait_ms", "compute_ms"}


BAD_MESSAGES = {
    "not_msgpack": ([P.VERSION, P.REQUEST, b"\xc1\xc1 not msgpack"], P.E_BAD_ENCODING),
    "not_a_map": ([P.VERSION, P.REQUEST, P.msgpack.packb([1, 2])], P.E_BAD_ENCODING),
    "missing_id": ([P.VERSION, P.REQUEST, P.pack({"text_a": "a", "text_b": "b"})], P.E_BAD_FIELD),
    "missing_text_b": ([P.VERSION, P.REQUEST, P.pack({"id": 1, "text_a": "a"})], P.E_BAD_FIELD),
    "text_wrong_type": ([P.VERSION, P.REQUEST, P.pack({"id": 1, "text_a": 5, "text_b": "b"})], P.E_BAD_FIELD),
    "id_wrong_type": ([P.VERSION, P.REQUEST, P.pack({"id": [1], "text_a": "a", "text_b": "b"})], P.E_BAD_FIELD),
    "empty_text": ([P.VERSION, P.REQUEST, P.pack({"id": 1, "text_a": "  ", "text_b": "b"})], P.E_BAD_TEXT),
    "non_utf8": ([P.VERSION, P.REQUEST, P.pack({"id": 1, "text_a": b"\xff\xfe", "text_b": "b"})], P.E_BAD_TEXT),
    "oversized_text": ([P.VERSION, P.REQUEST, P.pack({"id": 1, "text_a": "x " * P.MAX_TEXT_CHARS,
                                                      "text_b": "b"})], P.E_BAD_TEXT),
    "unknown_version": ([b"BP9", P.REQUEST, P.text_request(1, "a", "b")], P.E_BAD_VERSION),
    "unknown_kind": ([P.VERSION, b"\x7f", P.text_request(1, "a", "b")], P.E_BAD_KIND),
    "too_few_frames": ([P.VERSION], P.E_BAD_FRAMES),
    "too_many_frames": ([P.VERSION, P.REQUEST, P.text_request(1, "a", "b"), b"extra"], P.E_BAD_FRAMES),
    "bad_feature_shape": ([P.VERSION, P.REQUEST, P.pack({
        "id": 1, "input_ids": P.encode_array(np.zeros(5, np.int32)),
        "input_mask": P.encode_array(np.zeros(5, np.int32)),
        "segment_ids": P.encode_array(np.zeros(5, np.int32))})], P.E_BAD_FIELD),
    "feature_id_out_of_vocab": ([P.VERSION, P.REQUEST, P.features_request(
        1, np.full(128, 10**6), np.ones(128), np.zeros(128))], P.E_BAD_FIELD),
    "mask_not_binary": ([P.VERSION, P.REQUEST, P.features_request(
        1, np.ones(128), np.full(128, 2), np.zeros(128))], P.E_BAD_FIELD),
    "segment_out_of_range": ([P.VERSION, P.REQUEST, P.features_request(
        1, np.ones(128), np.ones(128), np.full(128, 7))], P.E_BAD_FIELD),
    "array_bytes_mismatch": ([P.VERSION, P.REQUEST, P.pack({
        "id": 1, "input_ids": {"__nd__": True, "dtype": "i4", "shape": [128], "data": b"123"},
        "input_mask": P.encode_array(np.zeros(128, np.int32)),
        "segment_ids": P.encode_array(np.zeros(128, np.int32))})], P.E_BAD_FIELD),
}


def test_bad_wire_input_gets_error_and_pool_keeps_serving(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.address)
    try:
        for name, (frames, code) in BAD_MESSAGES.items():
            sock.send_multipart(frames)
            assert sock.poll(10_000), f"{name}: no reply"
            reply = sock.recv_multipart()
            assert reply[:2] == [P.VERSION, P.ERROR], name
            body = P.unpack(reply[2])
            assert body["code"] == code, (name, body)
            assert body["message"], name
        # The pool still answers good requests from the same socket and from a client.
        sock.send_multipart([P.VERSION, P.REQUEST, P.text_request("ok", "fine", "text")])
        assert sock.poll(10_000)
        reply = sock.recv_multipart()
        assert reply[1] == P.REPLY and P.unpack(reply[2])["id"] == "ok"
    finally:
        sock.close()
    with Client(pool.address, timeout_s=10) as client:
        result = client.predict("still", "serving")
    want = expected_echo(BertTokenizer(fallback_vocab_path()), "still", "serving")
    assert np.allclose(result.probabilities, want) and result.label == int(np.argmax(want))
    assert pool.stats()["broker"]["replies"] >= 2


def test_features_request_served(start_pool):
    pool = start_pool("--backend", "echo", parallel=1)
    tokenizer = BertTokenizer(fallback_vocab_path())
    f = tokenizer.encode_pairs([("pre tokenized", "features")])
    with Client(pool.address, timeout_s=10) as client:
        result = client.submit_features(f.input_ids[0], f.input_mask[0], f.segment_ids[0]).result()
    assert np.allclose(result.probabilities, echo_probabilities(f.input_ids, f.input_mask)[0])


def test_dead_worker_is_restarted_and_its_requests_are_answered(start_pool):
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "1500", "--batch-timeout-ms", "1", parallel=1)
    (pid,) = _worker_pids(pool)
    pairs = [("held by", f"the worker {i}") for i in range(4)]
    with Client(pool.address, timeout_s=60) as client:
        futures = [client.submit(a, b) for a, b in pairs]
        pool.wait_stats(lambda s: sum(w["inflight"] for w in s["workers"].values()) == 4)
        os.kill(pid, signal.SIGKILL)  # dies holding all four
        results = [f.result() for f in futures]
    assert len({r.id for r in results}) == 4
    # Each re-queued request is answered with its own pair's echo, not another's.
    assert_echo_answers(results, pairs)
    stats = pool.wait_stats(lambda s: s["broker"]["replies"] == 4)
    assert stats["broker"]["requeued"] == 4 and stats["broker"]["errors"] == 0
    assert _stats_pids(stats) != {pid}  # a new process took its place


def test_pool_totals_keep_what_a_dead_worker_served(start_pool):
    """STATS totals count every worker process heard from: a worker killed after serving must not
    take its inferences out of them (they went backwards, and serve's batch-fill line with them)."""
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    with Client(pool.address, timeout_s=30) as client:
        client.predict_many([("served", f"before {i}") for i in range(40)])
    before = pool.wait_stats(lambda s: s["totals"]["inferences"] == 40)["totals"]
    victim = max(pool.stats()["workers"].values(), key=lambda w: w["inferences"])  # it served some
    assert victim["inferences"] > 0
    os.kill(victim["pid"], signal.SIGKILL)
    stats = pool.wait_stats(lambda s: len(s["workers"]) == 2 and victim["pid"] not in _stats_pids(s))
    assert stats["totals"] == before
    with Client(pool.address, timeout_s=30) as client:
        client.predict_many([("served", f"after {i}") for i in range(8)])
    assert pool.wait_stats(lambda s: s["totals"]["inferences"] == 48)["totals"]["batches"] > before["batches"]


def _stats_pids(stats: dict) -> set[int]:
    return {w.get("pid") for w in stats["workers"].values()}


def _worker_pids(pool) -> list[int]:
    return sorted(p for p in _stats_pids(pool.stats()) if p)


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_serve_stops_cleanly(start_pool, how):
    pool = start_pool("--backend", "echo", parallel=2)
    pids = _worker_pids(pool)
    if how == "ctrl_c":  # a terminal's Ctrl-C reaches the whole process group
        os.killpg(pool.process.pid, signal.SIGINT)
        assert pool.process.wait(30) == 0
    else:
        assert pool.stop() == 0
    deadline = time.monotonic() + 10
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"worker {pid} outlived serve"
    assert "Traceback" not in pool.log()


def test_workers_and_gateway_stop_when_serve_is_sigkilled(start_pool):
    """serve killed outright (no handler runs) must not leave its workers re-registering forever, or
    its gateway holding the port, to join or block the next pool."""
    pool = start_pool("--backend", "echo", "--gateway-http", str(free_tcp_port()), "--gateway-grpc", "off",
                      parallel=2)
    children = children_of(pool.process.pid)
    workers = _worker_pids(pool)
    assert len(workers) == 2 and set(workers) < set(children), (workers, children)  # and the gateway
    pool.process.kill()
    pool.process.wait(10)
    assert not wait_gone(children, 30), "children outlived a SIGKILLed serve"


def test_sigterm_while_serve_starts_its_gateway_stops_it_cleanly(tmp_path):
    """A SIGTERM that comes while serve waits for its gateway to listen (before the pool runs), sent
    to the whole process group, is a clean stop, exit 0, with no worker started and the gateway child
    gone; it used to kill serve (-15), and then the gateway, dying of it too, read as lost (exit 1)."""
    serve = _serve_with_a_slow_gateway(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not children_of(serve.pid) and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        gateway = children_of(serve.pid)
        assert len(gateway) == 1, gateway  # the gateway child, still starting: no worker yet
        os.killpg(serve.pid, signal.SIGTERM)  # to the group, as a terminal, timeout or systemd send it
        code = serve.wait(30)
    finally:
        _stop_all([serve])
    log = next(tmp_path.glob("*.log")).read_text()
    assert code == 0, log
    assert not wait_gone(gateway, 10)
    assert "Traceback" not in log and "started" not in log and "clients on" not in log, log


def test_a_gateway_dying_as_serve_is_asked_to_stop_is_no_loss(tmp_path):
    """The gateway child has a session of its own, but not in the instant between its fork and its
    setsid: a SIGTERM to serve's group then kills it too. serve, asked to stop while it started,
    read that death as a lost gateway and exited 1 (seen once in CI, from the test above). Here the
    gateway dies by SIGKILL just after serve's SIGTERM, before serve acts on it: exit 0, a stop."""
    serve = _serve_with_a_slow_gateway(tmp_path)
    gateway: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while serve.poll() is None and time.monotonic() < deadline:  # the child, in its own session
            gateway = [pid for pid in children_of(serve.pid) if _session_of(pid) == pid]
            if gateway:
                break
            time.sleep(0.01)
        assert len(gateway) == 1, gateway
        # serve checks for a stop every 0.1 s while it waits for the gateway: both signals land first.
        os.kill(serve.pid, signal.SIGTERM)
        os.kill(gateway[0], signal.SIGKILL)
        code = serve.wait(30)
    finally:
        _stop_all([serve])
    log = next(tmp_path.glob("*.log")).read_text()
    assert code == 0, log
    assert "exited with code" not in log and "started" not in log, log


def _serve_with_a_slow_gateway(tmp_path) -> subprocess.Popen:
    """bertpool-serve (echo, 1 worker) with an HTTP gateway child that takes its time to start (a slow
    host): it sleeps a minute before its first import, so a signal surely comes while serve waits."""
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "if b'bertpool.gateway.gateway' in open('/proc/self/cmdline', 'rb').read():\n"
        "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    return _start(tmp_path, "bertpool.pool.serve", "--backend", "echo", "--parallel", "1", "--address", front,
                  "--worker-address", back, "--gateway-http", str(free_tcp_port()), "--gateway-grpc", "off", env=env)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def test_sighup_to_the_supervisor_and_its_workers_changes_nothing(tmp_path):
    """SIGHUP is serve's and the broker's "reload": sent to bertpool-workers and its workers (as to every
    bertpool process), it must not kill them (which orphaned the workers) nor stop the serving."""
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    procs = [_start(tmp_path, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                    "--stats-interval-s", "0")]
    try:
        procs.append(_start(tmp_path, "bertpool.workers.supervisor", "--worker-address", back, "--parallel", "2"))
        wait_for_workers(front, 2, timeout_s=60)
        with Client(front, timeout_s=20) as client:
            pids = sorted(_stats_pids(client.stats()))
            for pid in [procs[1].pid, *pids]:
                os.kill(pid, signal.SIGHUP)
            assert len(client.predict_many([("still", "serving")] * 10)) == 10
            assert sorted(_stats_pids(client.stats())) == pids  # the same processes: none died, none restarted
    finally:
        # A SIGHUP still pending is delivered before SIGTERM (lower number first): exit 0 shows it was ignored.
        assert _stop_all(procs) == [0, 0]
    assert not wait_gone(pids, 10)


def _start(tmp_path, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m module args`` in its own session (with ``env``: else ours), logging to tmp_path."""
    with open(tmp_path / f"{module}-{len(list(tmp_path.glob('*.log')))}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _stop_all(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM each, workers' supervisors before the broker, so they can say DISCONNECT."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    codes = []
    for p in reversed(procs):
        try:
            codes.append(p.wait(30))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes


def test_broker_and_workers_as_separate_commands_over_tcp(tmp_path):
    """bertpool-broker on one side, bertpool-workers (as on another host) connecting over tcp."""
    front, back = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    procs = []
    try:
        procs.append(_start(tmp_path, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                            "--stats-interval-s", "0"))
        procs.append(_start(tmp_path, "bertpool.workers.supervisor", "--worker-address", back,
                            "--parallel", "2"))
        wait_for_workers(front, 2, timeout_s=60)
        with Client(front, timeout_s=20) as client:
            assert len(client.predict_many([("over", "tcp")] * 10)) == 10
    finally:
        assert _stop_all(procs) == [0, 0]


def test_two_supervisors_on_one_host_keep_all_their_workers(tmp_path):
    """bertpool-workers --parallel 2 and --parallel 2 --first-core 2 on one host: 4 workers serve."""
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    procs = [_start(tmp_path, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                    "--stats-interval-s", "0")]
    try:
        for first_core in ("0", "2"):
            procs.append(_start(tmp_path, "bertpool.workers.supervisor", "--worker-address", back,
                                "--parallel", "2", "--first-core", first_core, "--batch-timeout-ms", "1"))
        wait_for_workers(front, 4, timeout_s=60)
        with Client(front, timeout_s=20) as client:
            assert len(client.predict_many([("four", "workers")] * 20)) == 20
            stats = client.stats()
    finally:
        assert _stop_all(procs) == [0, 0, 0]
    assert len(stats["workers"]) == 4 and stats["broker"]["requeued"] == 0
    assert len(_stats_pids(stats)) == 4
    assert sorted(name.rsplit(":", 1)[1] for name in stats["workers"]) == [f"core-{c}" for c in range(4)]


# ------------------------------------------------------------ the supervisor refuses bad config at start

def _run_until_exit(tmp_path, module: str, *args: str, timeout_s: float = 60.0) -> tuple[int | None, str]:
    """``python -m module args`` (see _start): (its exit code, or None if it still ran after ``timeout_s``
    and was killed with its session, workers included; its output)."""
    code = wait_or_kill(_start(tmp_path, module, *args), timeout_s)
    log = max(tmp_path.glob("*.log"), key=lambda p: p.stat().st_mtime)
    return code, log.read_text(errors="replace")


def test_workers_refuse_more_processes_than_the_cores_take(tmp_path):
    """--parallel 1000 forked 140 workers in 10 s on 2 cores; 99999999999999999999 grew the supervisor's
    memory until it was killed. Now one line, exit 2, and no worker started."""
    from bertpool.workers.supervisor import MAX_WORKERS_PER_CPU

    most = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    for parallel in (str(most + 1), "99999999999999999999"):
        code, out = _run_until_exit(tmp_path, "bertpool.workers.supervisor", "--worker-address",
                                    f"ipc://{tmp_path}/nobody", "--parallel", parallel, timeout_s=30)
        assert code == 2 and f"parallel must be at most {most}" in out, out
        assert "started" not in out and "Traceback" not in out, out


def test_a_worker_config_error_stops_the_pool_at_start_not_in_a_restart_loop(tmp_path):
    """--capacity 99999999999999999999 was accepted: each worker died at READY (a traceback) and was
    restarted forever. A bad worker setting is refused before any worker starts, exit 2."""
    code, out = _run_until_exit(tmp_path, "bertpool.workers.supervisor", "--worker-address",
                                f"ipc://{tmp_path}/nobody", "--parallel", "1", "--capacity",
                                "99999999999999999999", timeout_s=30)
    assert code == 2 and "capacity must be >= 0 and at most 2147483647" in out, out
    assert "started" not in out and "restarting" not in out and "Traceback" not in out, out


def test_a_worker_name_the_broker_would_refuse_is_refused_by_the_supervisor(tmp_path):
    """The supervisor names each worker <name>:<run id>:core-<n>: a name that fits the protocol alone can
    overflow it so. That is a one-line error at start, not a traceback when the worker starts (nor, before,
    workers whose READY the broker dropped, re-registering forever)."""
    from bertpool.common import configdata
    from bertpool.workers.worker import WorkerConfig

    back = f"ipc://{tmp_path}/nobody"
    config = tmp_path / "workers.json"
    configdata.write_json(WorkerConfig(broker_address=back, name="n" * (P.MAX_NAME_LEN - 6)), config)
    code, out = _run_until_exit(tmp_path, "bertpool.workers.supervisor", "--worker-address", back,
                                "--parallel", "1", "--worker-config-json", str(config), timeout_s=30)
    assert code == 2 and f"name must be at most {P.MAX_NAME_LEN} characters" in out, out
    assert "started" not in out and "Traceback" not in out, out
