"""CURVE on both links: the key tool, allow-lists per link, refusals, encryption on the wire.

Real processes (bertpool-broker, bertpool-workers/-worker/-serve with the echo backend) on
127.0.0.1; the client library in this process.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth

from bertpool.broker.broker import Broker, BrokerConfig
from bertpool.clients.bench import wait_for_workers
from bertpool.clients.client import Client
from bertpool.common import keys as keys_cli
from bertpool.common.errors import BrokerUnavailable, ConfigError, HandshakeFailed, RequestTimeout
from bertpool.common.security import (CurveClientConfig, CurveServerConfig, generate_key_pairs,
                                      load_key_pair, warn_if_exposed)
from bertpool.common.protocol import local_endpoint
from bertpool.workers.worker import EXIT_REFUSED

from conftest import free_tcp_port

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE (built without libsodium)")

SECRET_TEXT = "zebra-quartz-7319 never in plain text"


# ------------------------------------------------------------------ helpers

@dataclass
class Keys:
    dir: Path
    allow_clients: Path
    allow_workers: Path

    def public(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.dir / f"{name}.key_secret")

    def client(self, name: str = "client", server: str = "broker") -> CurveClientConfig:
        return CurveClientConfig(server_key_file=self.public(server), secret_key_file=self.secret(name))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    generate_key_pairs(root / "all", ["broker", "client", "worker", "stranger"])
    k = Keys(root / "all", root / "allow-clients", root / "allow-workers")
    k.allow_clients.mkdir()
    k.allow_workers.mkdir()
    shutil.copy(k.public("client"), k.allow_clients)
    shutil.copy(k.public("worker"), k.allow_workers)
    return k


def start(log_dir: Path, module: str, *args: str) -> subprocess.Popen:
    """``python -m module args`` in its own session, logging to log_dir."""
    log_path = log_dir / f"{module}-{len(list(log_dir.glob('*.log')))}.log"
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the newest first (workers before their broker), SIGKILL what lingers."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(log_dir.glob("*.log")))


@dataclass
class CurvePool:
    front: str
    back: str
    log_dir: Path
    procs: list[subprocess.Popen]


@pytest.fixture(scope="module")
def curve_pool(keys, tmp_path_factory):
    """bertpool-broker with CURVE and allow-lists + bertpool-workers (1 echo worker) with its keys, over tcp."""
    log_dir = tmp_path_factory.mktemp("curve-pool")
    front, back = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    procs = [start(log_dir, "bertpool.broker.broker", "--address", front, "--worker-address", back,
                   "--stats-interval-s", "0", "--curve-secret-key", keys.secret("broker"),
                   "--curve-allow-clients", str(keys.allow_clients),
                   "--curve-allow-workers", str(keys.allow_workers))]
    try:
        procs.append(start(log_dir, "bertpool.workers.supervisor", "--worker-address", back, "--parallel", "1",
                           "--backend", "echo", "--batch-timeout-ms", "1",
                           "--curve-server-key", keys.public("broker"),
                           "--curve-secret-key", keys.secret("worker")))
        try:
            wait_for_workers(front, 1, 60, curve=keys.client())
        except RequestTimeout as exc:
            raise AssertionError(f"{exc}\n{logs(log_dir)}") from exc
        yield CurvePool(front, back, log_dir, procs)
    finally:
        stop(procs)


def broker_stats(pool: CurvePool, keys: Keys) -> dict:
    with Client(pool.front, timeout_s=10, curve=keys.client()) as client:
        return client.stats()


def wait_stats(pool: CurvePool, keys: Keys, predicate, timeout_s: float = 60.0) -> dict:
    """Poll the broker's stats (a remote counter: no event to wait on) until predicate holds."""
    deadline = time.monotonic() + timeout_s
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = broker_stats(pool, keys)
        if predicate(stats):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"stats never satisfied the condition; last: {stats}\n{logs(pool.log_dir)}")


