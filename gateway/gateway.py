"""bertpool-gateway: the KServe v2 (Open Inference Protocol) front door of a bertpool pool.

One process, one asyncio loop: an aiohttp HTTP/REST server (gateway.http) and a grpc.aio
server (gateway.grpc_server) share one pipelined broker connection
(:class:`bertpool.clients.client.Client`, whose own I/O thread holds every request in flight;
its concurrent Futures are awaited with asyncio.wrap_future, so no thread per request).

A v2 request of N rows becomes N pool requests sent at once and is answered when all N are
back; its deadline (the gRPC deadline, or the ``timeout`` parameter in microseconds, else
``GatewayConfig.timeout_s``) is each pool request's ``timeout_s``. Pool failures map to v2
errors (:func:`from_pool_error`): BUSY 503 / UNAVAILABLE, deadline 504 / DEADLINE_EXCEEDED,
bad input 400 / INVALID_ARGUMENT, anything else 500 / INTERNAL.

Readiness (server and model): at least one worker is registered with the broker, asked with
STATS and cached for ``ready_cache_s``. While the pool is known not ready, inference fails at once
with 503 / UNAVAILABLE saying why (as Triton does for a model that is not ready), instead of
waiting out its deadline in the broker's queue; a stale "ready" is refreshed in the background,
never on the request's path.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..clients.client import Client
from ..common import errors as E
from ..common import protocol as P
from ..common import security
from ..common.cli import (OFF, add_exit_status, check_distinct_listeners, exit_with_parent, ignore_hangup,
                          parse_host_port, process_endpoint, report_error, setup_logging)
from ..common.defaults import DEFAULT_FRONTEND, DEFAULT_GATEWAY_GRPC, DEFAULT_GATEWAY_HTTP, DEFAULT_GATEWAY_TIMEOUT_S
from ..common.errors import BertpoolError, ConfigError
from ..common.security import CurveClientConfig
from . import kserve
from .kserve import KServeError, Limits, ModelInfo
from .launch import LISTENING_PREFIX

log = logging.getLogger("bertpool.gateway")

DEFAULT_MODEL_NAME = "bertpool-mrpc"
DEFAULT_SEQ_LENGTH = 128  # the run_classifier export's, and the echo backend's
SERVER_NAME = "bertpool"
EXTENSIONS = ["binary_tensor_data"]

# Pool error codes that mean the client's input was bad.
_BAD_INPUT_CODES = {P.E_BAD_TEXT, P.E_BAD_FIELD, P.E_BAD_ENCODING, P.E_TOO_LARGE}
_UNAVAILABLE_CODES = {P.E_SHUTDOWN, P.E_WORKER_LOST}


@dataclass(frozen=True)
class GatewayConfig:
    broker: str = DEFAULT_FRONTEND          # the broker's client endpoint
    http: str | None = DEFAULT_GATEWAY_HTTP  # HTTP/REST listen address host:port; None or "off": no HTTP
    grpc: str | None = DEFAULT_GATEWAY_GRPC  # gRPC listen address host:port; None or "off": no gRPC
    model_name: str = DEFAULT_MODEL_NAME    # the name v2 clients call the model by
    model_dir: str | None = None            # the served model's directory, for its version hash and S
    model_version: str | None = None        # overrides the version read from model_dir
    timeout_s: float = DEFAULT_GATEWAY_TIMEOUT_S  # pool deadline of a request that names none
    max_body_bytes: int = 16 << 20          # larger HTTP bodies get 413, gRPC messages RESOURCE_EXHAUSTED
    max_rows: int = 1024                    # rows (pool requests) one v2 request may carry
    ready_cache_s: float = 0.5              # how long a readiness answer (a broker STATS) is reused
    ready_probe_timeout_s: float = 2.0      # a broker slower than this to answer STATS counts as not ready
    curve: CurveClientConfig | None = None  # CURVE keys for the broker link; None = plain text
    # Derived, not given: http and grpc as (host, port) to listen on, None when off. Parsed here only,
    # so a bad value is refused when the config is made, never later by serve().
    http_address: tuple[str, int] | None = field(init=False, default=None, compare=False)
    grpc_address: tuple[str, int] | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        P.check_endpoint("--broker", self.broker)
        object.__setattr__(self, "http_address", _listen_address("--http", self.http))  # frozen: set once here
        object.__setattr__(self, "grpc_address", _listen_address("--grpc", self.grpc))
        if self.http_address is None and self.grpc_address is None:
            raise ConfigError("nothing to serve: give --http or --grpc (or both)")
        # Not both on one port: grpc would fail to bind only after HTTP listens, saying why in a
        # C-level log line.
        check_distinct_listeners({"--http": self.http, "--grpc": self.grpc})
        _check_path_segment("--model-name", self.model_name)
        if self.model_version is not None:
            _check_path_segment("--model-version", self.model_version)
            # tritonclient puts the version into its URLs as it is (the name it quotes): anything
            # that would need %-encoding there breaks them.
            if not set(self.model_version) <= _VERSION_CHARS:
                raise ConfigError(f"--model-version {self.model_version!r}: a version may hold only letters, "
                                  f"digits and {_VERSION_PUNCTUATION} (it is used in URLs as it is)")
        P.check_timeout("--timeout-s", self.timeout_s)
        P.check_timeout("ready_probe_timeout_s", self.ready_probe_timeout_s)
        if not 0 <= self.ready_cache_s <= MAX_READY_CACHE_S:
            raise ConfigError(f"ready_cache_s must be >= 0 and at most {MAX_READY_CACHE_S:g}, got {self.ready_cache_s}")
        if not 1024 <= self.max_body_bytes <= P.INT32_MAX:  # gRPC's message limit is an int32
            raise ConfigError(f"--max-body-bytes must be in [1024, {P.INT32_MAX}], got {self.max_body_bytes}")
        if self.max_rows < 1:
            raise ConfigError(f"--max-rows must be >= 1, got {self.max_rows}")


MAX_READY_CACHE_S = 60.0  # a readiness answer older than a minute says little about the pool now


def _listen_address(flag: str, value: str | None) -> tuple[str, int] | None:
    """``value`` of --http or --grpc as (host, port); None for None or ``off`` (common.cli.OFF).
    ConfigError naming ``flag`` for anything else parse_host_port refuses."""
    return None if value is None or value in OFF else parse_host_port(value, flag)

# RFC 3986's characters of a path segment that need no %-encoding (pchar, less pct-encoded).
_VERSION_PUNCTUATION = "-._~!$&'()*+,;=:@"
_VERSION_CHARS = frozenset(string.ascii_letters + string.digits + _VERSION_PUNCTUATION)


def _check_path_segment(flag: str, value: str) -> None:
    """ConfigError unless ``value`` can be one segment of a v2 URL path, as a model's name and its
    version are (/v2/models/NAME/versions/VERSION): non-empty (an empty version also means "the
    one served" in a request, so it cannot be one; leaving --model-version out reports the hash of
    --model, or 'unversioned'), without '/', and not '.' or '..', which URL clients (curl, yarl)
    remove from a path as "this" and "parent" segments."""
    if not value or "/" in value or value in (".", ".."):
        hint = ""
        if flag == "--model-version" and not value:
            hint = " (leave it out to report the hash of --model, or 'unversioned')"
        raise ConfigError(f"{flag} must be one URL path segment: non-empty, without '/', not '.' or '..'; "
                          f"got {value!r}{hint}")


# ------------------------------------------------------------------ the model

def model_info(config: GatewayConfig) -> ModelInfo:
    """The served model's v2 identity: name, version (hash of its directory) and S: a compiled
    model's (its manifest), unknown for a SavedModel directory (its signature needs TensorFlow to
    read; the workers check S), and DEFAULT_SEQ_LENGTH without a directory."""
    seq_length: int | None = DEFAULT_SEQ_LENGTH
    version = config.model_version
    if config.model_dir is not None:
        from ..compile.runtime import model_dir_kind, read_manifest

        path = Path(config.model_dir)
        if model_dir_kind(path) == "compiled":  # else a SavedModel; anything else is refused
            seq_length = int(read_manifest(path)["seq_length"])
            digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        else:
            seq_length = None
            digest = _tree_hash(path)
        version = version or digest[:16]
    if version is None:
        log.warning("no --model DIR (or --model-version): the model's version is reported as "
                    "'unversioned'; give the served model's directory to report its hash")
        version = "unversioned"
    return ModelInfo(name=config.model_name, version=version, seq_length=seq_length)


def _tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and contents (a SavedModel directory)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------- error mapping

def from_pool_error(exc: BaseException) -> KServeError:
    """The v2 error for a pool request that failed with ``exc``."""
    if isinstance(exc, E.ProtocolError):  # refused by the client before sending: a text too long, an id beyond int32
        return KServeError(400, f"invalid input: {exc.message}")
    if isinstance(exc, E.ServerBusy):
        return KServeError(503, f"server busy, retry later: {exc}")
    if isinstance(exc, E.RequestTimeout):
        return KServeError(504, f"deadline exceeded: {exc}")
    if isinstance(exc, E.MalformedReply):  # the pool's reply was unreadable: not the client's fault
        return KServeError(500, f"malformed reply from the pool: {exc}")
    if isinstance(exc, E.RemoteError):
        if exc.code in _BAD_INPUT_CODES:
            return KServeError(400, f"invalid input: {exc.message}")
        if exc.code == P.E_DEADLINE:
            return KServeError(504, f"deadline exceeded: {exc.message}")
        if exc.code in _UNAVAILABLE_CODES:
            return KServeError(503, f"unavailable: {exc.message}")
        return KServeError(500, f"inference failed: {exc}")
    broker_unavailable = getattr(E, "BrokerUnavailable", None)  # arrives with the heartbeat work
    if isinstance(exc, E.ClientClosed) or broker_unavailable and isinstance(exc, broker_unavailable):
        return KServeError(503, f"unavailable: {exc}")
    return KServeError(500, f"internal error: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ the gateway

def _forget(pending: set[asyncio.Future]) -> None:
    """Cancel the rows of a failed request still under way, and mark whatever they end with as seen.

    Cancelling only stops the wait (the Client settles and drops the request), and a row that failed
    meanwhile (its failure already on its way to the loop) would otherwise be logged by asyncio as
    "Future exception was never retrieved", with a traceback, for each row (up to max_rows - 1 for
    one request past its deadline). The caller has read every row in ``done`` (``exception()``
    marks it retrieved)."""
    for future in pending:
        future.cancel()
        future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class Gateway:
    """The protocol-independent core both servers call: infer, readiness, metadata."""

    def __init__(self, config: GatewayConfig, model: ModelInfo, client: Client) -> None:
        self.config = config
        self.model = model
        self.limits = Limits(max_rows=config.max_rows, seq_length=model.seq_length)
        self._client = client
        self._ready = False
        self._ready_at = -float("inf")
        self._not_ready_why = "readiness not asked yet"  # why the last probe found the pool not ready
        self._probe: asyncio.Future | None = None

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    async def infer(self, request: kserve.InferRequest, deadline_s: float | None = None) -> np.ndarray:
        """Probabilities float32 [N,2] for a decoded request; KServeError on any failure."""
        rows = kserve.rows_of(request, self.model, self.limits)
        timeout_s = min(t for t in (request.timeout_s, deadline_s, self.config.timeout_s) if t is not None)
        if not timeout_s > 0:
            raise KServeError(504, "deadline exceeded before the request was sent")
        await self._refuse_unless_ready(timeout_s)
        submit = self._client.submit if rows.kind == "text" else self._client.submit_features
        try:
            futures = [asyncio.wrap_future(submit(*row, timeout_s=timeout_s)) for row in rows.items]
        except BertpoolError as exc:
            raise from_pool_error(exc) from exc
        if len(futures) == 1:  # the common case, without asyncio.wait's bookkeeping
            try:
                return (await futures[0]).probabilities[None, :].astype(np.float32, copy=False)
            except BertpoolError as exc:
                raise from_pool_error(exc) from exc
        # The request fails as soon as one row does (BUSY, a bad text): no waiting for the rest.
        done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f in done and f.exception() is not None]
        if failed:
            _forget(pending)
            raise from_pool_error(failed[0]) from failed[0]
        return np.stack([f.result().probabilities for f in futures]).astype(np.float32, copy=False)

    async def ready(self) -> bool:
        """True while the broker has at least one worker (one STATS per ready_cache_s at most)."""
        if time.monotonic() - self._ready_at < self.config.ready_cache_s:
            return self._ready
        return await asyncio.shield(self._start_probe())

    @property
    def not_ready_why(self) -> str:
        """Why the last probe found the pool not ready (what a not-ready answer says): no worker, or
        the broker's failure to answer (down, or refusing our CURVE key)."""
        return self._not_ready_why

    async def _refuse_unless_ready(self, timeout_s: float) -> None:
        """KServeError 503 while the pool is known not ready (a request would wait out its deadline).

        A fresh answer is used as is. A stale "ready" lets the request through and refreshes itself
        in the background (no wait on the hot path); a stale or missing "not ready" is asked again
        first, for at most ``timeout_s`` (the request's; 504 past it), so a pool that came back is
        served at once.
        """
        if time.monotonic() - self._ready_at < self.config.ready_cache_s:
            ready = self._ready
        elif self._ready:
            self._start_probe()
            return
        else:
            try:
                ready = await asyncio.wait_for(asyncio.shield(self._start_probe()), timeout_s)
            except asyncio.TimeoutError:
                raise KServeError(504, "deadline exceeded while asking the broker whether a worker is "
                                       "ready") from None
        if not ready:
            raise KServeError(503, f"unavailable: {self._not_ready_why}")

    def _start_probe(self) -> asyncio.Future:
        """The readiness probe under way, started if there is none (one at a time)."""
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._ask_broker())
        return self._probe

    async def _ask_broker(self) -> bool:
        """Ask the broker (STATS) whether any worker is registered; record the answer, and why not.
        Never raises: anything that goes wrong is "not ready", said in the log."""
        loop = asyncio.get_running_loop()
        try:
            stats = await loop.run_in_executor(None, self._client.stats, self.config.ready_probe_timeout_s)
            ready = bool(stats.get("workers"))
            why = f"no worker is registered with the broker at {self._client.config.address}"
        except BertpoolError as exc:
            log.info("not ready: broker STATS failed: %s", exc)
            ready, why = False, f"the broker did not answer: {exc}"
        except Exception as exc:  # a bug: readiness must still settle, and the next probe run
            log.exception("not ready: the readiness probe failed")
            ready, why = False, f"the readiness probe failed: {type(exc).__name__}: {exc}"
        finally:
            self._probe = None
        if not ready:
            self._not_ready_why = why
        self._ready, self._ready_at = ready, time.monotonic()
        return ready


