"""The Prometheus endpoint (--metrics-address): real pools, real HTTP scrapes, parsed with
prometheus-client's own parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bertpool.broker.broker import Broker, BrokerConfig  # noqa: E402
from bertpool.broker.metrics import METRICS, MAX_STREAMS, PoolTotals  # noqa: E402
from bertpool.clients.bench import BenchConfig, run_bench, wait_for_workers  # noqa: E402
from bertpool.clients.client import Client  # noqa: E402
from bertpool.common import protocol as P  # noqa: E402
from bertpool.common.data import default_pairs  # noqa: E402
from bertpool.common.errors import ConfigError, RemoteError, RequestTimeout  # noqa: E402
from bertpool.common.metrics_export import (BATCH_FILL_BUCKETS_ROWS, LATENCY_BUCKETS_S,  # noqa: E402
                                            WorkerHistograms)

from conftest import children_of, free_tcp_port, start_module, stop_processes  # noqa: E402

CLIENTS, CYCLE, WARMUP = 48, 3, 1
SERVE = [sys.executable, "-m", "bertpool.pool.serve"]
BROKER = [sys.executable, "-m", "bertpool.broker.broker"]
WORKERS = [sys.executable, "-m", "bertpool.workers.supervisor"]


# ------------------------------------------------------------------ helpers

def scrape(port: int, timeout_s: float = 5.0, host: str = "127.0.0.1") -> dict[str, dict]:
    """GET /metrics and parse it: family name -> {"type", "help", "samples": {(name, labels): value}}."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "help": family.documentation, "samples": samples}
    return families


def value(families: dict, name: str, **labels) -> float:
    """One sample's value (its family is named without the _total, _count, _sum suffix)."""
    family = name
    for suffix in ("_total", "_count", "_sum"):
        if name.endswith(suffix) and name[:-len(suffix)] in families:
            family = name[:-len(suffix)]
    return families[family]["samples"][(name, tuple(sorted(labels.items())))]


def series(families: dict) -> set:
    return {key for f in families.values() for key in f["samples"]}


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class Serve:
    """A bertpool-serve process on ipc://, stopped (and its process group killed) by close()."""

    def __init__(self, tmp: Path, *args: str, parallel: int = 2) -> None:
        self.address, back = f"ipc://{tmp}/front.ipc", f"ipc://{tmp}/back.ipc"
        self.log_path = tmp / "serve.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*SERVE, "--address", self.address, "--worker-address", back, "--parallel", str(parallel),
                 "--stats-interval-s", "0", "--backend", "echo", "--batch-timeout-ms", "1", *args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_workers(self.address, parallel, 120.0)
        except Exception as exc:
            self.close()
            raise AssertionError(f"{exc}: {self.log_path.read_text(errors='replace')}") from exc

    def close(self) -> None:
        stop_processes(self.process, timeout_s=30)


