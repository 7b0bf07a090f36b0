"""bertpool-bench-gateway: one small run of every mode against the pool it starts."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from bertpool.bench.gateway import MODES, main  # noqa: E402
from test_bench import assert_environment, interrupt_a_bench_with_a_pool  # noqa: E402


def test_bench_gateway_reports_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--clients", "2", "--cycle", "3", "--warmup", "1", "--json", str(out), "--log", str(tmp_path / "pool.log")]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "echo" and set(report["modes"]) == set(MODES)
    for mode in report["modes"].values():
        # Named as in bertpool-bench's report: errors a count beside errors_by_type, elapsed_s (was a
        # dict of errors under "errors", and wall_s).
        assert mode["requests"] == 6 and mode["replies"] == 6 and mode["round_trips_per_s"] > 0
        assert mode["errors"] == 0 and mode["errors_by_type"] == {} and mode["error_samples"] == {}
        assert mode["elapsed_s"] > 0 and "wall_s" not in mode
    assert set(report["ratios"]) == {"http_vs_native", "grpc_vs_native", "http_json_vs_native"}
    assert json.loads(capsys.readouterr().out) == report
    assert_environment(report, "bertpool-bench-gateway", argv)


def test_bench_gateway_refuses_bad_flags(capsys):
    assert main(["--clients", "0"]) == 2
    assert main(["--modes", "smoke"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["--warmup", "-1"]) == 2
    assert "--warmup must be >= 0, got -1" in capsys.readouterr().err
    assert main(["--clients", "99999999999999999999"]) == 2  # hung, and orphaned its pool
    assert "--clients must be at most 4096" in capsys.readouterr().err
    assert main(["--cycle", "99999999999999999999"]) == 2
    assert "--cycle must be at most 1000000" in capsys.readouterr().err
    assert main(["--clients", "1", "--cycle", "1", "--parallel", "1", "--modes", "http,native,http"]) == 2
    assert "--modes names a mode twice: http,native,http" in capsys.readouterr().err


def test_bench_gateway_sigterm_stops_its_pool_and_clients(tmp_path):
    """SIGTERM killed bench-gateway by the default action, leaving its pool (serve, workers, gateway)
    running for good. A --cycle this long also overflowed the wait for the clients at once."""
    interrupt_a_bench_with_a_pool(
        [sys.executable, "-m", "bertpool.bench.gateway", "--clients", "1", "--cycle", "1000000", "--warmup", "0",
         "--parallel", "1", "--modes", "native", "--log", str(tmp_path / "pool.log")],
        "bertpool-bench-gateway", tmp_path / "bench.log")
