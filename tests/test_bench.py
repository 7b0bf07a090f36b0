"""bertpool-bench against a live echo pool, and the CLI's error handling."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bertpool.bench import ECHO_VOCAB_BUILT_IN, echo_vocab
from bertpool.common.data import SHARED_MRPC_DEV_FILE, SHARED_VOCAB_FILE, default_pairs, shared_file
from conftest import children_of, wait_gone

BENCH = [sys.executable, "-m", "bertpool.clients.bench"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout)


def test_bench_writes_the_report(start_pool, tmp_path):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "4", "--cycle", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 32 and report["replies"] == 32 and report["errors"] == 0
    assert report["throughput_per_s"] > 0
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99", "p999"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    beyond = report["beyond_compute_ms"]  # each reply's latency less its own batch's compute time
    assert 0 < beyond["p50"] <= report["latency_ms"]["p50"] and beyond["max"] <= report["latency_ms"]["max"]
    assert 0.0 <= report["accuracy"] <= 1.0 and report["labelled"] == 32  # shipped pairs are labelled
    quality = report["quality"]  # 4 x 8 requests over the 64 shipped pairs: 32 distinct pairs
    assert quality["n"] == 32 and sum(quality["confusion"].values()) == 32 and quality["inconsistent_pairs"] == 0
    assert 0.0 <= quality["f1"] <= 1.0 and "F1" in proc.stdout and "tp " in proc.stdout
    assert report["backends"] == {"echo": 2}
    assert "WARNING: echo workers answered" in proc.stdout
    assert "throughput" in proc.stdout
    assert "%|" not in proc.stderr and report["ok"] is True  # no progress bar when stderr is not a terminal
    assert "warning" not in proc.stderr  # the workers were ready
    # Warm-up requests are not measured, but the pool served them: the report says how many.
    assert report["warmup_replies"] == 4 * 2
    assert report["client_retries"] == {"busy_retries": 0, "lost_resends": 0, "reconnects": 0}
    stats = pool.wait_stats(lambda s: s["totals"]["inferences"] >= 32 + 4 * 2)
    assert stats["broker"]["replies"] == report["replies"] + report["warmup_replies"]


def test_the_report_counts_the_busy_answers_the_client_retried(start_pool, tmp_path):
    """The broker counts every BUSY it answers; the bench counted only requests whose retries all
    failed (ServerBusy), so the two could not be matched. The report now has the Client's retries."""
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "100", "--batch-size", "1", "--capacity", "1",
                      "--max-queue", "1", parallel=1)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "6", "--cycle", "2", "--warmup", "0", "--json", str(out))
    report = json.loads(out.read_text())
    retried = report["client_retries"]["busy_retries"]
    assert retried > 0, (proc.returncode, report["errors_by_type"])
    assert f"client retries  resent {retried} after BUSY" in proc.stdout, proc.stdout
    gave_up = report["errors_by_type"].get("ServerBusy", 0)  # the BUSY that ended a request
    stats = pool.wait_stats(lambda s: s["broker"]["busy"] >= retried + gave_up)
    assert stats["broker"]["busy"] == retried + gave_up


def test_bench_on_the_mrpc_dev_set(start_pool, tmp_path):
    tsv = shared_file(SHARED_MRPC_DEV_FILE)
    if tsv is None:
        pytest.skip(f"shared {SHARED_MRPC_DEV_FILE} not present")
    pool = start_pool("--backend", "echo", parallel=2)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "3", "--cycle", "5", "--tsv", str(tsv), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["labelled"] == 15 and report["pairs_source"] == str(tsv)