def wait_scrape(port: int, done, timeout_s: float = 30.0) -> dict:
    """Scrape until ``done(families)`` holds twice in a row (the workers' STATS have landed and
    nothing moves any more); bounded in time."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        families = scrape(port)
        if done(families) and last is not None and series_values(families) == series_values(last):
            return families
        last = families if done(families) else None
        time.sleep(0.3)
    raise AssertionError(f"the scrape never settled; last: {families}")


def series_values(families: dict) -> dict:
    # The in-flight gauges and latency of scrapes aside, everything else is counted work.
    return {k: v for f in families.values() for k, v in f["samples"].items()}


# -------------------------------------------------- one 48-client run, scraped

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """A 2-worker echo pool with metrics; 48 bench clients; scrapes during and after the run."""
    tmp = tmp_path_factory.mktemp("metrics")
    port = free_tcp_port()
    pool = Serve(tmp, "--metrics-address", str(port))
    try:
        idle = scrape(port)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(report=run_bench(
            BenchConfig(address=pool.address, clients=CLIENTS, cycle=CYCLE, warmup=WARMUP), default_pairs())))
        runner.start()
        during = []
        deadline = time.monotonic() + 300
        while runner.is_alive() and time.monotonic() < deadline:
            during.append(scrape(port))
            runner.join(0.2)
        runner.join(max(0.0, deadline - time.monotonic()))
        assert "report" in result, "the bench did not finish"
        report = result["report"]
        answered = CLIENTS * (CYCLE + WARMUP)  # warm-up requests are served (and counted) too
        after = wait_scrape(port, lambda f: value(f, "bertpool_requests_total", outcome="ok") == answered
                            and value(f, "bertpool_inferences_total") == answered)
        # More distinct clients (each Client is a new ZeroMQ identity), some of them failing.
        for i in range(20):
            with Client(pool.address, timeout_s=10) as client:
                if i % 2:
                    client.predict("a", "b")
                else:
                    with pytest.raises(RemoteError):
                        client.predict("", "b")  # bad_text, answered by a worker
        more = wait_scrape(port, lambda f: value(f, "bertpool_inferences_total") == answered + 10)
        yield {"port": port, "idle": idle, "during": during, "after": after, "more": more, "report": report,
               "answered": answered, "pid": pool.process.pid}
    finally:
        pool.close()


def test_scrape_counters_equal_the_bench_counts(bench_run):
    report, after, answered = bench_run["report"], bench_run["after"], bench_run["answered"]
    assert report["replies"] == CLIENTS * CYCLE and report["errors"] == 0
    assert value(after, "bertpool_requests_total", outcome="ok") == report["replies"] + CLIENTS * WARMUP
    assert value(after, "bertpool_inferences_total") == answered
    assert value(after, "bertpool_requests_total", outcome="busy") == 0
    assert all(value(after, "bertpool_requests_total", outcome=code) == 0 for code in (*P.ERROR_CODES, "other"))
    # Every histogram counted every request (or batch) exactly once.
    assert value(after, "bertpool_request_latency_seconds_count") == answered
    assert value(after, "bertpool_queue_wait_seconds_count") == answered
    assert value(after, "bertpool_batch_wait_seconds_count") == answered
    batches = value(after, "bertpool_batches_total")
    assert value(after, "bertpool_compute_seconds_count") == batches > 0
    assert value(after, "bertpool_batch_fill_rows_count") == batches
    assert value(after, "bertpool_batch_fill_rows_sum") == answered  # real rows per batch, summed
    assert value(after, "bertpool_padded_rows_total") == 4 * batches - answered  # batch 4, echo pads
    assert value(after, "bertpool_workers_alive") == 2 and value(after, "bertpool_queue_depth_requests") == 0
    assert value(after, "bertpool_worker_registrations_total") == 2
    assert value(after, "bertpool_worker_restarts_total") == 0
    assert value(after, "bertpool_model_info", backend="echo", model_hash="none", dtype="none",
                 target="none", version="0.1.0") == 2
    # The scrapes during the run saw the counters climb, never fall.
    oks = [value(f, "bertpool_requests_total", outcome="ok") for f in bench_run["during"]]
    assert oks and oks == sorted(oks) and oks[-1] <= answered
    # The failing clients show up by outcome.
    more = bench_run["more"]
    assert value(more, "bertpool_requests_total", outcome="bad_text") == 10
    assert value(more, "bertpool_requests_total", outcome="ok") == answered + 10


@pytest.mark.parametrize("name, bounds", [
    ("bertpool_request_latency_seconds", LATENCY_BUCKETS_S), ("bertpool_queue_wait_seconds", LATENCY_BUCKETS_S),
    ("bertpool_batch_wait_seconds", LATENCY_BUCKETS_S), ("bertpool_compute_seconds", LATENCY_BUCKETS_S),
    ("bertpool_batch_fill_rows", BATCH_FILL_BUCKETS_ROWS)])
def test_histograms_have_the_documented_buckets(bench_run, name, bounds):
    family = bench_run["after"][name]
    assert family["type"] == "histogram"
    les = [dict(labels)["le"] for sample, labels in family["samples"] if sample == f"{name}_bucket"]
    assert [float(le) for le in les] == [*map(float, bounds), float("inf")]
    cumulative = [family["samples"][(f"{name}_bucket", (("le", le),))] for le in les]
    assert cumulative == sorted(cumulative) and cumulative[-1] == family["samples"][(f"{name}_count", ())]
    # The documented bounds: latency 0.5 ms .. 10 s; fill 1 .. 128 rows.
    assert LATENCY_BUCKETS_S[0] == 0.0005 and LATENCY_BUCKETS_S[-1] == 10.0
    assert BATCH_FILL_BUCKETS_ROWS[:8] == (1, 2, 3, 4, 5, 6, 7, 8) and BATCH_FILL_BUCKETS_ROWS[-1] == 128


def test_series_do_not_grow_with_clients(bench_run):
    """48 bench clients and 20 more, ok and failing: the same series as the idle pool's."""
    idle, after, more = series(bench_run["idle"]), series(bench_run["after"]), series(bench_run["more"])
    assert idle == after == more
    assert len(idle) < 200
    workers = {dict(labels)["worker"] for name, labels in idle if name == "bertpool_worker_inflight_requests"}
    assert len(workers) == 2  # one series per worker slot