async def serve(config: GatewayConfig, stop: asyncio.Event, on_listening=None) -> None:
    """Run the configured servers until ``stop`` is set; ``on_listening(dict)`` gets the bound
    addresses ({"http": "host:port", "grpc": "host:port"})."""
    model = model_info(config)
    client = Client(config.broker, timeout_s=config.timeout_s, curve=config.curve)
    gateway = Gateway(config, model, client)
    cleanups = []
    bound: dict[str, str] = {}
    try:
        if config.http_address is not None:
            from .http import start_http

            try:
                runner, address = await start_http(gateway, *config.http_address)
            except OSError as exc:  # in use, not an address of this host, a name that does not resolve
                raise _cannot_listen("--http", config.http, exc) from exc
            cleanups.append(runner.cleanup)
            bound["http"] = address
        if config.grpc_address is not None:
            from .grpc_server import start_grpc

            try:
                server, address = await start_grpc(gateway, *config.grpc_address)
            except OSError as exc:
                raise _cannot_listen("--grpc", config.grpc, exc) from exc
            # Calls in flight may finish, as HTTP's do (each is bounded by its own deadline).
            cleanups.append(lambda: server.stop(grace=config.timeout_s))
            bound["grpc"] = address
        if on_listening is not None:
            on_listening(bound, model)
        await stop.wait()
    finally:
        await _stop_servers(cleanups)
        client.close()


