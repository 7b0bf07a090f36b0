"""bertpool-bench-gateway: native client vs KServe v2 HTTP vs gRPC through the gateway, one run.

Starts one pool (bertpool-serve with its gateway child on free ports), then for each mode runs
``--clients`` client processes that each send ``--cycle`` single-pair requests one after another
(each waits for its reply, as bertpool-bench's clients do) after ``--warmup`` unmeasured ones;
all clients of a mode start the measured phase together (a barrier). Modes run one after another
against the same pool, so their round trips per second compare directly. Prints one JSON report
(and writes it to ``--json``).

    native  bertpool.clients.client.Client, straight to the broker
    http    tritonclient.http (binary tensor data, as tritonclient sends by default) via the gateway
    grpc    tritonclient.grpc via the gateway
    http-json  a minimal v2 client (http.client keep-alive, a JSON body, the JSON reply parsed): the
            gateway's cost with the client's own CPU mostly out of the way (tritonclient's per-call
            work is several times the native client's, and on a small machine the 48 client
            processes share the cores with the gateway and the pool)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import start_serve
from ..clients.bench import MAX_CLIENTS, MAX_CYCLE, check_warmup, next_result, percentiles, run_environment
from ..common.cli import (STOPPED, add_exit_status, check_count, check_writable, output_file, report_error,
                          report_interrupt, sigterm_as_interrupt, write_output)
from ..common.data import default_pairs
from ..common.errors import BertpoolError, ConfigError
from ..workers.supervisor import check_processes

MODES = ("native", "http", "grpc", "http-json")
MODEL = "bertpool-mrpc"


@dataclass(frozen=True)
class GatewayBenchConfig:
    clients: int = 48                 # client processes per mode
    cycle: int = 64                   # measured requests per client
    warmup: int = 2                   # unmeasured requests per client first
    parallel: int = 2                 # workers in the pool
    model_dir: str | None = None      # serve this model with the tf backend; None: echo backend
    modes: tuple[str, ...] = MODES    # which clients to run, in order
    timeout_s: float = 60.0           # per-request deadline
    start_timeout_s: float = 180.0    # longest wait for the pool, the gateway, or a mode's clients

    def __post_init__(self) -> None:
        check_count("--clients", self.clients, MAX_CLIENTS)
        check_count("--cycle", self.cycle, MAX_CYCLE)
        check_processes("--parallel", self.parallel)  # serve's own bound, now rather than from its log
        check_warmup(self.warmup)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"--modes must name some of {', '.join(MODES)}, got {','.join(self.modes)}")
        if len(set(self.modes)) != len(self.modes):  # the report has one record per mode: a repeat was dropped
            raise ConfigError(f"--modes names a mode twice: {','.join(self.modes)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ clients

def _make_caller(mode: str, endpoints: dict[str, str], timeout_s: float):
    """A function (text_a, text_b) -> probabilities [2] for ``mode``, and its close()."""
    if mode == "native":
        from ..clients.client import Client

        client = Client(endpoints["native"], timeout_s=timeout_s)
        return (lambda a, b: client.predict(a, b).probabilities), client.close
    if mode == "http-json":
        return _json_caller(endpoints["http"], timeout_s)
    if mode == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = tc.InferenceServerClient(endpoints[mode])

    def call(a: str, b: str) -> np.ndarray:
        inputs = [tc.InferInput("text_a", [1], "BYTES"), tc.InferInput("text_b", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([a.encode()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([b.encode()], dtype=object))
        return client.infer(MODEL, inputs, outputs=[tc.InferRequestedOutput("probabilities")],
                            timeout=int(timeout_s * 1e6)).as_numpy("probabilities")[0]
    return call, client.close


def _json_caller(address: str, timeout_s: float):
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    path = f"/v2/models/{MODEL}/infer"

    def call(a: str, b: str) -> np.ndarray:
        body = json.dumps({"inputs": [{"name": "text_a", "datatype": "BYTES", "shape": [1], "data": [a]},
                                      {"name": "text_b", "datatype": "BYTES", "shape": [1], "data": [b]}],
                           "outputs": [{"name": "probabilities"}]})
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        doc = json.loads(reply.read())
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {doc.get('error')}")
        return np.asarray(doc["outputs"][0]["data"], np.float32)
    return call, conn.close


def _client_main(index: int, mode: str, endpoints: dict[str, str], config: GatewayBenchConfig,
                 pairs: list[tuple[str, str]], barrier, results) -> None:
    """One client process of ``mode``: warm up, meet the barrier, send ``config.cycle`` requests; put
    its latencies (ms) and errors (counts by class, a message of each: a client that could not start
    or warm up counts one ``start: CLASS`` error) on ``results``."""
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    latencies: list[float] = []
    try:
        call, close = _make_caller(mode, endpoints, config.timeout_s)
        for i in range(config.warmup):
            call(*pairs[(index + i) % len(pairs)])
    except Exception as exc:  # report, then still meet the barrier so the others are not stuck
        key = f"start: {type(exc).__name__}"
        errors[key], samples[key] = 1, str(exc)[:500]
        call = close = None
    barrier.wait()
    started = time.perf_counter()
    if call is not None:
        for i in range(config.cycle):
            a, b = pairs[(index * 7 + i) % len(pairs)]
            t0 = time.perf_counter()
            try:
                call(a, b)
                latencies.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # count it and go on, as bertpool-bench does
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                samples.setdefault(key, str(exc)[:500])
        close()
    results.put({"latencies_ms": latencies, "errors": errors, "error_samples": samples, "started": started,
                 "finished": time.perf_counter()})


def run_mode(mode: str, endpoints: dict[str, str], config: GatewayBenchConfig,
             pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Run ``config.clients`` processes of ``mode``; return its throughput and latency summary."""
    # forkserver: children fork from a fresh process that imported only this module, never from
    # the caller (which may hold TensorFlow's or gRPC's threads, and a fork of those can hang).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier, results = ctx.Barrier(config.clients, timeout=config.start_timeout_s), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(i, mode, endpoints, config, pairs, barrier, results),
                         daemon=True) for i in range(config.clients)]
    for p in procs:
        p.start()
    longest_s = config.start_timeout_s + config.cycle * config.timeout_s
    limit, late = time.monotonic() + longest_s, f"the {mode} clients did not finish within {longest_s:g} s"
    got: list[dict[str, Any]] = []
    try:
        while len(got) < len(procs):  # one report per client
            got.append(next_result(results, limit, late))
    finally:
        for p in procs:
            if len(got) < len(procs):  # interrupted or timed out: stop them now, not after their cycle
                p.kill()
            p.join(10)
            if p.is_alive():
                p.kill()
    latencies = [x for r in got for x in r["latencies_ms"]]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in got:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, message in r["error_samples"].items():
            samples.setdefault(k, message)
    elapsed_s = max(r["finished"] for r in got) - min(r["started"] for r in got)
    # Field names as bertpool-bench's report has them: errors a count, errors_by_type and
    # error_samples beside it, elapsed_s the measured phase.
    return {"mode": mode, "requests": len(latencies) + sum(errors.values()), "replies": len(latencies),
            "errors": sum(errors.values()), "errors_by_type": errors, "error_samples": samples,
            "elapsed_s": round(elapsed_s, 3),
            "round_trips_per_s": round(len(latencies) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
            "latency_ms": percentiles(latencies)}


# ---------------------------------------------------------------------- pool

class _Pool:
    """bertpool-serve with its gateway child, on ipc:// for workers and clients, free TCP ports for v2."""

    def __init__(self, config: GatewayBenchConfig, log_path: Path) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bertpool-gwbench-")
        self.endpoints = {"native": f"ipc://{self._tmp.name}/front.ipc", "http": f"127.0.0.1:{_free_port()}",
                          "grpc": f"127.0.0.1:{_free_port()}"}
        args = ["--address", self.endpoints["native"],
                "--worker-address", f"ipc://{self._tmp.name}/back.ipc", "--parallel", str(config.parallel),
                "--stats-interval-s", "0", "--gateway-http", self.endpoints["http"],
                "--gateway-grpc", self.endpoints["grpc"]]
        if config.model_dir:
            args += ["--backend", "tf", "--model", config.model_dir]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = start_serve(args, log)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the gateway says ready (a worker is up); BertpoolError with the log otherwise."""
        url = f"http://{self.endpoints['http']}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise BertpoolError(f"the pool or its gateway did not become ready in {timeout_s:.0f} s "
                            f"(exit {self.proc.poll()}); log:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._tmp.cleanup()


def run_gateway_bench(config: GatewayBenchConfig, log_path: Path) -> dict[str, Any]:
    """Start the pool, run every mode, stop the pool; the JSON-ready report (the host's facts, the
    CPU count among them, are the caller's ``environment``)."""
    pairs = [(p.text_a, p.text_b) for p in default_pairs()]
    pool = _Pool(config, log_path)
    try:
        pool.wait_ready(config.start_timeout_s)
        modes = {mode: run_mode(mode, pool.endpoints, config, pairs) for mode in config.modes}
    finally:
        pool.close()
    native = modes.get("native", {}).get("round_trips_per_s")
    ratios = {f"{m.replace('-', '_')}_vs_native": round(r["round_trips_per_s"] / native, 3)
              for m, r in modes.items() if m != "native" and native}
    return {"config": asdict(config), "backend": "tf" if config.model_dir else "echo", "modes": modes,
            "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench-gateway",
        description="Compare round trips/s of the native client, the KServe v2 HTTP gateway and the gRPC "
                    "gateway on one pool it starts (echo backend unless --model).")
    add_exit_status(parser, f"0 measured, 2 it could not run (a bad flag, a pool or gateway that cannot start), "
                            f"{STOPPED}; either way its pool and clients are stopped")
    d = GatewayBenchConfig()
    parser.add_argument("--clients", type=int, default=d.clients,
                        help=f"client processes per mode, at most {MAX_CLIENTS} (default: %(default)s)")
    parser.add_argument("--cycle", type=int, default=d.cycle,
                        help=f"measured requests per client, at most {MAX_CYCLE} (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured requests per client (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=d.parallel, help="workers (default: %(default)s)")
    parser.add_argument("--model", dest="model_dir", default=None,
                        help="serve this model directory with the tf backend (default: the echo backend)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", default=None, type=output_file,
                        help="also write the report as JSON to FILE")
    parser.add_argument("--log", metavar="FILE", default=None, type=output_file,
                        help="the pool's log file (default: a temporary file)")
    args = parser.parse_args(argv)
    try:
        config = GatewayBenchConfig(clients=args.clients, cycle=args.cycle, warmup=args.warmup,
                                    parallel=args.parallel, model_dir=args.model_dir,
                                    modes=tuple(m for m in args.modes.split(",") if m))
        check_writable("--json", args.json)  # before the pool starts, not after the run
        environment = run_environment("bertpool-bench-gateway", argv)
        log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="bertpool-gwbench-", suffix=".log")[1])
        with sigterm_as_interrupt():  # SIGTERM (timeout, kill) unwinds like Ctrl-C: the pool is stopped
            report = {**run_gateway_bench(config, log_path), "environment": environment}
    except BertpoolError as exc:
        return report_error("bertpool-bench-gateway", exc)
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        return report_interrupt("bertpool-bench-gateway", exc, "; its pool and clients were stopped, no report")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        try:
            write_output("--json", args.json, text + "\n")
        except ConfigError as exc:  # the report is on stdout already
            return report_error("bertpool-bench-gateway", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
