"""What a pool running for weeks meets: links that flap while idle, a process out of file descriptors.

Each test stays short (seconds): the long soaks (memory and descriptors over hours of load, thousands of
short-lived clients) are measurements, not tests.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

import bertpool.broker.broker as broker_module
import bertpool.clients.client as client_module
from bertpool.broker.broker import Broker, BrokerConfig
from bertpool.clients.client import Client
from bertpool.common.errors import DeadlineExceeded
from bertpool.common.fastzmq import open_monitor
from conftest import free_tcp_port


@pytest.fixture
def flapping():
    """A tcp address whose listener accepts every connection and closes it at once (a balancer
    closing idle connections, a broker restarting in a loop): ``(address, accepted)``, where
    ``accepted()`` counts the connections it closed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.1)
    done, count = threading.Event(), [0]

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # timeout: look at ``done`` again
                continue
            conn.close()
            count[0] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}", lambda: count[0]
    done.set()
    thread.join(5)
    server.close()


def test_a_monitor_nobody_reads_never_stops_the_other_sockets(flapping):
    """libzmq sends monitor events with a blocking send from its I/O thread: once ~2,000 events went
    unread (a link flapping while its owner idles: each flap says CONNECTED and DISCONNECTED), that
    thread stopped for good, and every socket of the context with it. A Client left idle beside
    another froze the other's requests ("nothing heard from the broker")."""
    address, accepted = flapping
    ctx = zmq.Context()
    link = ctx.socket(zmq.DEALER)
    link.setsockopt(zmq.LINGER, 0)
    link.setsockopt(zmq.RECONNECT_IVL, 1)  # flap every millisecond, not every 100
    monitor = open_monitor(link, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED, "test")
    link.connect(address)
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("tcp://127.0.0.1:*")
        b.connect(a.last_endpoint.decode())
        give_up = time.monotonic() + 15
        while accepted() < 1500 and time.monotonic() < give_up:  # 3,000 events, none read
            time.sleep(0.02)
        assert accepted() >= 1500, f"the link stopped reconnecting after {accepted()} flaps: ZeroMQ is stuck"
        b.send(b"still there?")
        assert a.poll(5000), "a socket beside the unread monitor got nothing: ZeroMQ's I/O thread is stuck"
    finally:
        for _ in range(100_000):  # unstick ZeroMQ (without the fix), so the link can close
            if not monitor.poll(0):
                break
            monitor.recv_multipart()
        link.disable_monitor()
        for sock in (link, monitor, a, b):
            sock.close(linger=0)
        ctx.term()


def test_an_idle_client_reads_its_links_news_while_parked(flapping, monkeypatch):
    """The parked I/O thread reads the idle link's monitor, so a link that flaps for as long as the
    Client idles does not pile its events up in memory; what they said is kept for the next request."""
    monkeypatch.setattr(client_module, "PARKED_READ_S", 0.05)
    address, accepted = flapping
    with Client(address, timeout_s=5) as client:  # nothing is ever asked: its I/O thread stays parked
        give_up = time.monotonic() + 10
        while not (client._ever_connected and client._down_since is not None) and time.monotonic() < give_up:
            time.sleep(0.02)
        assert client._ever_connected and client._down_since is not None, \
            f"after {accepted()} flaps the idle client had read none of its monitor's events"


def test_nothing_answered_names_a_process_out_of_file_descriptors(monkeypatch):
    """Out of descriptors, ZeroMQ cannot open the connection and retries in silence: 'is a broker
    running there?' sent the user to look for a broker that was there all along."""
    monkeypatch.setattr(client_module, "out_of_files", lambda headroom=0: "this process reached its open-file limit")
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    with Client(address, timeout_s=0.2) as client:
        with pytest.raises(DeadlineExceeded, match=f"no connection to {address} could be opened: this process "
                                                   f"reached its open-file limit"):
            client.predict("a", "b")