def test_every_documented_metric_is_exported(bench_run):
    """serve's endpoint: the broker's metrics and its supervisor's, each listed in the README."""
    from bertpool.workers.supervisor import SUPERVISOR_METRICS

    after = bench_run["after"]
    exported = {name + ("_total" if f["type"] == "counter" else "") for name, f in after.items()}
    assert exported == set(METRICS) | set(SUPERVISOR_METRICS)
    assert value(after, "bertpool_build_info", version="0.1.0") == 1
    assert value(after, "bertpool_worker_exits_total", cause="signal") == 0
    assert value(after, "bertpool_worker_slots_failing") == 0
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(name in readme for name in [*METRICS, *SUPERVISOR_METRICS]), \
        "README's Monitoring section lists every metric"


# ------------------------------------------------------------ bad addresses

@pytest.mark.parametrize("text", ["nope", "127.0.0.1:0", "[nope]:9100"])  # every form: tests/test_cli.py
def test_bad_metrics_address_is_a_config_error(text):
    with pytest.raises(ConfigError, match="--metrics-address"):
        BrokerConfig(metrics_address=text)


@pytest.mark.parametrize("command", [SERVE, BROKER], ids=["serve", "broker"])
@pytest.mark.parametrize("text", ["nope", "1.2.3.4:99999", ":abc", "IN_USE", "192.0.2.1:9100"])
def test_bad_metrics_address_exits_2(tmp_path, command, text):
    """Syntax errors, a port in use and an address not on this host: one clear line, exit 2,
    and nothing started (serve's workers never run: the broker binds first)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if text == "IN_USE":
            text = str(taken.getsockname()[1])
        proc = subprocess.run([*command, "--address", f"ipc://{tmp_path}/f", "--worker-address",
                               f"ipc://{tmp_path}/b", "--metrics-address", text],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error: --metrics-address" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(("bertpool-serve: error", "bertpool-broker: error"))


def test_without_prometheus_client_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b",
                                 metrics_address=str(free_tcp_port())))
    with pytest.raises(ConfigError, match=r"bertpool\[metrics\]"):
        broker.bind()
    assert broker.frontend is None  # closed again: nothing half-started


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_off_by_default_no_http_port(tmp_path):
    pool = Serve(tmp_path, parallel=1)
    try:
        assert listening_tcp_ports(pool.process.pid) == set()  # ipc:// only, and no metrics server
        assert "metrics on" not in pool.log_path.read_text()
    finally:
        pool.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_with_the_flag_exactly_the_metrics_port_listens(bench_run):
    assert listening_tcp_ports(bench_run["pid"]) == {bench_run["port"]}


# ------------------------------------------- broker accounting, raw sockets

@pytest.fixture
def raw_broker(tmp_path, sockets):
    """A broker with metrics on a thread, and DEALER sockets (conftest ``sockets``); all closed at teardown."""
    port = free_tcp_port()
    b = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b",
                            heartbeat_interval_s=60.0, metrics_address=f"127.0.0.1:{port}"))
    b.bind()
    thread = threading.Thread(target=b.run, daemon=True)
    thread.start()
    yield b, port, sockets
    b.stop(drain=False)
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(OSError):  # the endpoint went with the broker
        scrape(port, timeout_s=1)


def _recv(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(5000), "nothing received in time"
    return sock.recv_multipart()


def _wait(port: int, done, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        families = scrape(port)
        if done(families):
            return families
        time.sleep(0.05)
    raise AssertionError(f"never reached; last: {families}")


def test_worker_error_codes_restarts_and_stats_streams(raw_broker):
    b, port, dealer = raw_broker
    client, first = dealer(b.config.frontend), dealer(b.config.backend)
    first.send_multipart(P.ready_frames("w", "slot-0", "inc-1", 1, 4, "tf", 4,
                                        model={"hash": "ab12", "dtype": "float16", "target": "neuron"},
                                        version="9.9"))
    _wait(port, lambda f: value(f, "bertpool_workers_alive") == 1)
    for i in range(3):
        client.send_multipart([P.VERSION, P.REQUEST, P.text_request(i, "a", "b")])
    tokens = [_recv(first)[2] for _ in range(3)]
    families = _wait(port, lambda f: value(f, "bertpool_worker_inflight_requests", worker="slot-0") == 3)
    assert value(families, "bertpool_model_info", backend="tf", model_hash="ab12", dtype="float16",
                 target="neuron", version="9.9") == 1
    first.send_multipart(P.reply_frames(tokens[0], P.reply_body(0, [0.1, 0.9], {})))
    first.send_multipart(P.error_frames(tokens[1], P.error_body(1, P.E_INFERENCE, "boom")))
    first.send_multipart(P.error_frames(tokens[2], P.error_body(2, "made_up_code", "?")))
    for _ in range(3):
        _recv(client)
    # STATS: one stream (epoch) over two sockets, out of order and repeated, counts once.
    hist = WorkerHistograms()
    hist.observe_batch([0.001, 0.002], 0.003)
    early = hist.as_wire()
    hist.observe_batch([0.004], 0.005)
    late = hist.as_wire()
    second = dealer(b.config.backend)  # unregistered: a worker's compute socket
    first.send_multipart(P.stats_frames({"inferences": 3, "batches": 2, "padded_rows": 5}, "epoch-A", late))
    # Taken from an unregistered socket only under an epoch a registered one sent: wait for it.
    _wait(port, lambda f: value(f, "bertpool_inferences_total") == 3)
    second.send_multipart(P.stats_frames({"inferences": 2, "batches": 1, "padded_rows": 2}, "epoch-A", early))
    second.send_multipart(P.stats_frames({"inferences": 3, "batches": 2, "padded_rows": 5}, "epoch-A", late))
    # The slot restarts on another socket: the old one is lost, its stream goes on under its epoch.
    third = dealer(b.config.backend)
    third.send_multipart(P.ready_frames("w", "slot-0", "inc-2", 2, 4, "tf", 4))
    third.send_multipart(P.stats_frames({"inferences": 1, "batches": 1, "padded_rows": 3}, "epoch-B"))
    f = _wait(port, lambda f: value(f, "bertpool_worker_restarts_total") == 1
              and value(f, "bertpool_inferences_total") == 4)
    assert value(f, "bertpool_requests_total", outcome="ok") == 1
    assert value(f, "bertpool_requests_total", outcome=P.E_INFERENCE) == 1
    assert value(f, "bertpool_requests_total", outcome="other") == 1  # unknown codes stay one series
    assert "made_up_code" not in str(series(f))
    assert value(f, "bertpool_workers_lost_total") == 1 and value(f, "bertpool_worker_registrations_total") == 2
    assert value(f, "bertpool_batches_total") == 3 and value(f, "bertpool_padded_rows_total") == 8
    assert value(f, "bertpool_batch_wait_seconds_count") == 3
    assert value(f, "bertpool_batch_fill_rows_sum") == 3 and value(f, "bertpool_compute_seconds_count") == 2
    assert value(f, "bertpool_request_latency_seconds_count") == 3
    assert value(f, "bertpool_model_info", backend="tf", model_hash="unknown", dtype="unknown",
                 target="unknown", version="unknown") == 1  # a READY without model info


def test_the_same_process_re_registering_is_not_a_restart(raw_broker):
    """A worker that re-registered (after a pause, a DISCONNECT or a broker stall) counted as a restart
    of its slot, and a replaced live registration as a lost worker: false alarms on every hiccup. Only
    a READY from another pid is a restart."""
    b, port, dealer = raw_broker
    first, second, third, fourth = (dealer(b.config.backend) for _ in range(4))
    first.send_multipart(P.ready_frames("w", "slot-0", "inc-1", 7, 4, "echo", 4))
    _wait(port, lambda f: value(f, "bertpool_workers_alive") == 1)
    second.send_multipart(P.ready_frames("w", "slot-0", "inc-2", 7, 4, "echo", 4))  # replaces a live one
    _wait(port, lambda f: value(f, "bertpool_worker_registrations_total") == 2)
    second.send_multipart(P.worker_disconnect_frames("w", "inc-2"))
    third.send_multipart(P.ready_frames("w", "slot-0", "inc-3", 7, 4, "echo", 4))  # after a DISCONNECT
    f = _wait(port, lambda f: value(f, "bertpool_worker_registrations_total") == 3)
    assert value(f, "bertpool_worker_restarts_total") == 0 and value(f, "bertpool_workers_lost_total") == 0
    fourth.send_multipart(P.ready_frames("w", "slot-0", "inc-4", 8, 4, "echo", 4))  # a new process
    f = _wait(port, lambda f: value(f, "bertpool_worker_registrations_total") == 4)
    assert value(f, "bertpool_worker_restarts_total") == 1 and value(f, "bertpool_workers_lost_total") == 1
    assert value(f, "bertpool_workers_alive") == 1


def test_restarts_count_pid_changes_per_slot():
    from bertpool.broker.metrics import BrokerMetrics

    m = BrokerMetrics(PoolTotals())
    for slot, pid in [("a", 1), ("a", 1), ("b", 5), ("a", 2), ("a", 2), ("a", None), ("a", None), (None, 3)]:
        m.on_ready(slot, pid)
    assert (m.registrations, m.restarts) == (8, 3)  # a: 1 -> 2, 2 -> None, None -> None (cannot tell)


def test_a_baseline_stream_adds_only_what_comes_after_it():
    totals = PoolTotals()
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    totals.update("old", {"inferences": 100}, {"compute_seconds": ([100, *counts[1:]], 9.0)}, baseline=True)
    assert totals.knows("old") and not totals.knows("other")
    assert totals.counters["inferences"] == 0 and totals.histograms["compute_seconds"].snapshot() == (counts, 0.0)
    totals.update("old", {"inferences": 104}, {"compute_seconds": ([104, *counts[1:]], 9.5)}, baseline=True)
    assert totals.counters["inferences"] == 4
    assert totals.histograms["compute_seconds"].snapshot() == ([4, *counts[1:]], 0.5)
    totals.update("new", {"inferences": 3}, None)  # not a baseline: counted in full
    assert totals.counters["inferences"] == 7


def test_pool_totals_count_each_stream_once_and_stay_bounded():
    totals = PoolTotals()
    totals.update("a", {"inferences": 5}, None)
    totals.update("a", {"inferences": 4}, None)   # an older snapshot, overtaken
    totals.update("a", {"inferences": 7}, None)
    totals.update("b", {"inferences": 1, "nonsense": 10**9}, {"unknown": ([1], 1.0),
                                                              "compute_seconds": ([1, 2], 1.0)})  # wrong size
    assert totals.counters["inferences"] == 8
    assert sum(totals.histograms["compute_seconds"].counts) == 0
    for i in range(MAX_STREAMS + 10):
        totals.update(f"s{i}", {"inferences": 1}, None)
    assert len(totals._streams) == MAX_STREAMS and totals.counters["inferences"] == 8 + MAX_STREAMS + 10


def test_compiled_model_info_comes_from_the_manifest():
    from types import SimpleNamespace

    from bertpool.workers.backends import CompiledBackend, EchoBackend, BackendConfig

    backend = object.__new__(CompiledBackend)
    backend._model = SimpleNamespace(manifest={"source": {"sha256": "f00d"}, "dtype": "bfloat16", "target": "cpu"})
    assert backend.model_info() == {"hash": "f00d", "dtype": "bfloat16", "target": "cpu"}
    assert EchoBackend(BackendConfig()).model_info() == {"hash": "none", "dtype": "none", "target": "none"}


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:9400/metrics"),
                                       ("::1", "http://[::1]:9400/metrics")])
def test_the_logged_metrics_url_is_a_valid_url(host, url):
    from bertpool.broker.metrics import MetricsServer

    server = MetricsServer.__new__(MetricsServer)  # only the address matters here: nothing is bound
    server.host, server.port = host, 9400
    assert server.url == url


# ------------------------------------------- the endpoint's own behaviour (no pool: a stand-in broker)

class _IdleBroker:
    """What BrokerCollector reads of a Broker: its counters, metrics, workers and queue (all idle)."""

    def __init__(self) -> None:
        from bertpool.broker.broker import BrokerCounters
        from bertpool.broker.metrics import BrokerMetrics

        self.counters = BrokerCounters()
        self.metrics = BrokerMetrics(PoolTotals())
        self.counters.replies = self.metrics.pool.counters["inferences"] = 7
        self._workers: dict = {}
        self._queue: list = []
        self._queue_bytes = 0


@pytest.fixture
def idle_endpoint():
    from bertpool.broker.metrics import MetricsServer

    server = MetricsServer(_IdleBroker(), f"127.0.0.1:{free_tcp_port()}")
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("names, families", [
    (["bertpool_inferences_total"], {"bertpool_inferences"}),
    (["bertpool_requests_total", "bertpool_workers_alive"], {"bertpool_requests", "bertpool_workers_alive"}),
    (["bertpool_compute_seconds_count"], {"bertpool_compute_seconds"}),
])
def test_the_name_filter_serves_the_named_series(idle_endpoint, names, families):
    """prometheus-client's ``?name[]=`` filter: a collector that described nothing got an empty 200."""
    query = "&".join(f"name[]={n}" for n in names)
    with urllib.request.urlopen(f"{idle_endpoint.url}?{query}", timeout=10) as response:
        text = response.read().decode()
    parsed = {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}
    assert set(parsed) == families, text
    assert {s for samples in parsed.values() for s in samples} == set(names)
    if "bertpool_inferences_total" in names:
        assert "bertpool_inferences_total 7.0" in text