async def _stop_servers(cleanups: list) -> None:
    """Stop every server at once: each stops listening first, then lets its calls in flight finish
    (each within its deadline, so within ``GatewayConfig.timeout_s``). One after the other, HTTP
    went on accepting new requests for as long as gRPC's calls took to drain. A server whose
    stopping fails is logged; the others still stop."""
    results = await asyncio.gather(*(cleanup() for cleanup in cleanups), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            log.error("stopping a server failed: %s: %s", type(result).__name__, result)


def _cannot_listen(flag: str, value: str, exc: OSError) -> ConfigError:
    """The error naming the flag whose address could not be bound (the OS's own message names neither:
    "[Errno -2] Name or service not known")."""
    return ConfigError(f"{flag} {value}: cannot listen there: {exc.strerror or exc}")


# -------------------------------------------------------------------- CLI

def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=DEFAULT_FRONTEND, type=process_endpoint,
                        help="the broker's client endpoint (default: %(default)s)")
    parser.add_argument("--http", default=DEFAULT_GATEWAY_HTTP, metavar="HOST:PORT",
                        help="HTTP/REST listen address, a bare port means 127.0.0.1; 'off' disables "
                             "(default: %(default)s)")
    parser.add_argument("--grpc", default=DEFAULT_GATEWAY_GRPC, metavar="HOST:PORT",
                        help="gRPC listen address, a bare port means 127.0.0.1; 'off' disables "
                             "(default: %(default)s)")
    parser.add_argument("--model", "--dir", dest="model", metavar="DIR",
                        help="the directory the workers serve: the model's version is its hash "
                             "(a compiled model's manifest.json) and its sequence length is read from it")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help="the model name v2 clients use (default: %(default)s)")
    parser.add_argument("--model-version", default=None,
                        help="report this version instead of the hash of --model")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_GATEWAY_TIMEOUT_S,
                        help="pool deadline of requests that carry none (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20,
                        help="largest HTTP body / gRPC message accepted (default: %(default)s)")
    parser.add_argument("--max-rows", type=int, default=1024,
                        help="most rows one inference request may carry (default: %(default)s)")
    security.add_client_arguments(parser, own="the gateway's own")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(broker=args.broker, http=args.http, grpc=args.grpc, model_name=args.model_name,
                         model_dir=args.model, model_version=args.model_version, timeout_s=args.timeout_s,
                         max_body_bytes=args.max_body_bytes, max_rows=args.max_rows,
                         curve=security.client_config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpool-gateway",
        description="Serve a bertpool pool over the KServe v2 / Open Inference Protocol (HTTP/REST and "
                    "gRPC), so Triton and KServe clients can call it.",
        epilog="example: bertpool-gateway --broker tcp://127.0.0.1:5555 --http 8000 --grpc 8001")
    add_gateway_arguments(parser)
    add_exit_status(parser, "0 stopped (SIGTERM, Ctrl-C), 2 it could not start (a bad flag, an address it cannot "
                            "listen on, a missing extra)")
    args = parser.parse_args(argv)
    setup_logging()
    exit_with_parent()  # started by bertpool-serve: stop when it dies, however it dies
    ignore_hangup()
    try:
        config = config_from_args(args)
        return asyncio.run(_run(config))
    except (BertpoolError, OSError, RuntimeError) as exc:  # bad flags, model dir, a port in use
        return report_error("bertpool-gateway", exc)


async def _run(config: GatewayConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def listening(bound: dict[str, str], model: ModelInfo) -> None:
        where = ", ".join(f"{k} on {v}" for k, v in bound.items())
        print(f"{LISTENING_PREFIX}{where}; broker {config.broker}; model {model.name} version "
              f"{model.version}", flush=True)

    await serve(config, stop, listening)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
