"""Start the gateway as a child process of bertpool-serve (``--gateway-http`` / ``--gateway-grpc``).

Kept free of the gateway's own dependencies (aiohttp, grpcio), so bertpool-serve imports it
whether or not the ``gateway`` extra is installed; the child reports a missing one itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def add_serve_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """bertpool-serve's gateway flags; both off by default."""
    parser.add_argument("--gateway-http", metavar="HOST:PORT", default=None,
                        help="also serve KServe v2 HTTP/REST here (a bare port means 127.0.0.1), through a "
                             "bertpool-gateway child process (default: off)")
    parser.add_argument("--gateway-grpc", metavar="HOST:PORT", default=None,
                        help="also serve KServe v2 gRPC here, through the same gateway child (default: off)")


def gateway_command(broker: str, http: str | None, grpc: str | None, model_dir: str | None) -> list[str]:
    """The bertpool-gateway command line serving ``broker`` on the given addresses."""
    cmd = [sys.executable, "-m", "bertpool.gateway.gateway", "--broker", broker,
           "--http", http or "off", "--grpc", grpc or "off"]
    if model_dir:
        cmd += ["--model", model_dir]
    return cmd


def start_gateway_process(args: argparse.Namespace) -> subprocess.Popen | None:
    """Start the gateway child when bertpool-serve was asked for one (None otherwise)."""
    if not (args.gateway_http or args.gateway_grpc):
        return None
    return subprocess.Popen(gateway_command(args.address, args.gateway_http, args.gateway_grpc,
                                            getattr(args, "model", None)))


def stop_gateway_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM the gateway child and wait for it (SIGKILL after ``timeout_s``)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