def test_described_types_match_the_scrape(idle_endpoint):
    """describe() (what the filter relies on) names each family with the type collect() gives it."""
    from bertpool.broker.metrics import HISTOGRAMS
    from bertpool.common.prometheus import family_name, metric_type

    with urllib.request.urlopen(idle_endpoint.url, timeout=10) as response:
        scraped = {f.name: f.type for f in text_string_to_metric_families(response.read().decode())}
    assert scraped == {family_name(name, HISTOGRAMS): metric_type(name, HISTOGRAMS) for name in METRICS}


# ------------------------------------------- bertpool-workers' own endpoint (remote workers)

class RemoteWorkers:
    """A bertpool-broker and a bertpool-workers beside it (as on another host: its own process, its own
    --metrics-address), on ``front``/``back``; close() stops both, and whatever they started."""

    def __init__(self, tmp: Path, front: str, back: str, *worker_args: str, parallel: int = 2) -> None:
        self.tmp = tmp
        self.broker = start_module(tmp, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                                   "--stats-interval-s", "0")
        self.workers = start_module(tmp, "bertpool.workers.supervisor", "--worker-address", back,
                                    "--parallel", str(parallel), "--backend", "echo", *worker_args)
        deadline = time.monotonic() + 120.0
        while True:  # in short waits, to fail as soon as either process has exited
            try:
                wait_for_workers(front, parallel, 2.0)
                return
            except RequestTimeout as exc:
                if self.workers.poll() is None and self.broker.poll() is None and time.monotonic() < deadline:
                    continue
                self.close()
                raise AssertionError(f"{exc}: {self.logs()}") from exc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> list[int | None]:
        """Stop the workers, then the broker (so they can say DISCONNECT); their exit codes."""
        stop_processes(self.workers)
        stop_processes(self.broker)
        return [self.workers.returncode, self.broker.returncode]


