"""Shared fixtures: real pools in real processes on ipc:// or 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from bertpool.clients.bench import wait_for_workers
from bertpool.clients.client import Client
from bertpool.common.errors import RequestError

# Under scripts/test a skip for want of an installed dependency fails the run (see require_deps.py).
from require_deps import pytest_configure, pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pool:
    """A running ``bertpool-serve`` process."""
    process: subprocess.Popen
    address: str
    worker_address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self, timeout_s: float = 5.0) -> dict:
        with Client(self.address, timeout_s=timeout_s) as client:
            return client.stats()

    def wait_workers(self, n: int, timeout_s: float = 120.0) -> None:
        """Block until the broker reports ``n`` ready workers (bounded in time)."""
        try:
            wait_for_workers(self.address, n, timeout_s)
        except RequestError as exc:
            raise AssertionError(f"{exc}; serve exit code {self.process.poll()}:\n{self.log()}") from exc

    def wait_stats(self, predicate, timeout_s: float = 30.0) -> dict:
        """Poll stats until ``predicate(stats)`` holds (bounded in time)."""
        deadline = time.monotonic() + timeout_s
        stats: dict = {}
        while time.monotonic() < deadline:
            stats = self.stats()
            if predicate(stats):
                return stats
            time.sleep(0.1)
        raise AssertionError(f"stats never satisfied the condition; last: {stats}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def sockets():
    """``dealer(address)``: a connected DEALER socket (LINGER 0), closed at teardown."""
    ctx = zmq.Context.instance()
    made = []

    def dealer(address: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        made.append(s)
        return s

    yield dealer
    for s in made:
        s.close()


def run_threads(target, count: int, timeout_s: float) -> None:
    """Run ``target(i)`` for i in range(count), each on its own thread, and wait for all of them
    (failing the test if one is still running after ``timeout_s``)."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running after their timeout"


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (bounded) until none of ``pids`` is alive; those still alive."""
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def start_module(tmp_path: Path, module: str, *args: str) -> subprocess.Popen:
    """``python -m module args`` in its own session (so stop_processes can reach what it starts),
    logging to a new file in tmp_path."""
    with open(tmp_path / f"{module}-{len(list(tmp_path.glob('*.log')))}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_processes(*procs: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM every live process (each in its own session), wait up to ``timeout_s`` for each
    (SIGKILL its session after that), then SIGKILL what is left in the sessions: processes they
    started must not outlive the test."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        wait_or_kill(p, timeout_s)
    for p in procs:
        kill_session(p)


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """``proc``'s exit code once it ends by itself within ``timeout_s``; else None, after SIGKILLing
    its session (``proc`` started with start_new_session: what it started goes too)."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        proc.wait()
        return None


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session (it must have started one of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def addresses(tmp_path: Path, transport: str) -> tuple[str, str]:
    if transport == "ipc":
        return f"ipc://{tmp_path}/front.ipc", f"ipc://{tmp_path}/back.ipc"
    return f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"


@pytest.fixture
def start_pool(tmp_path):
    """Factory: start_pool(*serve_args, parallel=2, transport="ipc") -> Pool; all stopped at teardown."""
    pools: list[Pool] = []

    def start(*args: str, parallel: int = 2, transport: str = "ipc", wait: bool = True) -> Pool:
        front, back = addresses(tmp_path, transport)
        log_path = tmp_path / f"serve-{len(pools)}.log"
        cmd = [sys.executable, "-m", "bertpool.pool.serve", "--address", front,
               "--worker-address", back, "--parallel", str(parallel), "--stats-interval-s", "0", *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pool = Pool(proc, front, back, log_path)
        pools.append(pool)
        if wait:
            pool.wait_workers(parallel)
        return pool

    yield start
    for pool in pools:
        pool.stop()
        try:  # the worker processes are in the pool's session: make sure none outlive it
            os.killpg(pool.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
