"""bertpool-bench-gateway: one small run of every mode against the pool it starts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from bertpool.bench.gateway import MODES, main  # noqa: E402


def test_bench_gateway_reports_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--clients", "2", "--cycle", "3", "--warmup", "1", "--json", str(out),
                 "--log", str(tmp_path / "pool.log")]) == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "echo" and set(report["modes"]) == set(MODES)
    for mode in report["modes"].values():
        assert mode["replies"] == 6 and mode["errors"] == {} and mode["round_trips_per_s"] > 0
    assert set(report["ratios"]) == {"http_vs_native", "grpc_vs_native", "http_json_vs_native"}
    assert json.loads(capsys.readouterr().out) == report


def test_bench_gateway_refuses_bad_flags(capsys):
    assert main(["--clients", "0"]) == 2
    assert main(["--modes", "smoke"]) == 2
    assert "--modes" in capsys.readouterr().err