class TcpTap:
    """A TCP proxy on 127.0.0.1 that forwards every connection to ``target_port`` and keeps a copy
    of the bytes sent upstream (client -> server)."""

    def __init__(self, target_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._target = target_port
        self.upstream = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        peers: dict[socket.socket, tuple[socket.socket, bool]] = {}  # sock -> (other end, is client side)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    if sock is self._listener:
                        down, _ = self._listener.accept()
                        up = socket.create_connection(("127.0.0.1", self._target), timeout=5)
                        for s, other, is_client in ((down, up, True), (up, down, False)):
                            s.setblocking(True)
                            peers[s] = (other, is_client)
                            sel.register(s, selectors.EVENT_READ)
                        continue
                    other, is_client = peers[sock]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        for s in (sock, other):
                            sel.unregister(s)
                            peers.pop(s)
                            s.close()
                        continue
                    if is_client:
                        self.upstream += data
                    other.sendall(data)
        finally:
            for s in list(peers):
                s.close()
            sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


# ----------------------------------------------------------------- key tool

def test_keys_tool_writes_certificates_pyzmq_loads(tmp_path, capsys):
    assert keys_cli.main([str(tmp_path / "new" / "keys"), "broker", "client-1"]) == 0
    for name in ("broker", "client-1"):
        public, none = zmq.auth.load_certificate(tmp_path / "new" / "keys" / f"{name}.key")
        public2, secret = zmq.auth.load_certificate(tmp_path / "new" / "keys" / f"{name}.key_secret")
        assert none is None and public == public2 and zmq.curve_public(secret) == public
        assert (tmp_path / "new" / "keys" / f"{name}.key_secret").stat().st_mode & 0o077 == 0
    assert "client-1.key_secret" in capsys.readouterr().out


def test_keys_tool_refuses_to_overwrite_without_force(tmp_path, capsys):
    assert keys_cli.main([str(tmp_path), "a"]) == 0
    before = (tmp_path / "a.key_secret").read_bytes()
    assert keys_cli.main([str(tmp_path), "b", "a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "a.key_secret").read_bytes() == before and not (tmp_path / "b.key").exists()
    assert keys_cli.main([str(tmp_path), "a", "--force"]) == 0
    assert (tmp_path / "a.key_secret").read_bytes() != before
    load_key_pair(tmp_path / "a.key_secret")


@pytest.mark.parametrize("where, name, message", [
    ("file", "a", "is not a directory"),
    ("file/sub", "a", "cannot create key directory"),
    ("dir", "../escape", "bad key name"),
    ("dir", "", "bad key name"),
])
def test_keys_tool_bad_paths_exit_2(tmp_path, where, name, message):
    (tmp_path / "file").write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "bertpool.common.keys", str(tmp_path / where), name],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("*.key*"))


# ------------------------------------------------------------- bad key files

def _bad_files(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "text.key_secret").write_text("hello, I am not a certificate\n")
    (tmp_path / "short.key_secret").write_text('public-key = "abc"\nsecret-key = "def"\n')
    good = Path(keys.secret("client")).read_text()
    other_secret = Path(keys.secret("stranger")).read_text().split("secret-key")[1]
    mixed = good.split("secret-key")[0] + "secret-key" + other_secret
    (tmp_path / "mixed.key_secret").write_text(mixed)
    # 40 Z85 characters whose value overflows (pyzmq raises struct.error), and a key line without '='
    # (pyzmq raises IndexError): both were tracebacks.
    (tmp_path / "overflow.key_secret").write_text('public-key = "' + "#" * 40 + '"\nsecret-key = "' + "#" * 40 + '"\n')
    (tmp_path / "nosep.key_secret").write_text('public-key "abc"\n')
    return {"missing": str(tmp_path / "nope.key_secret"), "directory": str(tmp_path),
            "text": str(tmp_path / "text.key_secret"), "short": str(tmp_path / "short.key_secret"),
            "mixed": str(tmp_path / "mixed.key_secret"), "public": keys.public("client"),
            "overflow": str(tmp_path / "overflow.key_secret"), "nosep": str(tmp_path / "nosep.key_secret")}


@pytest.mark.parametrize("bad, message", [
    ("missing", "does not exist"), ("directory", "not a regular file"), ("text", "not a ZeroMQ certificate"),
    ("short", "not a valid 40-character Z85"), ("mixed", "does not belong"), ("public", "holds only a public key"),
    ("overflow", "not a valid 40-character Z85"), ("nosep", "line without '='"),
])
def test_bad_secret_key_files_are_config_errors(tmp_path, keys, bad, message):
    path = _bad_files(tmp_path, keys)[bad]
    with pytest.raises(ConfigError, match=message):
        CurveClientConfig(server_key_file=keys.public("broker"), secret_key_file=path)
    with pytest.raises(ConfigError, match=message):
        CurveServerConfig(path, str(keys.allow_clients), str(keys.allow_workers))


def test_bad_server_key_and_allow_lists_are_config_errors(tmp_path, keys):
    files = _bad_files(tmp_path, keys)
    with pytest.raises(ConfigError, match="not a ZeroMQ certificate"):
        CurveClientConfig(server_key_file=files["text"], secret_key_file=keys.secret("client"))
    with pytest.raises(ConfigError, match="does not exist"):
        CurveClientConfig(server_key_file=files["missing"], secret_key_file=keys.secret("client"))
    with pytest.raises(ConfigError, match="needs our own key pair"):
        CurveClientConfig(server_key_file=keys.public("broker"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no public keys"):
        CurveServerConfig(keys.secret("broker"), str(tmp_path / "empty"), str(keys.allow_workers))
    with pytest.raises(ConfigError, match="must be different directories"):
        CurveServerConfig(keys.secret("broker"), str(keys.allow_clients), str(keys.allow_clients))
    bad_list = tmp_path / "bad-list"
    bad_list.mkdir()
    shutil.copy(files["text"], bad_list / "junk.key")
    with pytest.raises(ConfigError, match="junk.key is not a ZeroMQ certificate"):
        CurveServerConfig(keys.secret("broker"), str(keys.allow_clients), str(bad_list))


@pytest.mark.parametrize("mode, warned", [(0o600, False), (0o400, False), (0o640, True), (0o644, True)])
def test_a_secret_key_file_others_may_read_is_warned_about(tmp_path, keys, caplog, mode, warned):
    """bertpool-keys writes secret keys 0600; one copied loosely (0644) still loads, with a warning."""
    path = tmp_path / "copy.key_secret"
    shutil.copy(keys.secret("client"), path)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="bertpool.security"):
        assert load_key_pair(str(path)) == load_key_pair(keys.secret("client"))
    said = [r.getMessage() for r in caplog.records if "readable by others" in r.getMessage()]
    assert bool(said) is warned, said
    assert not said or f"mode {mode:04o}" in said[0] and "chmod 600" in said[0]


def test_loaded_keys_work_like_files(keys):
    public, secret = load_key_pair(keys.secret("client"))
    from_keys = CurveClientConfig(server_key=load_key_pair(keys.secret("broker"))[0],
                                  public_key=public, secret_key=secret)
    assert from_keys.secret_key == keys.client().secret_key and "secret" not in repr(from_keys).split("(")[0]
    assert secret.decode() not in repr(from_keys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_a_config_error(tmp_path, keys):
    path = tmp_path / "locked.key_secret"
    shutil.copy(keys.secret("client"), path)
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read key file"):
        CurveClientConfig(server_key_file=keys.public("broker"), secret_key_file=str(path))


@pytest.mark.parametrize("module, args, message", [
    ("bertpool.broker.broker", ["--curve-secret-key", "{all}/nope.key_secret", "--curve-allow-clients",
                                "{allow_clients}", "--curve-allow-workers", "{allow_workers}"], "does not exist"),
    ("bertpool.broker.broker", ["--curve-secret-key", "{all}/broker.key_secret"], "needs both"),
    ("bertpool.broker.broker", ["--curve-allow-clients", "{allow_clients}"], "need --curve-secret-key"),
    ("bertpool.broker.broker", ["--curve-secret-key", "{all}/broker.key", "--curve-allow-clients",
                                "{allow_clients}", "--curve-allow-workers", "{allow_workers}"],
     "holds only a public key"),
    ("bertpool.workers.worker", ["--curve-server-key", "{all}/broker.key", "--curve-secret-key",
                                 "{all}/worker.key"], "holds only a public key"),
    ("bertpool.workers.supervisor", ["--curve-server-key", "{all}/broker.key"], "needs both"),
    ("bertpool.clients.bench", ["--curve-server-key", "{all}/nope.key", "--curve-secret-key",
                                "{all}/client.key_secret"], "does not exist"),
    ("bertpool.pool.serve", ["--curve-secret-key", "{all}/broker.key_secret", "--curve-allow-clients",
                                "{allow_clients}", "--curve-allow-workers", "{allow_workers}"],
     "needs --curve-worker-secret-key"),
    ("bertpool.pool.serve", ["--curve-secret-key", "{all}/broker.key_secret", "--curve-allow-clients",
                                "{allow_clients}", "--curve-allow-workers", "{allow_workers}",
                                "--curve-worker-secret-key", "{all}/stranger.key_secret"],
     "not in --curve-allow-workers"),
    ("bertpool.pool.serve", ["--curve-worker-secret-key", "{all}/worker.key_secret"],
     "needs --curve-secret-key"),
])
def test_bad_curve_flags_exit_2_with_a_clear_message(keys, module, args, message):
    fill = {"all": keys.dir, "allow_clients": keys.allow_clients, "allow_workers": keys.allow_workers}
    proc = subprocess.run([sys.executable, "-m", module, *(a.format(**fill) for a in args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -------------------------------------------------------------- live pools

def test_allowed_client_and_worker_are_served(curve_pool, keys):
    with Client(curve_pool.front, timeout_s=20, curve=keys.client()) as client:
        results = client.predict_many([(f"secret {i}", "pair") for i in range(20)])
        stats = client.stats()
    assert len(results) == 20 and all(r.label in (0, 1) for r in results)
    assert len(stats["workers"]) == 1 and stats["broker"]["replies"] >= 20
    assert stats["curve"]["clients"]["allowed"] >= 1 and stats["curve"]["workers"]["allowed"] >= 1


REFUSALS = {"no key": "uses CURVE and we do not|if the broker uses CURVE, give --curve-server-key",
            "unknown key": "refused our CURVE public key", "worker's key": "refused our CURVE public key",
            "wrong server key": "is --curve-server-key the broker's public key"}


@pytest.mark.parametrize("who", list(REFUSALS))
def test_client_without_an_allowed_key_is_refused(curve_pool, keys, who):
    """Refused at the handshake: each request fails with a typed error that says why, also one sent
    after the refusal, and the pool serves others. A refused key fails at once (HandshakeFailed,
    long before the deadline); a failure without detail (a wrong server key) may also be a broker
    dying mid-handshake, so those requests are resent first, and fail with the reason as hint."""
    curve = {"no key": None, "unknown key": keys.client("stranger"), "worker's key": keys.client("worker"),
             "wrong server key": keys.client("client", server="stranger")}[who]
    final = who in ("unknown key", "worker's key")
    with Client(curve_pool.front, timeout_s=60 if final else 5, curve=curve) as refused:
        for _ in range(2):  # the second is sent after the refusal: it must fail too, not hang
            with pytest.raises(HandshakeFailed if final else (RequestTimeout, BrokerUnavailable),
                               match=REFUSALS[who]) as caught:
                refused.predict("not", "served")
            assert curve_pool.front in str(caught.value)
        if who == "unknown key":  # the operator is told which key to allow
            assert keys.client("stranger").public_key.decode() in str(caught.value)
        with Client(curve_pool.front, timeout_s=20, curve=keys.client()) as allowed:
            assert allowed.predict("still", "served").label in (0, 1)
    if who in ("unknown key", "worker's key"):  # refused by ZAP, which counts it
        assert broker_stats(curve_pool, keys)["curve"]["clients"]["denied"] >= 1


def test_a_client_refused_at_the_handshake_is_served_once_the_server_is_mended(keys, tmp_path):
    """ZeroMQ gives up on a link after a security mechanism mismatch; the client's next request goes
    out on a fresh one, so it reaches a broker that takes it there now."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    curve_only = zmq.Context.instance().socket(zmq.ROUTER)
    curve_only.curve_server, curve_only.curve_secretkey = True, load_key_pair(keys.secret("broker"))[1]
    curve_only.bind(address)
    broker, thread = None, None
    try:
        with Client(address, timeout_s=60) as client:
            with pytest.raises(BrokerUnavailable, match="CURVE"):  # at once if final, else after resends
                client.stats()
            curve_only.close(linger=0)
            broker = Broker(BrokerConfig(frontend=address, backend=f"ipc://{tmp_path}/back"))
            for _ in range(100):  # the closed socket frees its port asynchronously
                try:
                    broker.bind()
                    break
                except ConfigError:
                    time.sleep(0.05)
            else:
                pytest.fail(f"{address} was not free again within 5 s")
            thread = threading.Thread(target=broker.run, daemon=True)
            thread.start()
            assert client.stats(timeout_s=30)["workers"] == {}
    finally:
        curve_only.close(linger=0)
        if broker is not None:
            broker.stop()
        if thread is not None:
            thread.join(10)


@pytest.mark.parametrize("key", ["stranger", "client"])
def test_worker_without_an_allowed_key_never_registers(curve_pool, keys, key, tmp_path):
    """An unknown key, and a client's key (allowed on the frontend only), cannot register as a worker;
    the worker finds out from the refusal once the broker stays silent, and exits for good saying why."""
    before = broker_stats(curve_pool, keys)
    names = set(before["workers"])
    denied = before["curve"]["workers"]["denied"]
    proc = start(tmp_path, "bertpool.workers.worker", "--worker-address", curve_pool.back, "--backend", "echo",
                 "--name", f"intruder-{key}", "--curve-server-key", keys.public("broker"),
                 "--curve-secret-key", keys.secret(key))
    try:
        stats = wait_stats(curve_pool, keys, lambda s: s["curve"]["workers"]["denied"] > denied)
        assert set(stats["workers"]) == names
        assert "CURVE: refused a worker with unknown public key" in logs(curve_pool.log_dir)
        with Client(curve_pool.front, timeout_s=20, curve=keys.client()) as client:
            assert len(client.predict_many([("still", "served")] * 8)) == 8
            assert set(client.stats()["workers"]) == names
        assert proc.wait(60) == EXIT_REFUSED
        log = logs(tmp_path)
        assert "refused our CURVE public key" in log and "--curve-allow-workers" in log, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_workers_refused_by_the_broker_stop_the_pool_saying_why(curve_pool, keys, tmp_path):
    """bertpool-workers whose key the broker refuses does not restart them forever: it stops, saying so."""
    proc = subprocess.run([sys.executable, "-m", "bertpool.workers.supervisor", "--worker-address", curve_pool.back,
                           "--backend", "echo", "--parallel", "1", "--curve-server-key", keys.public("broker"),
                           "--curve-secret-key", keys.secret("stranger")],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "cannot talk to the broker: the broker at" in out, out
    assert "refused our CURVE public key" in out and "stopping all workers" in out


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain-control"])
def test_payload_is_not_plain_text_on_the_wire(curve_pool, keys, start_pool, curve):
    if curve:
        front, client_curve = curve_pool.front, keys.client()
    else:
        front, client_curve = start_pool(parallel=1, transport="tcp").address, None
    tap = TcpTap(int(front.rsplit(":", 1)[1]))
    try:
        with Client(f"tcp://127.0.0.1:{tap.port}", timeout_s=20, curve=client_curve) as client:
            assert client.predict(SECRET_TEXT, "the other sentence").label in (0, 1)
    finally:
        tap.close()
    assert len(tap.upstream) > 0
    assert (SECRET_TEXT.encode() in bytes(tap.upstream)) is not curve


def test_serve_enables_curve_for_its_broker_and_workers_with_one_set_of_flags(keys, start_pool):
    pool = start_pool("--backend", "echo", "--curve-secret-key", keys.secret("broker"),
                      "--curve-allow-clients", str(keys.allow_clients),
                      "--curve-allow-workers", str(keys.allow_workers),
                      "--curve-worker-secret-key", keys.secret("worker"),
                      parallel=2, transport="tcp", wait=False)
    try:
        wait_for_workers(pool.address, 2, 60, curve=keys.client())
    except RequestTimeout as exc:
        raise AssertionError(f"{exc}\n{pool.log()}") from exc
    with Client(pool.address, timeout_s=20, curve=keys.client()) as client:
        assert len(client.predict_many([("serve", "curve")] * 8)) == 8
    with Client(pool.address, timeout_s=0.7) as plain:
        for _ in range(2):
            with pytest.raises((RequestTimeout, BrokerUnavailable)):
                plain.predict("plain", "refused")
    pool.process.send_signal(signal.SIGHUP)  # serve's broker reads its allow-lists again, and serves on
    wait_log(pool.log_path, "CURVE allow-lists reloaded: clients 1 (+0 -0), workers 1 (+0 -0)")
    with Client(pool.address, timeout_s=20, curve=keys.client()) as client:
        assert client.predict("after", "reload").label in (0, 1)


def test_defaults_bind_loopback_only_and_exposed_plain_binds_are_warned(caplog, keys):
    import argparse

    from bertpool.broker.broker import BrokerConfig, add_broker_arguments, broker_config_from_args
    from bertpool.common.cli import add_link_arguments

    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    add_link_arguments(parser)
    for config in (BrokerConfig(), broker_config_from_args(parser.parse_args([]), 0.0)):
        assert config.curve is None
        assert config.frontend.startswith("tcp://127.0.0.1:") and config.backend.startswith("tcp://127.0.0.1:")
        assert warn_if_exposed([config.frontend, config.backend], config.curve) == []
    exposed = ["tcp://0.0.0.0:1", "tcp://*:2", "tcp://10.1.2.3:3"]
    with caplog.at_level("WARNING", logger="bertpool.security"):
        assert warn_if_exposed([*exposed, "tcp://localhost:4", "ipc:///tmp/x"], None) == exposed
    assert caplog.text.count("WITHOUT CURVE") == 3
    server = CurveServerConfig(keys.secret("broker"), str(keys.allow_clients), str(keys.allow_workers))
    assert warn_if_exposed(exposed, server) == []


def test_bench_with_a_refused_key_says_so_at_once(curve_pool, keys):
    proc = subprocess.run([sys.executable, "-m", "bertpool.clients.bench", "--address", curve_pool.front,
                           "--clients", "1", "--cycle", "1", "--connect-timeout-s", "60",
                           "--curve-server-key", keys.public("broker"),
                           "--curve-secret-key", keys.secret("stranger")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2 and "refused our CURVE public key" in proc.stderr, proc.stdout + proc.stderr
    assert "no broker answered" not in proc.stderr


def test_bench_failure_report_with_curve_keys_holds_no_key(keys, tmp_path):
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.clients.bench", "--address", "ipc:///nonexistent-bertpool",
                           "--clients", "1", "--cycle", "1", "--connect-timeout-s", "0.5", "--json", str(report),
                           "--curve-server-key", keys.public("broker"), "--curve-secret-key", keys.secret("client")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    text = report.read_text()
    assert json.loads(text)["ok"] is False and json.loads(text)["config"]["curve"] is True
    assert all(key.decode() not in text for key in load_key_pair(keys.secret("client")))


@pytest.mark.parametrize("clients", [["--clients", "2"], ["--sweep-clients", "1,2"]], ids=["run", "sweep"])
def test_bench_passes_curve_keys_to_its_clients(curve_pool, keys, tmp_path, clients):
    """Every client the bench starts, and its wait for the workers, use the keys; the report says CURVE
    was on and never holds a key."""
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bertpool.clients.bench", "--address", curve_pool.front,
                           *clients, "--cycle", "4", "--warmup", "1", "--timeout-s", "20",
                           "--wait-workers", "1", "--wait-timeout-s", "30",
                           "--json", str(report), "--curve-server-key", keys.public("broker"),
                           "--curve-secret-key", keys.secret("client")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert json.loads(text)["ok"] and json.loads(text)["config"]["curve"] is True
    assert json.loads(text)["requests"] == (8 if "--clients" in clients else 4 + 8)
    assert all(key.decode() not in text for key in load_key_pair(keys.secret("client")))


def wait_log(path: Path, text: str, count: int = 1, timeout_s: float = 30.0) -> None:
    """Poll a process's log until ``text`` appears ``count`` times (a remote event: nothing else to wait on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} never logged:\n{path.read_text(errors='replace')}")


def test_sighup_reloads_the_allow_lists_without_a_restart(keys, tmp_path):
    """A key added to an allow-list is let in after SIGHUP, even on the link of a client it refused
    before; a key removed is refused from its next handshake on; lists that cannot be read leave the
    old ones in use, loudly."""
    allow_clients, allow_workers = tmp_path / "clients", tmp_path / "workers"
    shutil.copytree(keys.allow_clients, allow_clients)
    shutil.copytree(keys.allow_workers, allow_workers)
    front = f"tcp://127.0.0.1:{free_tcp_port()}"
    broker = start(tmp_path, "bertpool.broker.broker", "--address", front,
                   "--worker-address", f"tcp://127.0.0.1:{free_tcp_port()}", "--stats-interval-s", "0",
                   "--curve-secret-key", keys.secret("broker"), "--curve-allow-clients", str(allow_clients),
                   "--curve-allow-workers", str(allow_workers))
    log = next(tmp_path.glob("*.log"))
    try:
        with Client(front, timeout_s=30, curve=keys.client()) as client:
            client.stats()  # the broker is up
        with Client(front, timeout_s=30, curve=keys.client("stranger")) as stranger:
            with pytest.raises(HandshakeFailed, match="refused our CURVE public key"):
                stranger.stats()
            shutil.copy(keys.public("stranger"), allow_clients)
            broker.send_signal(signal.SIGHUP)
            wait_log(log, "CURVE allow-lists reloaded: clients 2 (+1 -0), workers 1 (+0 -0)")
            assert "curve" in stranger.stats()  # the same client, on a fresh link: served now
        (allow_clients / "client.key").unlink()
        broker.send_signal(signal.SIGHUP)
        wait_log(log, "CURVE allow-lists reloaded: clients 1 (+0 -1)")
        with Client(front, timeout_s=30, curve=keys.client()) as removed:
            with pytest.raises(HandshakeFailed, match="refused our CURVE public key"):
                removed.stats()
        for key in allow_workers.iterdir():
            key.unlink()  # an allow-list with no key at all is a mistake, not "refuse everyone"
        broker.send_signal(signal.SIGHUP)
        wait_log(log, "CURVE allow-lists NOT reloaded, the old ones stay in use")
        assert "holds no public keys" in log.read_text()
        with Client(front, timeout_s=30, curve=keys.client("stranger")) as stranger:
            assert "curve" in stranger.stats()
        assert broker.poll() is None
    finally:
        stop([broker])


def gateway_infer(http: str, timeout_s: float = 60.0) -> dict:
    """One text pair through the gateway's HTTP endpoint, retried (bounded) until the pool is ready."""
    body = json.dumps({"inputs": [{"name": n, "shape": [1], "datatype": "BYTES", "data": [t]}
                                  for n, t in (("text_a", "gateway"), ("text_b", "with curve"))]}).encode()
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"http://{http}/v2/models/bertpool-mrpc/infer", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, ConnectionError) as exc:  # not listening or not ready yet
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"the gateway never answered: {last}")


def test_serve_gateway_connects_to_its_broker_with_curve(keys, start_pool):
    """With CURVE on, serve's gateway child connects with --curve-gateway-secret-key, to the broker
    bound on a wildcard address (which it reaches on loopback), and serves."""
    http = f"127.0.0.1:{free_tcp_port()}"
    pool = start_pool("--backend", "echo", "--address", f"tcp://*:{free_tcp_port()}",
                      "--curve-secret-key", keys.secret("broker"), "--curve-allow-clients", str(keys.allow_clients),
                      "--curve-allow-workers", str(keys.allow_workers),
                      "--curve-worker-secret-key", keys.secret("worker"),
                      "--curve-gateway-secret-key", keys.secret("client"), "--gateway-http", http,
                      parallel=1, transport="tcp", wait=False)
    reply = gateway_infer(http)
    assert {o["name"] for o in reply["outputs"]} == {"probabilities", "label"}, (reply, pool.log())


@pytest.mark.parametrize("gateway_key, message", [
    (None, "a gateway needs --curve-gateway-secret-key FILE"),
    ("stranger", "its public key is not in --curve-allow-clients"),
])
def test_serve_refuses_a_curve_gateway_that_could_not_connect(keys, tmp_path, gateway_key, message):
    args = ["--curve-gateway-secret-key", keys.secret(gateway_key)] if gateway_key else []
    out = subprocess.run([sys.executable, "-m", "bertpool.pool.serve", "--backend", "echo", "--parallel", "1",
                          "--address", f"ipc://{tmp_path}/f", "--worker-address", f"ipc://{tmp_path}/b",
                          "--curve-secret-key", keys.secret("broker"), "--curve-allow-clients", str(keys.allow_clients),
                          "--curve-allow-workers", str(keys.allow_workers),
                          "--curve-worker-secret-key", keys.secret("worker"), *args,
                          "--gateway-http", str(free_tcp_port())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("bound, local", [
    ("tcp://*:5555", "tcp://127.0.0.1:5555"), ("tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"),
    ("tcp://[::]:5555", "tcp://[::1]:5555"), ("tcp://10.1.2.3:5555", "tcp://10.1.2.3:5555"),
    ("ipc:///tmp/x", "ipc:///tmp/x"),
])
def test_local_endpoint_of_a_bound_address(bound, local):
    assert local_endpoint(bound) == local


@pytest.mark.parametrize("module, flags", [
    ("bertpool.workers.supervisor", ["--curve-server-key", "{broker}", "--curve-secret-key", "{worker}"]),
    ("bertpool.pool.serve", ["--curve-secret-key", "{broker_secret}", "--curve-allow-clients", "{clients}",
                             "--curve-allow-workers", "{workers}", "--curve-worker-secret-key", "{worker}"]),
])
def test_a_worker_config_file_cannot_quietly_drop_the_curve_keys_asked_for(keys, tmp_path, module, flags):
    from bertpool.common import configdata
    from bertpool.workers.backends import BackendConfig
    from bertpool.workers.worker import WorkerConfig

    back = f"ipc://{tmp_path}/b"
    configdata.write_json(WorkerConfig(broker_address=back, backend=BackendConfig(name="echo")), tmp_path / "w.json")
    names = {"broker": keys.public("broker"), "worker": keys.secret("worker"), "broker_secret": keys.secret("broker"),
             "clients": str(keys.allow_clients), "workers": str(keys.allow_workers)}
    address = [] if module.endswith("supervisor") else ["--address", f"ipc://{tmp_path}/f"]
    out = subprocess.run([sys.executable, "-m", module, *address, "--worker-address", back,
                          "--worker-config-json", str(tmp_path / "w.json"),
                          *[f.format(**names) for f in flags]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "CURVE keys included" in out.stderr and "Traceback" not in out.stderr, out.stderr
