"""bertpool-bench against a live echo pool, and the CLI's error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bertpool.common.data import shared_data_dir

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
    assert 0.0 <= report["accuracy"] <= 1.0 and report["labelled"] == 32  # shipped pairs are labelled
    quality = report["quality"]  # 4 x 8 requests over the 64 shipped pairs: 32 distinct pairs
    assert quality["n"] == 32 and sum(quality["confusion"].values()) == 32 and quality["inconsistent_pairs"] == 0
    assert 0.0 <= quality["f1"] <= 1.0 and "F1" in proc.stdout and "tp " in proc.stdout
    assert report["backends"] == {"echo": 2}
    assert "WARNING: echo workers answered" in proc.stdout
    assert "throughput" in proc.stdout
    # Warm-up requests are not counted in the report, but the pool served them.
    stats = pool.wait_stats(lambda s: s["totals"]["inferences"] >= 32 + 4 * 2)
    assert stats["broker"]["replies"] == 32 + 4 * 2


def test_bench_on_the_mrpc_dev_set(start_pool, tmp_path):
    data = shared_data_dir()
    tsv = data / "glue_mrpc_dev.tsv" if data else None
    if tsv is None or not tsv.is_file():
        pytest.skip("../shared/data/glue_mrpc_dev.tsv not present")
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


@pytest.mark.parametrize("request_kind", ["text", "features"])
def test_broker_bench_runs_all_setups(tmp_path, request_kind):
    out = tmp_path / "broker.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.broker.relay_bench", "--clients", "4",
                           "--workers", "1", "--load-procs", "1", "--warmup-s", "0.2", "--duration-s", "0.5",
                           "--request", request_kind, "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["round_trips_per_s"]) == {"relay", "broker", "pool"}
    assert all(v > 0 for v in report["round_trips_per_s"].values())
    assert report["ratio_to_relay"]["relay"] == 1.0


def test_backend_bench_reports_ratio_and_latency(tmp_path):
    out = tmp_path / "backend.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.workers.backend_bench", "--backend", "echo",
                           "--echo-delay-ms", "2", "--seconds", "0.3", "--parallel", "1", "--cycle", "3",
                           "--single-cycle", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    served = report["served"][0]
    assert report["tight"]["inferences_per_s"] > 0 and served["inferences_per_s"] > 0
    assert served["errors"] == 0 and "single_added_latency_ms_p50" in served


def test_quality_counts_each_pair_once_with_its_first_answer():
    from bertpool.clients.bench import quality

    q = quality([(1, 1, 0), (0, 1, 0), (0, 0, 1), (1, None, 2)])  # pair 0 answered twice, differently
    assert q["n"] == 2 and q["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}
    assert q["inconsistent_pairs"] == 1 and q["accuracy"] == 1.0
    assert quality([(1, None, 0)]) is None
