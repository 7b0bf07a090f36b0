"""Start the gateway as a child process of bertpool-serve (``--gateway-http`` / ``--gateway-grpc``).

Kept free of the gateway's own dependencies (aiohttp, grpcio), so bertpool-serve imports it
whether or not the ``gateway`` extra is installed; the child reports a missing one itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from typing import Callable

from ..common.cli import child_env
from ..common.defaults import DEFAULT_GATEWAY_TIMEOUT_S
from ..common.errors import ConfigError
from ..common.protocol import local_endpoint

LISTENING_PREFIX = "bertpool-gateway: "  # the gateway's first stdout line once it listens
# How long a stopping gateway child gets before SIGKILL: its calls in flight may run to their deadline,
# at most its --timeout-s (the default: bertpool-serve passes none), then a few seconds to close.
# Killed at 10 s, as it was, a call given 30 s was cut off mid-answer.
STOP_TIMEOUT_S = DEFAULT_GATEWAY_TIMEOUT_S + 5.0


def add_serve_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """bertpool-serve's gateway flags; both off by default."""
    parser.add_argument("--gateway-http", metavar="HOST:PORT", default=None,
                        help="also serve KServe v2 HTTP/REST here (a bare port means 127.0.0.1), through a "
                             "bertpool-gateway child process (default: off)")
    parser.add_argument("--gateway-grpc", metavar="HOST:PORT", default=None,
                        help="also serve KServe v2 gRPC here, through the same gateway child (default: off)")


def gateway_command(broker: str, http: str | None, grpc: str | None, model_dir: str | None,
                    curve_server_key: str | None = None, curve_secret_key: str | None = None) -> list[str]:
    """The bertpool-gateway command line serving ``broker`` on the given addresses (with CURVE when
    given both key files: the broker's public key and the gateway's own key pair)."""
    cmd = [sys.executable, "-m", "bertpool.gateway.gateway", "--broker", broker,
           "--http", http or "off", "--grpc", grpc or "off"]
    if model_dir:
        cmd += ["--model", model_dir]
    if curve_server_key and curve_secret_key:
        cmd += ["--curve-server-key", curve_server_key, "--curve-secret-key", curve_secret_key]
    return cmd


class GatewayChild:
    """bertpool-serve's gateway child process: started, waited for, watched and stopped.

    Its stdout is relayed line by line to ours; the line it prints once listening marks it started.
    """

    def __init__(self, cmd: list[str]) -> None:
        # child_env: the gateway stops when we die, even by SIGKILL (common.cli.exit_with_parent).
        # A session of its own: a Ctrl-C or SIGTERM to our process group (a terminal, timeout, systemd)
        # is ours to act on, by stop(); it used to kill a gateway still starting (no handlers yet),
        # which then read as a lost gateway and made serve exit 1.
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, env=child_env(),
                                      start_new_session=True)
        self._listening = threading.Event()
        self._stopping = False  # terminate() was called: SIGTERM sent (once: a second is a second stop request)
        threading.Thread(target=self._relay, name="gateway-stdout", daemon=True).start()

    def _relay(self) -> None:
        for line in self._proc.stdout:  # read to the end, whatever happens to ours: a full pipe would block it
            if line.startswith(LISTENING_PREFIX):
                self._listening.set()
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # our stdout is gone (closed, a broken pipe): the line is lost, not the gateway

    def wait_listening(self, timeout_s: float, cancel: threading.Event | None = None) -> None:
        """Return once the gateway listens, or ``cancel`` is set; ConfigError when it exits first (it
        said why on stderr: a port in use, a missing extra, a bad model directory) or is not listening
        by ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._listening.wait(0.1):
            if cancel is not None and cancel.is_set():
                return
            code = self._proc.poll()
            if code is not None and not self._listening.wait(1.0):  # its last line may still be on the way
                raise ConfigError(f"the gateway (bertpool-gateway) exited with code {code} before listening; "
                                  "its error is above")
            if time.monotonic() >= deadline:
                self.stop()
                raise ConfigError(f"the gateway (bertpool-gateway) was not listening after {timeout_s:.0f} s")

    def watch(self, on_exit: Callable[[int], None]) -> None:
        """Call ``on_exit(returncode)`` (on another thread) if the gateway exits before stop()."""
        def wait() -> None:
            code = self._proc.wait()
            if not self._stopping:
                on_exit(code)
        threading.Thread(target=wait, name="gateway-watch", daemon=True).start()

    def terminate(self) -> None:
        """SIGTERM the gateway, once, without waiting: it stops listening at once and finishes its calls
        in flight (stop() waits for it)."""
        if self._stopping:
            return
        self._stopping = True
        if self._proc.poll() is None:
            self._proc.terminate()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the gateway (unless terminate() did) and wait for it (SIGKILL after ``timeout_s``)."""
        self.terminate()
        if self._proc.poll() is not None:
            return
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def start_gateway_process(args: argparse.Namespace, timeout_s: float = 120.0,
                          cancel: threading.Event | None = None) -> GatewayChild | None:
    """Start the gateway child when bertpool-serve was asked for one (None otherwise) and wait until
    it listens, or until ``cancel`` is set (a stop asked for meanwhile; the caller stops the child);
    ConfigError (and no child left) when it cannot start."""
    if not (args.gateway_http or args.gateway_grpc):
        return None
    # bertpool-serve binds args.address; the gateway connects to it (a wildcard host becomes loopback).
    child = GatewayChild(gateway_command(local_endpoint(args.address), args.gateway_http, args.gateway_grpc,
                                         getattr(args, "model", None), getattr(args, "curve_server_key", None),
                                         getattr(args, "curve_gateway_secret_key", None)))
    child.wait_listening(timeout_s, cancel)
    return child