# Run in a child: the open-file limit is the whole process's.
_OUT_OF_FILES = r"""
import os, resource, sys
from bertpool.clients.client import Client
from bertpool.common.errors import ConfigError
from bertpool.common.fastzmq import out_of_files
assert out_of_files() is None
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
clients, errors = [], []
for _ in range(40):  # a Client takes several descriptors: 64 run out long before 40 clients
    try:
        clients.append(Client(sys.argv[1]))
    except ConfigError as exc:
        errors.append(str(exc))
held = []
while True:
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
# The clients' I/O threads keep trying to connect (nothing listens), each try a socket opened and
# closed: a descriptor may come free meanwhile. Take it, and ask again (bounded).
for _ in range(1000):
    why = out_of_files()
    if why is not None:
        break
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
print(why)
for message in errors:
    print("ConfigError:", message)
"""


def test_out_of_file_descriptors_is_named_with_the_limit():
    """A Client that cannot get the descriptors its sockets need raises ConfigError naming the limit
    (some of its sockets raised a bare ZMQError), and out_of_files() says so too."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    done = subprocess.run([sys.executable, "-c", _OUT_OF_FILES, address], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    limit = "this process reached its open-file limit of 64 file descriptors: raise ulimit -n"
    assert lines[0].startswith(limit), lines
    assert lines[1:], "every Client got its descriptors under a limit of 64"
    assert all(line.startswith(f"ConfigError: cannot connect to {address}: {limit}") for line in lines[1:]), lines


# Run in a child: the open-file limit is the whole process's. Its context frees two descriptors
# as a socket fails, as other Clients' I/O threads may between a failure and its explanation.
_FREED_AFTER_THE_FAILURE = r"""
import os, resource, sys
import zmq
from bertpool.clients.client import Client
from bertpool.common.errors import ConfigError
held = []
class FreesTwoAsItFails(zmq.Context):
    def socket(self, *args, **kwargs):
        try:
            return super().socket(*args, **kwargs)
        except zmq.ZMQError:
            os.close(held.pop())
            os.close(held.pop())
            raise
ctx = FreesTwoAsItFails()
ctx.socket(zmq.PAIR).close()  # its I/O threads start now, with descriptors to spare
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
while True:
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
try:
    Client(sys.argv[1], context=ctx)
except ConfigError as exc:
    print("ConfigError:", exc)
else:
    print("the Client got its sockets: nothing was tried")
"""


def test_out_of_file_descriptors_is_named_though_some_came_free_since():
    """A failure for want of descriptors is explained after it happened: a couple freed meanwhile
    (a connection attempt's, by another Client's I/O thread) made it read as the context's
    MAX_SOCKETS, which the user could raise to no avail."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    done = subprocess.run([sys.executable, "-c", _FREED_AFTER_THE_FAILURE, address], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ConfigError: cannot connect to {address}: this process reached its "
                                  f"open-file limit of 64 file descriptors"), done.stdout


def test_the_broker_says_when_it_runs_out_of_file_descriptors(monkeypatch, caplog, tmp_path):
    """Out of descriptors, the broker cannot accept a connection and ZeroMQ says nothing (its I/O
    thread spins on the accept): the broker says so once a heartbeat finds it, again each minute it
    lasts, and once more when it is over."""
    broker = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b"))
    state = {"why": "this process reached its open-file limit of 64 file descriptors"}
    monkeypatch.setattr(broker_module, "out_of_files", lambda: state["why"])
    caplog.set_level(logging.INFO, logger="bertpool.broker")
    for now in (100.0, 101.0, 130.0, 160.0, 161.0):
        broker._check_open_files(now)
    state["why"] = None
    broker._check_open_files(162.0)
    broker._check_open_files(163.0)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "bertpool.broker"]
    assert [level for level, _ in said] == [logging.WARNING, logging.WARNING, logging.INFO], said
    assert said[0][1].startswith("cannot accept new connections: this process reached its open-file limit")
    assert said[1][1].startswith("cannot accept new connections (for 60 s):")
    assert said[2][1].startswith("file descriptors are free again after 62 s")