def wait_workers_scrape(workers: RemoteWorkers, port: int, done, timeout_s: float = 120.0) -> dict:
    """Scrape bertpool-workers' endpoint until ``done(families)``; fails at once if it exited."""
    deadline = time.monotonic() + timeout_s
    families: dict = {}
    while time.monotonic() < deadline and workers.workers.poll() is None:
        families = scrape(port)
        if done(families):
            return families
        time.sleep(0.1)
    raise AssertionError(f"bertpool-workers exit code {workers.workers.poll()}; last scrape {families}; "
                         f"{workers.logs()}")


def test_remote_workers_show_deaths_before_ready_on_their_own_endpoint(tmp_path):
    """bertpool-workers on another host than the broker had no endpoint: a slot whose worker cannot load
    (its --vocab here; its model directory in production) never says READY, so neither the broker nor
    any scrape saw it. Now bertpool-workers --metrics-address serves the supervisor's two families, named,
    described and labelled as bertpool-serve exports them, and nothing of the broker's."""
    from bertpool.workers.backends import fallback_vocab_path
    from bertpool.workers.supervisor import EXIT_CAUSES, SUPERVISOR_METRICS

    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(fallback_vocab_path().read_bytes())
    port = free_tcp_port()
    pool = RemoteWorkers(tmp_path, f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back",
                         "--vocab", str(vocab), "--metrics-address", str(port))
    try:
        before = scrape(port)
        assert {name + ("_total" if f["type"] == "counter" else ""): f["help"] for name, f in before.items()} \
            == SUPERVISOR_METRICS
        assert set(before["bertpool_worker_exits"]["samples"]) == \
            {("bertpool_worker_exits_total", (("cause", cause),)) for cause in EXIT_CAUSES}
        assert value(before, "bertpool_worker_exits_total", cause="signal") == 0
        assert value(before, "bertpool_worker_slots_failing") == 0
        if os.path.isdir("/proc/self/fd"):
            assert listening_tcp_ports(pool.workers.pid) == {port}  # its one listener
        vocab.unlink()
        os.kill(children_of(pool.workers.pid)[0], signal.SIGKILL)
        after = wait_workers_scrape(pool, port, lambda f: value(f, "bertpool_worker_slots_failing") == 1)
        assert value(after, "bertpool_worker_exits_total", cause="signal") == 1
        assert value(after, "bertpool_worker_exits_total", cause="load_failed") >= 1
        assert pool.workers.poll() is None  # the other worker serves on
    finally:
        codes = pool.close()
    assert codes == [0, 0], pool.logs()
    assert f"metrics on http://127.0.0.1:{port}/metrics" in pool.logs()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_remote_workers_metrics_may_share_a_port_number_with_the_broker(tmp_path):
    """bertpool-workers listens on nothing else (it connects to the broker), so its --metrics-address may
    use the broker's port number on another address (here 127.0.0.2: another host, as far as ports go)."""
    broker_port = free_tcp_port()
    back = f"tcp://127.0.0.1:{broker_port}"
    pool = RemoteWorkers(tmp_path, f"ipc://{tmp_path}/front", back, "--metrics-address",
                         f"127.0.0.2:{broker_port}", parallel=1)
    try:
        assert value(scrape(broker_port, host="127.0.0.2"), "bertpool_worker_slots_failing") == 0
        assert listening_tcp_ports(pool.workers.pid) == {broker_port}
    finally:
        codes = pool.close()
    assert codes == [0, 0], pool.logs()