@pytest.mark.parametrize("args, message", [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--tsv", "/nonexistent.tsv"], "nonexistent"),
])
def test_bench_bad_input_is_a_clear_error(args, message):
    proc = run("--address", "ipc:///nonexistent-bertpool", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bench_without_a_server_times_out_cleanly():
    proc = run("--address", "ipc:///nonexistent-bertpool", "--wait-workers", "1", "--wait-timeout-s", "1")
    assert proc.returncode == 2 and "not ready" in proc.stderr and "Traceback" not in proc.stderr


def relay_bench(out: Path, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, dict]:
    """``bertpool-bench-broker ARGS --json OUT``, which must exit 0: its process and its report."""
    proc = subprocess.run([sys.executable, "-m", "bertpool.bench.relay", *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("request_kind", ["text", "features"])
def test_broker_bench_runs_all_setups(tmp_path, request_kind):
    out = tmp_path / "broker.json"
    proc, report = relay_bench(out, "--clients", "4", "--workers", "1", "--load-procs", "1", "--warmup-s", "0.2",
                               "--duration-s", "0.5", "--single", "20", "--request", request_kind)
    assert set(report["round_trips_per_s"]) == {"relay", "broker", "pool"}
    assert all(v > 0 for v in report["round_trips_per_s"].values())
    assert report["ratio_to_relay"]["relay"] == 1.0
    # One client alone through each set-up: a DEALER everywhere, bertpool.Client through the pool too.
    single = report["single_client_ms"]
    assert {setup: set(single[setup]) for setup in single} == {
        "relay": {"dealer"}, "broker": {"dealer"}, "pool": {"dealer", "client"}}
    for latency in (single["relay"]["dealer"], single["broker"]["dealer"], single["pool"]["dealer"],
                    single["pool"]["client"]):
        assert latency["requests"] == 20 and 0 < latency["p50"] <= latency["p99"]
    for setup in single:  # the CPU that one request at a time costs the router and the workers (Linux /proc)
        cpu = single[setup]["dealer"]["cpu_us_per_round_trip"]
        assert set(cpu) == {"router", "workers"} and all(v >= 0 for v in cpu.values()), cpu
    client = single["pool"]["client"]
    assert 0 < client["beyond_compute_p50"] <= client["p50"]
    assert report["single_added_latency_ms"] == client["beyond_compute_p50"]
    relay = single["relay"]["dealer"]["p50"]
    assert report["single_over_relay_ms"] == {
        "broker": round(single["broker"]["dealer"]["p50"] - relay, 3),
        "pool": round(single["pool"]["dealer"]["p50"] - relay, 3), "pool_client": round(client["p50"] - relay, 3),
        "pool_client_beyond_compute": round(client["beyond_compute_p50"] - relay, 3)}
    # Self-describing: every setting (also those with no field of their own) and where it ran.
    assert report["config"] == {"setups": ["relay", "broker", "pool"], "load_procs": 1, "warmup_s": 0.2,
                                "single": 20, "vocab": None, "rounds": 1}
    assert "rounds" not in report  # one round: its numbers are the report's own
    assert_environment(report, "bertpool-bench-broker", proc.args[3:])


def test_broker_bench_rounds_give_each_round_and_the_medians(tmp_path):
    """--rounds 3: every set-up measured three times, each round kept whole, and the report's numbers the
    medians of the rounds' (each ratio and excess over the relay within its own round)."""
    out = tmp_path / "broker.json"
    proc, report = relay_bench(out, "--setups", "relay,pool", "--clients", "2", "--workers", "1", "--load-procs", "1",
                               "--warmup-s", "0.1", "--duration-s", "0.3", "--single", "10", "--rounds", "3",
                               timeout=300)
    rounds = report["rounds"]
    assert len(rounds) == 3 and report["config"]["rounds"] == 3
    assert proc.stdout.count("ratio to relay:") == 4 and "median of 3 rounds:" in proc.stdout

    def middle(values):
        return round(sorted(values)[1], 3)

    for setup in ("relay", "pool"):
        rates = [r["round_trips_per_s"][setup] for r in rounds]
        assert all(rate > 0 for rate in rates)
        assert report["round_trips_per_s"][setup] == middle(rates)
        assert report["cpu_us_per_round_trip"][setup]["router"] == middle(
            [r["cpu_us_per_round_trip"][setup]["router"] for r in rounds])
    for r in rounds:  # each round's ratio and excess against its own relay
        assert r["ratio_to_relay"]["pool"] == round(r["round_trips_per_s"]["pool"] / r["round_trips_per_s"]["relay"], 3)
        assert r["single_over_relay_ms"]["pool_client_beyond_compute"] == round(
            r["single_client_ms"]["pool"]["client"]["beyond_compute_p50"] - r["single_client_ms"]["relay"]["dealer"]["p50"], 3)
    assert report["ratio_to_relay"] == {"relay": 1.0, "pool": middle([r["ratio_to_relay"]["pool"] for r in rounds])}
    assert report["single_added_latency_ms"] == middle([r["single_added_latency_ms"] for r in rounds])
    assert report["single_over_relay_ms"]["pool_client_beyond_compute"] == middle(
        [r["single_over_relay_ms"]["pool_client_beyond_compute"] for r in rounds])
    assert report["single_client_ms"]["pool"]["client"]["p50"] == middle(
        [r["single_client_ms"]["pool"]["client"]["p50"] for r in rounds])


def test_median_tree_takes_each_number_over_the_records_that_have_it():
    from bertpool.bench import median_tree

    records = [{"a": 1, "b": {"x": 0.5, "y": None}, "s": "one", "flag": True},
               {"a": 3, "b": {"x": 0.25, "y": None, "z": 7}, "s": "two", "flag": False},
               {"a": 2, "b": {"x": 1.0, "y": None}, "s": "three", "flag": True}]
    assert median_tree(records) == {"a": 2, "b": {"x": 0.5, "y": None, "z": 7}, "s": "one", "flag": True}
    assert median_tree([1.0, 2.0]) == 1.5 and median_tree([None, 4]) == 4 and median_tree([]) is None


def test_broker_bench_pool_workers_take_a_given_vocabulary(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "quick", "fox", "a", "fast", "."]) + "\n")
    out = tmp_path / "pool.json"
    args = [sys.executable, "-m", "bertpool.bench.relay", "--clients", "2", "--workers", "1", "--load-procs", "1",
            "--warmup-s", "0.2", "--duration-s", "0.3", "--setups", "pool", "--single", "0"]
    proc = subprocess.run([*args, "--vocab", str(vocab), "--json", str(out)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["vocab"] == str(vocab) and report["round_trips_per_s"]["pool"] > 0
    missing = subprocess.run([*args, "--vocab", str(tmp_path / "none.txt")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.parametrize("present", [True, False])
def test_echo_benches_default_to_the_shared_bert_vocabulary(monkeypatch, tmp_path, present):
    """Echo workers of a bench tokenize with a real vocabulary where the shared one is present (the built-in
    character vocabulary costs several times the work); a given --vocab still wins."""
    monkeypatch.setenv("BERTPOOL_SHARED_DATA", str(tmp_path))
    shared = tmp_path / SHARED_VOCAB_FILE
    if present:
        shared.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "fox", "."]) + "\n")
    assert echo_vocab(None) == ((str(shared), str(shared)) if present else (None, ECHO_VOCAB_BUILT_IN))
    assert echo_vocab("/given/vocab.txt") == ("/given/vocab.txt", "/given/vocab.txt")
    out = tmp_path / "pool.json"
    _, report = relay_bench(out, "--clients", "2", "--workers", "1", "--load-procs", "1", "--warmup-s", "0.2",
                            "--duration-s", "0.3", "--setups", "pool", "--single", "0")
    assert report["vocab"] == (str(shared) if present else ECHO_VOCAB_BUILT_IN)
    assert report["round_trips_per_s"]["pool"] > 0 and "single_client_ms" not in report  # --single 0


def test_backend_bench_workers_take_a_given_vocabulary(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "."]) + "\n")
    out = tmp_path / "backend.json"
    args = [sys.executable, "-m", "bertpool.bench.backend", "--backend", "echo", "--seconds", "0.2", "--parallel",
            "1", "--cycle", "2", "--single-cycle", "2"]
    proc = subprocess.run([*args, "--vocab", str(vocab), "--json", str(out)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["vocab"] == str(vocab) and report["served"][0]["errors"] == 0
    missing = subprocess.run([*args, "--vocab", str(tmp_path / "none.txt")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_backend_bench_reports_ratio_and_latency(tmp_path):
    out = tmp_path / "backend.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.bench.backend", "--backend", "echo",
                           "--echo-delay-ms", "2", "--seconds", "0.3", "--parallel", "1", "--cycle", "3",
                           "--single-cycle", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    served = report["served"][0]
    assert served["tight"]["inferences_per_s"] > 0 and served["inferences_per_s"] > 0
    # The tight loop replayed the served run's own requests: 8 clients x 3, whole.
    assert served["tight"]["requests"] == 24 and served["tight"]["batches"] == 6 * served["tight"]["replays"]
    assert served["errors"] == 0 and served["saturation_server_mean_ms"]["compute_ms"] >= 2.0  # the echo delay
    # Added latency: each request's latency less its own batch's compute (the 2 ms echo delay), then the
    # batch timeout; so it is below the latency less the delay and timeout, never the delay's size more.
    single, timeout_ms = served["single_latency_ms"], 5.0
    added = served["single_added_latency_ms_p50"]
    assert added is not None and -timeout_ms < added < single["max"] - 2.0 - timeout_ms + 1e-6
    assert report["config"]["echo_delay_ms"] == 2.0 and report["config"]["seconds"] == 0.3
    assert_environment(report, "bertpool-bench-backend", proc.args[3:])


def test_backend_bench_rounds_give_each_ratio_and_their_median(tmp_path):
    out = tmp_path / "backend.json"
    args = [sys.executable, "-m", "bertpool.bench.backend", "--backend", "echo", "--echo-delay-ms", "2",
            "--seconds", "0.2", "--parallel", "1", "--cycle", "2", "--single-cycle", "2"]
    proc = subprocess.run([*args, "--rounds", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 3 and all(len(r["served"]) == 1 for r in report["rounds"])
    served = report["served"][0]
    ratios = [r["served"][0]["inferences_per_s"] / r["served"][0]["tight"]["inferences_per_s"]
              for r in report["rounds"]]
    assert served["ratios"] == pytest.approx(ratios, abs=1e-3)  # each against its own round's tight loop
    assert served["ratio_to_tight"] == pytest.approx(sorted(ratios)[1], abs=1e-3) and served["errors"] == 0
    bad = subprocess.run([*args, "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be a whole number >= 1" in bad.stderr


class _RecordingBackend:
    """A stand-in model that records the rows of each batch it is given, by their first token id."""
    batch_size = None

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def predict(self, ids, mask, segments):
        import numpy as np

        self.batches.append([int(row[0]) for row in ids])
        return np.full((len(ids), 2), 0.5, np.float32)


def test_tight_loop_replays_the_served_requests_whole():
    """The tight loop runs the served run's requests (sent_pairs: the pairs each client sends, in
    the order they reach the pool), each as often as the others: before, it looped over the first
    batch of pairs alone, which a compiled model may run in a shorter sequence bucket than the mix
    the served run sends (BERT-Base here: up to about 5% faster a batch), so served / tight read low."""
    import numpy as np

    from bertpool.bench.backend import tight_loop
    from bertpool.clients.bench import BenchConfig, sent_pairs
    from bertpool.common.tokenizer import Features

    order = sent_pairs(BenchConfig(clients=2, cycle=3), 4)
    assert order == [0, 3, 1, 0, 2, 1]  # client 0 sends pairs 0, 1, 2; client 1 pairs 3, 0, 1
    ids = np.arange(4, dtype=np.int32)[:, None] + np.full((1, 8), 200, np.int32)  # row i: all 200 + i
    features = Features(input_ids=ids, input_mask=np.ones_like(ids), segment_ids=np.zeros_like(ids))
    backend = _RecordingBackend()
    result = tight_loop(backend, features, order, 4, seconds=0.0)
    warm, *replayed = backend.batches
    assert warm == [200, 203, 201, 200] and result["replays"] == 1 and result["requests"] == 6
    # One replay: the six requests in order, the last batch padded with dummy rows ([CLS] = 101).
    assert replayed == [[200, 203, 201, 200], [202, 201, 101, 101]]
    backend.batches.clear()
    result = tight_loop(backend, features, order, 4, seconds=0.05)
    assert len(backend.batches) == 1 + 2 * result["replays"] and result["replays"] >= 1
    assert result["batches"] == 2 * result["replays"] and result["inferences_per_s"] > 0


def test_served_runs_sending_the_same_requests_share_one_tight_loop():
    """With a fixed --clients every --parallel value's served run sends the same requests: one tight
    loop measures them for all (it ran once per served run, the same work --seconds again)."""
    from types import SimpleNamespace

    from bertpool.bench.backend import _tight_loops
    from bertpool.workers.backends import BackendConfig

    pairs = default_pairs()[:6]
    same, other = [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]
    loops = _tight_loops(BackendConfig(name="echo"), None, pairs, {1: same, 2: list(same), 4: other},
                         SimpleNamespace(batch_size=4, seconds=0.0))
    assert loops[1] is loops[2] and loops[4] is not loops[1]
    assert loops[1]["requests"] == loops[4]["requests"] == 6


@pytest.mark.parametrize("duration_s", [None, 1.0])
def test_pair_position_is_what_each_client_sends(duration_s):
    from bertpool.clients.bench import BenchConfig, pair_position

    config = BenchConfig(clients=3, cycle=4, duration_s=duration_s)
    sent = [[pair_position(config, client, i) for i in range(4)] for client in range(3)]
    if duration_s is None:  # a run of its own each
        assert sent == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    else:  # interleaved
        assert sent == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_beyond_compute_is_taken_request_by_request():
    """Each reply's latency less its own batch's compute: not the median latency less the mean compute
    (here 20 - 11/3), which a slow batch would blur. Replies without a compute time are left out."""
    from bertpool.clients.bench import BenchConfig, _ClientResult, summarize

    timings = [{"compute_ms": 9.0}, {"compute_ms": 1.0}, {"compute_ms": 1.0}, {}]
    result = _ClientResult([10.0, 20.0, 30.0, 40.0], [], timings, {}, 0.0, 1.0)
    beyond = summarize(BenchConfig(address="ipc:///nowhere", clients=1, cycle=4), [result])["beyond_compute_ms"]
    assert (beyond["p50"], beyond["max"]) == (19.0, 29.0)


def test_quality_counts_each_pair_once_with_its_first_answer():
    from bertpool.clients.bench import quality

    q = quality([(1, 1, 0), (0, 1, 0), (0, 0, 1), (1, None, 2)])  # pair 0 answered twice, differently
    assert q["n"] == 2 and q["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}
    assert q["inconsistent_pairs"] == 1 and q["accuracy"] == 1.0
    assert quality([(1, None, 0)]) is None


# ------------------------------------------------------------------ sweeps, plots, progress, failures

def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def assert_no_nan(*texts: str) -> None:
    for text in texts:
        assert "nan" not in text.lower().replace("nanos", ""), text


def test_sweep_writes_one_record_per_concurrency(start_pool, tmp_path):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    out = tmp_path / "sweep.json"
    proc = run("--address", pool.address, "--sweep-clients", "1,3", "--cycle", "4", "--warmup", "1",
               "--model-note", "echo pool", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["sweep_clients"] == [1, 3] and report["ok"] is True and report["stopped"] is None
    steps = report["steps"]
    assert [s["clients"] for s in steps] == [1, 3]
    assert [s["requests"] for s in steps] == [4, 12] and [s["replies"] for s in steps] == [4, 12]
    for s in steps:
        assert s["errors"] == 0 and s["errors_by_type"] == {} and s["throughput_per_s"] > 0
        lat = s["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert 0.0 <= s["accuracy"] <= 1.0  # the shipped pairs are labelled
        assert sum(s["latency_histogram_ms"]["counts"]) == s["replies"]
    assert report["requests"] == 16 and report["pool"]["workers"] == 2 and report["backends"] == {"echo": 2}
    assert report["model_note"] == "echo pool"
    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["clients", "requests", "errors"]
    assert table[1].split()[:3] == ["1", "4", "0"] and table[2].split()[:3] == ["3", "12", "0"]
    assert "WARNING: echo workers answered" in proc.stdout
    assert "%|" not in proc.stderr  # no progress bar when stderr is not a terminal
    stats = pool.wait_stats(lambda s: s["totals"]["inferences"] >= 16 + 4)
    assert stats["broker"]["replies"] == 16 + 4  # measured plus one warm-up per client per step
    # ... which the sweep totals, as a single run's report does
    assert report["warmup_replies"] == 4 and stats["broker"]["replies"] == report["replies"] + report["warmup_replies"]
    assert report["client_retries"] == {"busy_retries": 0, "lost_resends": 0, "reconnects": 0}


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")
def test_sweep_plot_is_a_real_png(start_pool, tmp_path):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    proc = run("--address", pool.address, "--sweep-clients", "1,2", "--duration-s", "0.3", "--warmup", "1",
               "--json", str(out), "--plot", str(png), "--model-note", "echo")
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # two panels of axes, lines, labels
    report = json.loads(out.read_text())
    assert report["config"]["duration_s"] == 0.3
    assert all(s["requests"] > 0 and s["elapsed_s"] >= 0.3 for s in report["steps"])
    # The saved report draws again on its own.
    again = tmp_path / "again.png"
    proc = subprocess.run([sys.executable, "-m", "bertpool.clients.plot", str(out), str(again)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert again.stat().st_size > 20_000


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    from bertpool.clients import bench

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "x.png"
    # Refused before any run: the address is never tried.
    rc = bench.main(["--address", "ipc:///nonexistent-bertpool", "--plot", str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "matplotlib" in err and "bertpool[plot]" in err
    assert not png.exists()


def test_bench_against_a_dead_address_says_no_broker_answered(tmp_path):
    from conftest import free_tcp_port

    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    out = tmp_path / "bench.json"
    proc = run("--address", address, "--clients", "2", "--cycle", "2", "--connect-timeout-s", "1",
               "--json", str(out), "--plot", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert f"no broker answered at {address} within 1 s" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and f"no broker answered at {address}" in report["error"]["message"]
    assert all(v is None for v in report["latency_ms"].values())
    # The keys of a run's report, nothing measured: a reader of reports needs no second schema.
    from bertpool.clients.bench import BenchConfig, _ClientResult, summarize

    run_keys = set(summarize(BenchConfig(clients=1), [_ClientResult([1.0], [(1, 1, 0)], [{"compute_ms": 0.1}], {},
                                                                    0.0, 1.0)]))
    assert run_keys | {"pool", "backends", "diagnosis", "ok", "pairs_source", "model_note"} <= set(report)
    assert_no_nan(proc.stdout, proc.stderr, out.read_text())
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def broker_only(tmp_path):
    """A broker with no workers: STATS answers, requests wait in the queue and time out."""
    front = f"ipc://{tmp_path}/front.ipc"
    proc = subprocess.Popen([sys.executable, "-m", "bertpool.broker.broker", "--address", front,
                             "--worker-address", f"ipc://{tmp_path}/back.ipc", "--stats-interval-s", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from bertpool.clients.bench import try_stats

        assert try_stats(front, 30.0) is not None, "the broker did not answer STATS"
        yield front
    finally:
        proc.terminate()
        proc.wait(30)


def test_failed_requests_are_reported_by_type_with_a_sample(broker_only, tmp_path):
    out = tmp_path / "bench.json"
    proc = run("--address", broker_only, "--clients", "1", "--cycle", "2", "--warmup", "0",
               "--timeout-s", "0.3", "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 2 and report["replies"] == 0 and report["ok"] is False
    assert report["errors_by_type"] == {"DeadlineExceeded": 2}
    assert "got no reply within its" in report["error_samples"]["DeadlineExceeded"]
    assert "no ready workers" in report["diagnosis"]
    assert all(v is None for v in report["latency_ms"].values()) and report["throughput_per_s"] == 0.0
    assert "DeadlineExceeded x 2, e.g.: " in proc.stdout and "no ready workers" in proc.stdout
    assert "p50 -  p90 -" in proc.stdout
    # Said before the run (STATS showed no workers), not only once every request had timed out; not refused.
    assert (f"bertpool-bench: warning: the broker at {broker_only} has no ready workers yet; each request "
            f"waits up to --timeout-s 0.3 s for one (use --wait-workers N to wait first)") in proc.stderr
    assert_no_nan(proc.stdout, proc.stderr, out.read_text())


@pytest.mark.parametrize("quiet", [True, False])
def test_a_broker_gone_mid_run_still_says_echo_served(start_pool, tmp_path, quiet):
    """The broker is killed during the run, so STATS after it fails: the backends seen before the run
    still give "served by" and the echo warning. The clients' Client log lines ("presuming the broker
    ... dead") say whose they are, or with --quiet do not show."""
    pool = start_pool("--backend", "echo", parallel=1)
    out = tmp_path / "bench.json"
    bench = subprocess.Popen([*BENCH, "--address", pool.address, "--clients", "1", "--warmup", "0",
                              "--duration-s", "3", "--timeout-s", "4", "--connect-timeout-s", "1", "--json",
                              str(out), *(["--quiet"] if quiet else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pool.wait_stats(lambda s: s["broker"]["requests"] > 20)  # the measured phase runs
        os.killpg(pool.process.pid, signal.SIGKILL)
        stdout, stderr = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 1, stderr
    report = json.loads(out.read_text())
    # One closed-loop client: the broker's 21st request came after its 20th reply (the 21st may be the
    # one the kill cut off), so at least 20 replies, not 21.
    assert report["replies"] >= 20 and report["errors"] > 0 and report["backends"] == {"echo": 1}
    assert "(it answered before the run: it went away)" in report["diagnosis"]
    assert "served by  1 x echo" in stdout and "WARNING: echo workers answered" in stdout
    assert "Traceback" not in stderr, stderr
    logged = [line for line in stderr.splitlines() if "presuming" in line]  # the client library's lines
    assert all(line.startswith("bertpool-bench: warning: bertpool.client: ") for line in logged), stderr
    if quiet:
        assert "presuming" not in stderr
    else:
        assert "bertpool-bench: warning: bertpool.client: presuming the broker" in stderr


def test_a_sweep_whose_broker_went_away_says_it_answered_before(monkeypatch, tmp_path):
    """Steps 1 and 3 ran (3's workers were gone: no backends in its STATS), then no broker answered
    step 2's STATS: the sweep says it went away, not that nothing ever answered, and the backends
    of every step still give "served by" and the echo warning."""
    from bertpool.clients import bench, sweep

    address = f"ipc://{tmp_path}/gone.ipc"
    config = bench.BenchConfig(address=address, clients=1, cycle=1, connect_timeout_s=0.3)

    def step(clients, errors, backends):
        result = bench._ClientResult([1.0] * (clients - errors), [], [{}] * (clients - errors),
                                     {"DeadlineExceeded": errors} if errors else {}, 0.0, 1.0)
        report = bench.summarize(replace(config, clients=clients), [result])
        pool = {"workers": sum(backends.values()), "backends": backends}
        return {**report, "pool": pool, "backends": backends, "diagnosis": None, "ok": not errors}

    steps = {1: step(1, 1, {"echo": 1}), 3: step(3, 3, {})}

    def fake_run_bench(step_config, pairs, progress=False, desc=None):
        if step_config.clients in steps:
            return steps[step_config.clients]
        return bench.probe_broker(step_config.address, step_config.connect_timeout_s)  # raises: none there

    monkeypatch.setattr(sweep, "run_bench", fake_run_bench)
    report = sweep.run_sweep(config, [1, 3, 2], [])
    assert report["stopped"]["clients"] == 2 and report["backends"] == {"echo": 1}
    assert report["diagnosis"].endswith("(it answered the earlier steps: it went away)")
    assert f"no broker answered at {address} within 0.3 s" in report["diagnosis"]
    text = sweep.format_sweep(report)
    assert "nothing ever answered" not in text
    assert "step with 1 client: errors by type:" in text and "step with 3 clients: errors by type:" in text
    assert "sweep stopped at 2 clients" in text
    assert "served by  1 x echo" in text and "WARNING: echo workers answered" in text
    # A cause that says more than a timeout is kept.
    from bertpool.common.errors import BrokerUnavailable, RequestTimeout

    def refused(step_config, pairs, progress=False, desc=None):
        if step_config.clients == 1:
            return steps[1]
        raise RequestTimeout("no STATS reply") from BrokerUnavailable("the broker refused our CURVE key")

    monkeypatch.setattr(sweep, "run_bench", refused)
    report = sweep.run_sweep(config, [1, 4], [])
    assert "(BrokerUnavailable: the broker refused our CURVE key)" in report["diagnosis"], report["diagnosis"]


@pytest.mark.parametrize("report, workers", [
    ({"pool": {"workers": 2, "backends": {"echo": 2}}, "backends": {"echo": 2}}, "\n2 workers (2 x echo);"),
    ({"pool": {"workers": 0, "backends": {}}, "backends": {}}, "\n0 workers;"),  # STATS answered: none ready
    ({"pool": {"workers": 0, "backends": {}}, "backends": {"echo": 1}}, "\n1 worker (1 x echo);"),  # gone after
    ({"pool": None, "backends": None}, "\nworkers: unknown (no STATS);"),
])
def test_plot_title_says_what_stats_said_of_the_workers(report, workers):
    from bertpool.clients.plot import chart_title

    assert workers in chart_title(report)


def test_summary_of_zero_replies_has_no_nan():
    from bertpool.clients.bench import BenchConfig, _ClientResult, format_report, summarize

    result = _ClientResult([], [], [], {"ServerBusy": 3}, 0.0, 1.0, {"ServerBusy": "queue full"})
    report = {**summarize(BenchConfig(clients=1), [result]), "diagnosis": None}
    text = format_report(report)
    assert report["latency_ms"]["p50"] is None and report["latency_histogram_ms"] is None
    assert "ServerBusy x 3, e.g.: queue full" in text
    assert "server mean ms  queue -  batch wait -  compute -;  rows per batch -" in text  # not a dict of None
    assert "None" not in text and "{" not in text
    assert_no_nan(text, json.dumps(report, allow_nan=False))


@pytest.mark.parametrize("value, message", [
    ("1,x", "comma-separated integers"),
    ("0,4", "must be >= 1"),
    ("4,4", "a count twice"),
    ("", "comma-separated integers"),
])
def test_bad_sweep_lists_are_clear_errors(value, message):
    proc = run("--address", "ipc:///nonexistent-bertpool", "--sweep-clients", value)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--clients", "4", "--sweep-clients", "1,2"], "not allowed with argument"),
    (["--duration-s", "0"], "--duration-s must be > 0"),
    (["--connect-timeout-s", "0"], "--connect-timeout-s must be > 0"),
    (["--cycle", "5", "--duration-s", "1"], "--cycle 5 and --duration-s 1 cannot be combined"),
])
def test_bad_load_flags_are_clear_errors(args, message):
    proc = run("--address", "ipc:///nonexistent-bertpool", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet():
    from bertpool.clients.bench import show_progress

    assert show_progress(False, FakeTerminal()) is True
    assert show_progress(True, FakeTerminal()) is False
    assert show_progress(False, io.StringIO()) is False


def test_progress_bar_shows_live_throughput_during_a_run(start_pool):
    from bertpool.clients.bench import BenchConfig, run_bench
    from bertpool.common.data import default_pairs

    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=1)
    terminal = FakeTerminal()
    report = run_bench(BenchConfig(address=pool.address, clients=1, cycle=5, warmup=0), default_pairs(),
                       progress=True, progress_stream=terminal)
    assert report["replies"] == 5
    drawn = terminal.getvalue()
    assert "1 client:" in drawn and "5/5" in drawn and "replies/s" in drawn and "errors=0" in drawn


def test_progress_bar_rate_counts_replies_not_failures():
    """Two failed requests and no reply: the bar shows 0 replies (and no rate of them), and the errors."""
    from bertpool.clients.bench import Progress

    terminal, counters = FakeTerminal(), [0, 0]  # one client: replies, errors
    bar = Progress(counters, 2, "1 client", terminal)
    counters[1] = 2
    bar.update()
    bar.close()
    drawn = terminal.getvalue()
    assert "0/2" in drawn and "2/2" not in drawn and "errors=2" in drawn and "req/s" not in drawn, drawn


# --------------------------------------------------------- next_result: the benches' bounded wait on a queue

def test_next_result_returns_an_item_as_soon_as_one_arrives():
    """Already there: no slice waited out; put while it waits: returned at once, not at the deadline."""
    import multiprocessing as mp
    import queue
    import threading
    import time

    from bertpool.clients.bench import next_result

    ready = mp.get_context("spawn").Queue()
    ready.put(("ok", 0, "first"))
    assert next_result(ready, time.monotonic() + 30, "late", on_empty=pytest.fail) == ("ok", 0, "first")
    ready.close()
    ready.join_thread()

    results, waited = queue.Queue(), threading.Event()
    feeder = threading.Thread(target=lambda: waited.wait(10) and results.put("second"), daemon=True)
    feeder.start()
    started = time.monotonic()
    assert next_result(results, started + 30, "late", on_empty=waited.set, slice_s=0.05) == "second"
    assert waited.is_set() and time.monotonic() - started < 10  # the item, not the 30 s deadline, ended it
    feeder.join(10)


def test_next_result_raises_the_bench_error_after_the_deadline_running_the_check_each_slice():
    import queue
    import time

    from bertpool.clients.bench import next_result
    from bertpool.common.errors import BenchError

    slices: list[float] = []
    started = time.monotonic()
    with pytest.raises(BenchError, match="^the load processes reported nothing within 0.2 s$"):
        next_result(queue.Queue(), started + 0.2, "the load processes reported nothing within 0.2 s",
                    on_empty=lambda: slices.append(time.monotonic()), slice_s=0.05)
    assert time.monotonic() - started >= 0.2
    assert 1 <= len(slices) <= 0.2 / 0.05 + 2, slices  # each slice waited its 0.05 s (or what was left), none spun
    with pytest.raises(BenchError, match="late"):  # a deadline already past: at once, nothing waited
        next_result(queue.Queue(), time.monotonic() - 1, "late", on_empty=pytest.fail)


def test_next_result_propagates_what_the_per_slice_check_raises():
    """The caller's check (e.g. a load process exited) ends the wait with its own error, before the deadline."""
    import queue
    import time

    from bertpool.clients.bench import next_result
    from bertpool.common.errors import BenchError

    dead = BenchError("a load process exited with code 1 (its error, if any, is above)")

    def check() -> None:
        raise dead

    started = time.monotonic()
    with pytest.raises(BenchError) as raised:
        next_result(queue.Queue(), started + 30, "late", on_empty=check, slice_s=0.01)
    assert raised.value is dead and raised.value.__context__ is None  # as is, not "while handling Empty"
    assert time.monotonic() - started < 10


def test_clients_that_do_not_start_are_a_bench_error_not_a_request_error(start_pool):
    """The bench's own machinery failing is BenchError; RequestError is kept for requests."""
    from bertpool.clients.bench import BenchConfig, run_bench
    from bertpool.common.data import default_pairs
    from bertpool.common.errors import BenchError, RequestError

    pool = start_pool("--backend", "echo", parallel=1)
    with pytest.raises(BenchError, match="did not all start") as err:
        run_bench(BenchConfig(address=pool.address, clients=2, cycle=1, warmup=0, start_timeout_s=0.001),
                  default_pairs())
    assert not isinstance(err.value, RequestError)


def test_a_client_failing_while_warming_up_ends_the_wait_with_its_reason(start_pool):
    """A bench client that dies before the barrier breaks it, so the bench fails at once with the
    client's own error instead of waiting out start_timeout_s."""
    from bertpool.clients.bench import BenchConfig, run_bench
    from bertpool.common.errors import BenchError

    pool = start_pool("--backend", "echo", parallel=1)
    with pytest.raises(BenchError, match="failed while warming up: client 0: AttributeError"):
        run_bench(BenchConfig(address=pool.address, clients=1, cycle=1, warmup=1, start_timeout_s=300),
                  [("plain", "tuples are not Pairs")])


@pytest.mark.parametrize("module, args, message", [
    ("bertpool.bench.backend", [], "the tf backend needs --model"),
    ("bertpool.bench.backend", ["--backend", "echo", "--parallel", "0"], "must be a whole number >= 1"),
    ("bertpool.bench.backend", ["--backend", "echo", "--single-cycle", "0"], "--single-cycle"),
    ("bertpool.bench.backend", ["--backend", "echo", "--seconds", "nan"], "--seconds must be > 0 and at most 86400 s"),
    ("bertpool.bench.backend", ["--backend", "echo", "--seconds", "abc"], "abc: not a number of seconds"),
    ("bertpool.bench.relay", ["--duration-s", "0"], "--duration-s must be > 0 and at most 86400 s"),
    ("bertpool.bench.relay", ["--warmup-s", "inf"], "--warmup-s must be >= 0 and at most 86400 s"),
    ("bertpool.bench.relay", ["--warmup-s", "nan"], "--warmup-s must be >= 0"),
    ("bertpool.bench.relay", ["--setups", ""], "--setups must name some of"),
    ("bertpool.bench.relay", ["--clients", "0"], "--clients must be >= 1"),
    ("bertpool.bench.relay", ["--workers", "100000"], "--workers must be at most"),  # forked until killed
    ("bertpool.bench.relay", ["--load-procs", "0"], "--load-procs must be >= 1"),
    ("bertpool.bench.relay", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bertpool.bench.relay", ["--rounds", "1000"], "--rounds must be at most 100 (each runs every set-up)"),
    ("bertpool.bench.faults", ["--parallel", "100000"], "parallel must be at most"),  # serve refused it, late
    ("bertpool.bench.faults", ["--client-procs", "0"], "client_procs must be >= 1"),
    ("bertpool.bench.relay", ["--setups", "broker", "--metrics-address", "99999"], "--metrics-address"),
    ("bertpool.clients.bench", ["--wait-workers", "1", "--wait-timeout-s", "nan"], "--wait-timeout-s must be > 0"),
    ("bertpool.clients.bench", ["--json", "/nonexistent-bertpool/x.json"], "does not exist"),
    ("bertpool.bench.relay", ["--json", "/"], "is a directory"),
    ("bertpool.clients.bench", ["--plot", "/"], "is a directory"),
    ("bertpool.clients.bench", ["--duration-s", "inf"], "--duration-s must be > 0 and at most 86400 s"),
    ("bertpool.clients.bench", ["--timeout-s", "1e12"], "--timeout-s must be > 0 and at most 86400 s"),
    ("bertpool.clients.bench", ["--plot", "/nonexistent-bertpool/sweep.png"], "does not exist"),
    pytest.param("bertpool.clients.bench", ["--plot", "sweep.txt"], "--plot sweep.txt: matplotlib cannot write .txt",
                 marks=pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")),
    ("bertpool.bench.faults", ["--duration-s", "0"], "duration_s must be > 0 and at most 86400 s"),
    ("bertpool.bench.faults", ["--kill-every-s", "-1"], "kill_every_s must be > 0 and at most 86400 s"),
    ("bertpool.bench.faults", ["--stop-for-s", "nan"], "stop_for_s must be > 0 and at most 86400 s"),
    ("bertpool.bench.faults", ["--client-timeout-s", "inf"], "client_timeout_s must be > 0 and at most 86400 s"),
    ("bertpool.bench.faults", ["--echo-delay-ms", "-5"], "echo_delay_ms must be a number >= 0"),
    ("bertpool.bench.faults", ["--phases", ","], "phases must be one or more of"),
    ("bertpool.bench.faults", ["--phases", "kill,crash"], "phases must be one or more of"),
    ("bertpool.bench.faults", ["--heartbeat-liveness", "0"], "heartbeat_liveness must be"),
    # Upper bounds: a typo is refused at once, not a fork bomb, a hang or an OverflowError traceback.
    ("bertpool.clients.bench", ["--clients", "99999999999999999999"], "--clients must be at most 4096"),
    ("bertpool.clients.bench", ["--cycle", "99999999999999999999"], "--cycle must be at most 1000000"),
    ("bertpool.clients.bench", ["--sweep-clients", "1,5000"], "--sweep-clients counts must be at most 4096"),
    ("bertpool.bench.relay", ["--clients", "99999999999999999999"], "--clients must be at most 4096"),
    ("bertpool.bench.backend", ["--backend", "echo", "--clients", "5000"], "--clients must be at most 4096"),
    ("bertpool.bench.backend", ["--backend", "echo", "--cycle", "2000000"], "--cycle must be at most 1000000"),
    ("bertpool.bench.backend", ["--backend", "echo", "--parallel", "64", "--batch-size", "64"],
     "takes 8192 clients, more than 4096; give --clients"),
    ("bertpool.bench.faults", ["--clients", "5000"], "clients must be at most 4096"),
    # Contradictions.
    ("bertpool.bench.faults", ["--stop-for-s", "20", "--stop-every-s", "10"],
     "stop_for_s (20) must be less than stop_every_s (10)"),
    ("bertpool.bench.faults", ["--client-procs", "8", "--clients", "2"],
     "client_procs (8) must be at most clients (2)"),
    # A --json or --plot that cannot be written is refused before the run (its directory exists, so
    # output_file passed it, and the whole run was lost); small loads, should the check be missing.
    ("bertpool.clients.bench", ["--json", "/proc/bertpool-bench.json"],
     "cannot write --json /proc/bertpool-bench.json: No such file or directory"),
    pytest.param("bertpool.clients.bench", ["--plot", "/proc/bertpool-bench.png"],
                 "cannot write --plot /proc/bertpool-bench.png", marks=pytest.mark.skipif(
                     not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")),
    ("bertpool.bench.relay", ["--setups", "relay", "--clients", "2", "--workers", "1", "--load-procs", "1",
                              "--duration-s", "0.3", "--single", "0", "--json", "/proc/bertpool-relay.json"],
     "cannot write --json /proc/bertpool-relay.json"),
    ("bertpool.bench.backend", ["--backend", "echo", "--seconds", "0.2", "--parallel", "1", "--cycle", "1",
                                "--single-cycle", "1", "--json", "/proc/bertpool-backend.json"],
     "cannot write --json /proc/bertpool-backend.json"),
    ("bertpool.bench.faults", ["--duration-s", "1", "--clients", "2", "--client-procs", "1", "--parallel", "2",
                               "--kill-every-s", "0.5", "--phases", "kill", "--json", "/proc/bertpool-faults.json"],
     "cannot write --json /proc/bertpool-faults.json"),
    ("bertpool.bench.gateway", ["--clients", "1", "--cycle", "1", "--parallel", "1", "--modes", "native",
                                "--json", "/proc/bertpool-gateway.json"], "cannot write --json /proc/bertpool-gateway.json"),
    # --warmup had no upper bound: a typo ran until the start timeout, said as "did not all start".
    ("bertpool.clients.bench", ["--warmup", "99999999999"], "--warmup must be at most 1000000"),
    ("bertpool.bench.gateway", ["--clients", "1", "--parallel", "1", "--modes", "native", "--warmup", "99999999999"],
     "--warmup must be at most 1000000"),
    # Repeats that were run (or dropped) without a word, each report row then ambiguous.
    ("bertpool.bench.gateway", ["--clients", "1", "--cycle", "1", "--parallel", "1", "--modes", "native,native"],
     "--modes names a mode twice"),
    ("bertpool.bench.backend", ["--backend", "echo", "--seconds", "0.2", "--cycle", "1", "--single-cycle", "1",
                                "--parallel", "1,1"], "a worker count twice"),
    # serve's own bound, refused by serve only after the pool was started and waited on.
    ("bertpool.bench.gateway", ["--parallel", "100000"], "bertpool-bench-gateway: error: --parallel must be at most"),
    pytest.param("bertpool.clients.bench", ["--plot", "noext"],
                 "--plot noext: no suffix to name the image format; give one of ", marks=pytest.mark.skipif(
                     not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")),
])
def test_bench_commands_refuse_bad_values_before_running(module, args, message):
    """One line and exit 2, at once: no traceback, no hang on a NaN wait, no report lost after a run."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not proc.stdout, proc.stdout  # refused before any part of the run (bench-backend's tight loop)


def test_every_bench_faults_flag_says_what_it_does():
    from bertpool.bench.faults import build_parser

    undocumented = [a.option_strings[0] for a in build_parser()._actions if not a.help]
    assert not undocumented


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_an_interrupted_bench_stops_its_clients_and_says_so(start_pool, tmp_path, how):
    """SIGTERM (or Ctrl-C to the whole group) mid-run: one line and exit 143 (130), no traceback from
    any process, and no client process left running (they were orphaned and hung forever)."""
    pool = start_pool("--backend", "echo", parallel=1)
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        bench = subprocess.Popen([sys.executable, "-m", "bertpool.clients.bench", "--address", pool.address,
                                  "--clients", "3", "--duration-s", "120", "--quiet"],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pool.wait_stats(lambda s: s["broker"]["requests"] > 30)  # the clients are running
        clients = children_of(bench.pid)
        assert len(clients) >= 3, clients
        if how == "sigterm":
            bench.send_signal(signal.SIGTERM)
        else:
            os.killpg(bench.pid, signal.SIGINT)
        assert bench.wait(30) == (143 if how == "sigterm" else 130)
        assert not wait_gone(clients, 30), "bench clients outlived the bench"
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    text = log.read_text()
    said = "terminated" if how == "sigterm" else "interrupted"
    assert f"bertpool-bench: {said}; its clients were stopped" in text and "Traceback" not in text, text


def test_a_bench_cycle_longer_than_a_poll_can_wait_runs_without_a_bar(start_pool, tmp_path):
    """--cycle 40000 x --timeout-s 60 is more than poll() can wait in one go: with no progress bar
    (output to a file) the bench waited for its clients in one such call and died of OverflowError
    at once; it waits in slices now, so it runs until stopped."""
    pool = start_pool("--backend", "echo", parallel=1)
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        bench = subprocess.Popen([*BENCH, "--address", pool.address, "--clients", "1", "--cycle", "40000"],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pool.wait_stats(lambda s: s["broker"]["requests"] > 30)  # measuring
        assert bench.poll() is None, log.read_text()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 143
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_a_run_where_every_request_was_refused_says_so_with_the_code(start_pool):
    """ERROR replies are answers: the diagnosis says the pool refused the requests, and why, not that
    no request got a reply."""
    from bertpool.clients.bench import BenchConfig, run_bench
    from bertpool.common.data import Pair

    pool = start_pool("--backend", "echo", parallel=1)
    report = run_bench(BenchConfig(address=pool.address, clients=1, cycle=2, warmup=0), [Pair("", "b", None)])
    assert report["ok"] is False and report["errors_by_type"] == {"RemoteError": 2}
    assert report["diagnosis"] == (f"the broker at {pool.address} answers, but every request was refused with an "
                                   f"ERROR reply, e.g. bad_text: text_a: empty text")


def test_a_run_that_measured_nothing_is_not_a_success(start_pool, tmp_path):
    """A --duration-s shorter than one request measures no request: exit 1 and a diagnosis saying so,
    not exit 0 with "requests 0 errors 0"."""
    pool = start_pool("--backend", "echo", parallel=1)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "1", "--duration-s", "1e-9", "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 0 and report["ok"] is False
    assert report["diagnosis"].startswith("no request was measured: each client's --duration-s 1e-09 s ended")
    assert "diagnosis: no request was measured" in proc.stdout and "Traceback" not in proc.stderr


def test_a_json_report_that_cannot_be_written_is_one_line_and_exit_2(start_pool):
    """--json on a full disk (/dev/full): the report is on stdout already; one line, exit 2, no traceback."""
    pool = start_pool("--backend", "echo", parallel=1)
    proc = run("--address", pool.address, "--clients", "1", "--cycle", "2", "--json", "/dev/full")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("bertpool-bench: error: cannot write --json /dev/full: "
                                                    "No space left on device")
    assert "requests 2  errors 0" in proc.stdout


def test_bench_broker_json_that_cannot_be_written_is_one_line_and_exit_2():
    """The other benches wrote their --json with a bare write_text: a traceback after the whole run."""
    proc = subprocess.run([sys.executable, "-m", "bertpool.bench.relay", "--setups", "relay", "--clients", "2",
                           "--workers", "1", "--load-procs", "1", "--warmup-s", "0", "--duration-s", "0.2",
                           "--single", "0", "--json", "/dev/full"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("bertpool-bench-broker: error: cannot write --json /dev/full: "
                                                    "No space left on device")


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")
def test_a_plot_name_without_a_suffix_is_refused_not_renamed(tmp_path, monkeypatch, capsys):
    """matplotlib's savefig adds its default suffix to a name without one: noext became noext.png."""
    from bertpool.clients import plot

    monkeypatch.chdir(tmp_path)
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"latency_ms": {"p50": None}}))
    assert plot.main([str(report), "noext"]) == 2
    assert "output noext: no suffix to name the image format; give one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [report]


def test_backend_bench_with_failed_served_requests_exits_1(monkeypatch, tmp_path, capsys):
    """Served requests that all failed (the pool refuses an empty text) measure nothing: the report is
    written, then one line and exit 1, not "0.0 inf/s" and exit 0."""
    from bertpool.bench import backend
    from bertpool.common.data import Pair

    monkeypatch.setattr(backend, "load_pairs", lambda tsv: ([Pair("", "b", None)], "empty text"))
    out = tmp_path / "backend.json"
    assert backend.main(["--backend", "echo", "--seconds", "0.2", "--parallel", "1", "--clients", "2", "--cycle",
                         "1", "--single-cycle", "1", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert ("bertpool-bench-backend: error: 1 served run had failed requests; first, round 1 x1: 3 of 3 "
            "requests failed, e.g. RemoteError: bad_text: text_a: empty text") in err
    assert json.loads(out.read_text())["served"][0]["errors"] == 3


def test_broker_bench_checks_its_metrics_address_and_vocabulary_before_any_setup(tmp_path):
    """A bad --metrics-address was found only by the broker set-up, after the relay's whole run; an
    empty --vocab only by each pool worker, in a traceback, while the bench waited for them."""
    args = [sys.executable, "-m", "bertpool.bench.relay", "--clients", "1", "--workers", "1", "--load-procs", "1",
            "--warmup-s", "0.1", "--duration-s", "0.2", "--single", "0"]
    proc = subprocess.run([*args, "--setups", "relay,broker", "--metrics-address", "abc"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--metrics-address 'abc'" in proc.stderr
    assert "round trips/s" not in proc.stdout, proc.stdout  # no set-up ran
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run([*args, "--setups", "relay,pool", "--vocab", str(empty)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"vocabulary file '{empty}' is empty" in proc.stderr and "round trips/s" not in proc.stdout


def test_broker_bench_stops_at_once_when_a_pool_worker_cannot_load(tmp_path):
    """A pool worker that cannot load says so in one line and exits; the bench stops then, instead of
    waiting out its 60 s for a worker that will never come."""
    import time

    from bertpool.bench.relay import measure, request_body
    from bertpool.common.errors import BenchError

    empty = tmp_path / "empty.txt"
    empty.write_text("")  # past main's own check: straight to the workers
    started = time.monotonic()
    with pytest.raises(BenchError, match="a worker process exited with code 2"):
        measure("pool", 1, 1, 1, 0.1, 0.1, request_body("text"), vocab=str(empty))
    assert time.monotonic() - started < 45


# --------------------------------------------------------- benches that start pools: SIGTERM

def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        kids = [k for p in todo for k in _children(p)]
        found += kids
        todo = kids
    return found


def _children(pid: int) -> list[int]:
    try:
        return children_of(pid)
    except FileNotFoundError:  # it ended meanwhile
        return []


def pool_address_of(bench: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The client address of the bertpool-serve that ``bench`` started, from its command line."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and bench.poll() is None:
        for pid in _children(bench.pid):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            except FileNotFoundError:
                continue
            if "bertpool.pool.serve" in " ".join(argv):
                return argv[argv.index("--address") + 1]
        time.sleep(0.1)  # polling /proc: no event announces a child
    raise AssertionError(f"bench {bench.pid} started no bertpool-serve within {timeout_s} s (exit {bench.poll()})")


def interrupt_a_bench_with_a_pool(argv: list[str], prog: str, log, sig: int = signal.SIGTERM) -> None:
    """Start the bench ``argv``, wait until its pool answers and its clients send requests, send it
    ``sig``: with SIGTERM it must exit 143 saying so; with SIGKILL it has no say. Either way no process
    it started (its pool, the pool's workers and gateway, its clients) may outlive it."""
    import time

    from bertpool.clients.bench import wait_for_workers
    from bertpool.clients.client import Client

    with open(log, "wb") as out:
        bench = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[int] = []
    try:
        address = pool_address_of(bench)
        wait_for_workers(address, 1, timeout_s=120)
        with Client(address) as client:  # the load runs: every process the bench starts is up
            deadline = time.monotonic() + 120
            while client.stats()["broker"]["requests"] < 10:
                assert time.monotonic() < deadline, "the bench's clients sent no requests"
                time.sleep(0.1)  # polling the broker's counter: no event exists to wait on
        started = descendants(bench.pid)
        assert len(started) >= 3, started  # the pool, its workers, the clients
        bench.send_signal(sig)
        assert bench.wait(120) == (143 if sig == signal.SIGTERM else -sig), log.read_text()
        assert not wait_gone(started, 30), f"processes outlived {prog}:\n{log.read_text()}"
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
        for pid in descendants(bench.pid) + started:  # none, unless the test failed: never leave them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    if sig == signal.SIGTERM:
        assert f"{prog}: terminated; its pool and clients were stopped, no report" in text, text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_bench_faults_sigterm_stops_its_pool_and_clients(tmp_path, sig):
    """SIGTERM (timeout, kill) killed bench-faults by the default action: its finally never ran, and
    its pool (serve, its workers) ran on for good. After a SIGKILL, which nothing can catch, serve
    stops with its parent (child_env, exit_with_parent) and takes its workers along."""
    interrupt_a_bench_with_a_pool(
        [sys.executable, "-m", "bertpool.bench.faults", "--clients", "2", "--client-procs", "1", "--parallel", "2",
         "--duration-s", "600", "--phases", "kill", "--kill-every-s", "600", "--echo-delay-ms", "1"],
        "bertpool-bench-faults", tmp_path / "bench.log", sig)


# ------------------------------------------------------------------ plots of odd reports (audit)

def _run_record(clients: int = 4, errors: int = 0, p50: float | None = 3.0) -> dict:
    """A minimal run record as summarize() writes it, with a histogram spanning 2..15 ms."""
    replies = 0 if p50 is None else 40
    return {"config": {"clients": clients}, "clients": clients, "requests": replies + errors, "replies": replies,
            "errors": errors, "errors_by_type": {"DeadlineExceeded": errors} if errors else {},
            "throughput_per_s": 500.0 if replies else 0.0,
            "latency_ms": {"p50": p50, "p90": None if p50 is None else 9.0, "p99": None if p50 is None else 14.0,
                           "p999": None, "mean": None, "max": None},
            "latency_histogram_ms": None if p50 is None else {"edges": [2.0, 4.0, 8.0, 15.0], "counts": [10, 20, 10]},
            "server_mean": None, "pool": None, "backends": None}


def _failure_report() -> dict:
    from bertpool.clients.bench import BenchConfig, failure_report
    from bertpool.common.errors import RequestTimeout

    return failure_report(BenchConfig(clients=2), RequestTimeout("no broker answered at ipc:///x within 1 s"))


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")
@pytest.mark.parametrize("content, message", [
    ("null", "is not a bertpool-bench report: a JSON object was expected, it holds null"),
    ("[1, 2]", "a JSON object was expected, it holds an array"),
    ('{"latency_ms": {"p50": 1}}', "is not a bertpool-bench result: no latency_ms with p50 and p99"),
    ('{"steps": []}', "its sweep has no steps to draw"),
    ('{"steps": [{"clients": 1}]}', "step 1 is not a bertpool-bench result: no latency_ms"),
    (json.dumps({**_run_record(), "throughput_per_s": "fast"}), "no numeric throughput_per_s"),
    (json.dumps(_failure_report()), "is the report of a bench that could not run, nothing to draw: no broker answered"),
])
def test_plot_refuses_reports_it_cannot_draw(tmp_path, capsys, content, message):
    """One line and exit 2, never a KeyError/TypeError traceback, and no image: the report of a bench
    that could not run (no broker) used to be drawn as an empty chart with exit 0."""
    from bertpool.clients import plot

    source, png = tmp_path / "bench.json", tmp_path / "out.png"
    source.write_text(content)
    assert plot.main([str(source), str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m bertpool.clients.plot: error: ") and message in err, err
    assert not png.exists()
    with pytest.raises(plot.ReportError):
        plot.plot_report(json.loads(content), png)  # the same check guards the library call


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")
def test_plot_says_how_many_requests_failed(tmp_path, monkeypatch):
    """A point's latencies are its replies' only: a step with failed requests says so on the chart, and
    a chart with no reply at all says how many requests failed instead of looking like an idle run."""
    from matplotlib.figure import Figure

    from bertpool.clients import plot

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.append(fig))
    sweep = {"steps": [_run_record(1), _run_record(48, errors=3)], "pool": None, "backends": None}
    plot.plot_report(sweep, tmp_path / "s.png")
    plot.plot_report(_run_record(2, errors=4, p50=None), tmp_path / "f.png")
    texts = [[t.get_text() for ax in fig.axes for t in ax.texts] for fig in drawn]
    assert "1 client" in texts[0] and "48 clients, 3 errors" in texts[0]
    assert "no request got a reply\n4 requests failed, e.g. DeadlineExceeded" in texts[1]
    assert "no replies: no latencies" in texts[1]


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib (the plot extra) is not installed")
def test_histogram_ticks_are_plain_numbers(tmp_path, monkeypatch):
    """Latencies spanning under a decade (2..15 ms) were labelled "2x10^0 3x10^0 ... 10": the minor
    ticks kept matplotlib's scientific labels while the major ones were plain."""
    from matplotlib.figure import Figure

    from bertpool.clients import plot

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.append(fig))
    plot.plot_report(_run_record(), tmp_path / "r.png")
    fig = drawn[0]
    fig.canvas.draw()
    hist = fig.axes[1]
    labels = [t.get_text() for t in (*hist.get_xticklabels(), *hist.get_xticklabels(minor=True)) if t.get_text()]
    assert labels and not any("times" in label or "^" in label for label in labels), labels
    assert {"2", "10"} <= set(labels), labels


def test_a_sweep_totals_the_clients_retries_and_says_so(monkeypatch):
    """The sweep kept warm-up replies and the Client's retries per step only, and printed neither, so
    a sweep could not be matched against the broker's busy and ok counters without reading every step."""
    from bertpool.clients import bench, sweep

    config = bench.BenchConfig(address="ipc:///nowhere", clients=1, cycle=1)

    def step(clients, busy_retries):
        retries = {"busy_retries": busy_retries, "lost_resends": 0, "reconnects": 0}
        result = bench._ClientResult([1.0] * clients, [], [{}] * clients, {}, 0.0, 1.0, {}, clients, retries)
        report = bench.summarize(replace(config, clients=clients), [result])
        return {**report, "pool": None, "backends": {"echo": 1}, "diagnosis": None, "ok": True}

    steps = {1: step(1, 2), 3: step(3, 5)}
    monkeypatch.setattr(sweep, "run_bench", lambda step_config, pairs, progress=False, desc=None:
                        steps[step_config.clients])
    report = sweep.run_sweep(config, [1, 3], [])
    assert report["warmup_replies"] == 4
    assert report["client_retries"] == {"busy_retries": 7, "lost_resends": 0, "reconnects": 0}
    assert "client retries  resent 7 after BUSY, 0 after a lost broker; reconnected 0 times" in sweep.format_sweep(report)


# ------------------------------------------------------------------ reports as a new user reads them (audit)

def assert_environment(report: dict, prog: str, argv: list[str]) -> None:
    """A report says how and where it ran, so a saved one can be compared with another later."""
    env = report["environment"]
    assert env["command"] == [prog, *argv]
    assert env["started_utc"].endswith("+00:00")
    assert set(env["versions"]) == {"bertpool", "bertpool_commit", "python", "numpy", "pyzmq", "libzmq"}
    assert env["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["host"]["cpus"] == os.cpu_count() and env["host"]["load_average_1m"] >= 0


def test_a_bench_report_says_how_and_where_it_ran(start_pool, tmp_path):
    """The JSON had the settings but not the command, versions or host (a report from another machine
    or week could not be told apart); with --duration-s its config said cycle 128, requests never sent;
    and the text said neither the client count nor what the throughput counts."""
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=1)
    out = tmp_path / "bench.json"
    argv = ["--address", pool.address, "--clients", "1", "--duration-s", "0.3", "--json", str(out)]
    proc = run(*argv)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert_environment(report, "bertpool-bench", argv)
    assert report["config"]["cycle"] is None and report["config"]["duration_s"] == 0.3
    first = proc.stdout.splitlines()[0]
    assert first.startswith("clients 1  requests ") and f"throughput {report['throughput_per_s']:.1f} replies/s" in first


def test_an_unwritable_json_is_refused_before_the_run(start_pool):
    """A --json in a directory that exists but cannot be written (here /proc) passed the flag's check: the
    whole run was done, then its report could not be saved."""
    pool = start_pool("--backend", "echo", parallel=1)
    proc = run("--address", pool.address, "--clients", "1", "--cycle", "1", "--json", "/proc/bertpool-bench.json")
    assert proc.returncode == 2 and not proc.stdout, proc.stdout
    assert proc.stderr == "bertpool-bench: error: cannot write --json /proc/bertpool-bench.json: No such file or directory\n"


def test_a_sweep_table_says_its_throughput_is_replies_per_second():
    """The table's column said req/s while its numbers are replies/s (failed requests not counted, as the
    plot's axis says): with errors the two differ."""
    from bertpool.clients.sweep import format_sweep

    report = {"steps": [_run_record(clients=4, errors=10)], "backends": {}, "quality": None}
    header = format_sweep(report).splitlines()[0]
    assert "replies/s" in header.split() and "req/s" not in header.split()


def test_requests_that_all_ran_past_their_deadline_are_diagnosed_as_a_too_short_timeout(start_pool, tmp_path):
    """Against a pool slower than --timeout-s the diagnosis said only "no request got a reply"."""
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "400", parallel=1)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "1", "--cycle", "2", "--warmup", "0", "--timeout-s", "0.05",
               "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["replies"] == 0 and report["errors_by_type"] == {"DeadlineExceeded": 2}
    assert "every request ran past its --timeout-s 0.05 s deadline" in report["diagnosis"]
    assert "give a longer --timeout-s" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["throughput", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["throughput", "--seconds", "nan"], "--seconds must be > 0 and at most 86400 s"),
    (["tolerance", "--pairs", "-1"], "--pairs must be >= 1, got -1"),
    (["throughput", "--json", "/proc/bertpool-compile.json"], "cannot write --json /proc/bertpool-compile.json"),
])
def test_compile_bench_refuses_bad_values_before_building_a_model(monkeypatch, capsys, tmp_path, args, message):
    """The compile bench took --rounds 0, --seconds nan or --pairs -1 into minutes of model building (a
    NaN --seconds timed without end), and found an unwritable --json only after all of it (a traceback)."""
    from bertpool.bench import compile as compile_bench

    built = []
    monkeypatch.setattr(compile_bench, "throughput", lambda *a, **k: built.append(a) or {})
    monkeypatch.setattr(compile_bench, "tolerance", lambda *a, **k: built.append(a) or [])
    assert compile_bench.main([*args, "--sizes", "tiny", "--work", str(tmp_path)]) == 2
    assert not built and message in capsys.readouterr().err


def test_compile_bench_report_says_how_and_where_it_ran(monkeypatch, capsys, tmp_path):
    from bertpool.bench import compile as compile_bench

    monkeypatch.setattr(compile_bench, "throughput", lambda *a, **k: {"size": a[0]})
    argv = ["throughput", "--sizes", "tiny", "--work", str(tmp_path), "--json", str(tmp_path / "out" / "r.json")]
    assert compile_bench.main(argv) == 0
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert report["results"] == [{"size": "tiny"}] and report["config"]["rounds"] == 5
    assert_environment(report, "python -m bertpool.bench.compile", argv)
    assert json.loads(capsys.readouterr().out) == report


def test_the_plot_command_says_its_exit_status():
    """Every bench command's --help says what its exit codes mean; the plot command said nothing."""
    proc = subprocess.run([sys.executable, "-m", "bertpool.clients.plot", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "Exit status: 0 drawn, 2 " in " ".join(proc.stdout.split()), proc.stdout


def test_broker_bench_runs_the_broker_busy_polling_and_says_so(tmp_path):
    """--busy-poll-us reaches the broker of the broker and pool set-ups (one client alone is answered
    through it) and the report says what ran."""
    out = tmp_path / "busy.json"
    _, report = relay_bench(out, "--clients", "2", "--workers", "1", "--load-procs", "1", "--warmup-s", "0.2",
                            "--duration-s", "0.3", "--setups", "broker,pool", "--single", "10", "--busy-poll-us", "500")
    assert report["busy_poll_us"] == 500
    assert report["single_client_ms"]["pool"]["client"]["requests"] == 10
    assert report["single_client_ms"]["broker"]["dealer"]["requests"] == 10


def test_duration_runs_send_different_pairs_from_each_client(start_pool, tmp_path):
    """With --duration-s every client sent the same run of pairs (offset by --cycle's unused default: 128
    x k, a multiple of the 64 shipped pairs), so a short run measured accuracy on a handful of pairs however
    many clients it had. The clients now interleave: client k sends pairs k, k + C, ..., all different while
    each sends fewer than pairs / C. Here at most 11 each (50 ms batches for 0.5 s), 16 = 64 / 4."""
    pool = start_pool("--backend", "echo", "--echo-delay-ms", "50", "--batch-timeout-ms", "1", parallel=1)
    out = tmp_path / "bench.json"
    proc = run("--address", pool.address, "--clients", "4", "--duration-s", "0.5", "--warmup", "0",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert len(default_pairs()) == 64 and 4 <= report["replies"] <= 4 * 11
    assert report["quality"]["n"] == report["replies"]  # every reply a different pair