@pytest.mark.parametrize("text", ["nope", "1.2.3.4:99999", ":abc", "http://127.0.0.1:9100", "[::1", "IN_USE",
                                  "192.0.2.1:9100"])
def test_bad_remote_workers_metrics_address_exits_2(tmp_path, text):
    """bertpool-workers' --metrics-address, read as the broker's is: a typo, a port in use, an address not
    on this host are one line, exit 2, before any worker starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if text == "IN_USE":
            text = str(taken.getsockname()[1])
        proc = subprocess.run([*WORKERS, "--worker-address", f"ipc://{tmp_path}/b", "--backend", "echo",
                               "--parallel", "1", "--metrics-address", text],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no log of a worker started, no usage
    assert proc.stderr.startswith("bertpool-workers: error: --metrics-address ") and text in proc.stderr, proc.stderr


def test_remote_workers_without_prometheus_client_name_the_extra(tmp_path):
    """As the broker says it: one line naming the extra, exit 2, nothing started."""
    blocked = ("import sys; sys.modules['prometheus_client'] = None; "  # its import fails
               "from bertpool.workers.supervisor import main; raise SystemExit(main())")
    proc = subprocess.run([sys.executable, "-c", blocked, "--worker-address", f"ipc://{tmp_path}/b",
                           "--backend", "echo", "--parallel", "1", "--metrics-address", str(free_tcp_port())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("bertpool-workers: error: --metrics-address needs prometheus-client: "
                                   "pip install 'bertpool[metrics]' (prometheus-client)"), proc.stderr
