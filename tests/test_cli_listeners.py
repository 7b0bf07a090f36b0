"""common.cli.check_distinct_listeners: two listeners (HOST:PORT flags, tcp:// endpoints) on one port
are refused before anything starts, hosts compared by the addresses they bind, not as written; and
bertpool-broker, started alone, refuses them before binding as bertpool-serve does."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from bertpool.common.cli import check_distinct_listeners
from bertpool.common.errors import ConfigError

from conftest import free_tcp_port

P = 18790  # never bound: the check only compares


def _clash(first: str, first_value: str, second: str, second_value: str, port: int = P) -> str:
    """The one error line check_distinct_listeners gives for a clash, naming both flags."""
    return (f"{first} {first_value} and {second} {second_value} would listen on the same port ({port}); "
            f"give each a port of its own")


@pytest.mark.parametrize("listeners, endpoints, message", [
    # A name and the address it resolves to (localhost: /etc/hosts, no network).
    ({"--metrics-address": f"localhost:{P}", "--gateway-http": f"127.0.0.1:{P}"}, {},
     _clash("--metrics-address", f"localhost:{P}", "--gateway-http", f"127.0.0.1:{P}")),
    ({"--gateway-http": str(P), "--gateway-grpc": f"LOCALHOST:{P}"}, {},  # a bare port is 127.0.0.1
     _clash("--gateway-http", str(P), "--gateway-grpc", f"LOCALHOST:{P}")),
    ({"--metrics-address": f"127.0.0.1:{P}"}, {"--address": f"tcp://localhost:{P}"},
     _clash("--address", f"tcp://localhost:{P}", "--metrics-address", f"127.0.0.1:{P}")),
    ({}, {"--address": f"tcp://localhost:{P}", "--worker-address": f"tcp://127.0.0.1:{P}"},
     _clash("--address", f"tcp://localhost:{P}", "--worker-address", f"tcp://127.0.0.1:{P}")),
    # A wildcard takes the port on every address of its family, a name's included.
    ({"--metrics-address": f"0.0.0.0:{P}", "--gateway-http": f"127.0.0.1:{P}"}, {},
     _clash("--metrics-address", f"0.0.0.0:{P}", "--gateway-http", f"127.0.0.1:{P}")),
    ({"--metrics-address": f"0.0.0.0:{P}", "--gateway-grpc": f"localhost:{P}"}, {},
     _clash("--metrics-address", f"0.0.0.0:{P}", "--gateway-grpc", f"localhost:{P}")),
    ({"--metrics-address": f"127.0.0.1:{P}"}, {"--address": f"tcp://*:{P}"},
     _clash("--address", f"tcp://*:{P}", "--metrics-address", f"127.0.0.1:{P}")),
    ({"--gateway-http": f"localhost:{P}"}, {"--worker-address": f"tcp://*:{P}"},
     _clash("--worker-address", f"tcp://*:{P}", "--gateway-http", f"localhost:{P}")),
    ({"--metrics-address": f"127.0.0.1:{P}"}, {"--address": f"tcp://:{P}"},  # an empty host: every address
     _clash("--address", f"tcp://:{P}", "--metrics-address", f"127.0.0.1:{P}")),
], ids=["name-address", "bare-port-name", "endpoint-name", "endpoint-endpoint", "wildcard-address",
        "wildcard-name", "zmq-star-address", "zmq-star-name", "zmq-empty-host"])
def test_listeners_that_bind_one_address_and_port_are_refused_naming_both(listeners, endpoints, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        check_distinct_listeners(listeners, endpoints)


@pytest.mark.parametrize("listeners, endpoints", [
    ({"--metrics-address": f"localhost:{P}", "--gateway-http": f"127.0.0.1:{P + 1}"}, {}),  # other ports
    ({"--metrics-address": f"0.0.0.0:{P}"}, {"--address": f"tcp://*:{P + 1}"}),
    ({"--gateway-http": f"127.0.0.1:{P}", "--gateway-grpc": f"127.0.0.1:{P + 1}"},  # one host, ports apart
     {"--address": f"tcp://127.0.0.1:{P + 2}", "--worker-address": f"tcp://localhost:{P + 3}"}),
    ({"--gateway-http": f"127.0.0.2:{P}", "--gateway-grpc": f"localhost:{P}"}, {}),  # other addresses
    ({"--gateway-http": f"[::]:{P}", "--gateway-grpc": f"localhost:{P}"}, {}),  # IPv6's wildcard, IPv4's name
    ({"--metrics-address": f"localhost:{P}"}, {"--address": f"ipc:///tmp/{P}"}),  # ipc://: no port
], ids=["name-other-port", "wildcards-other-ports", "same-host-other-ports", "other-address",
        "other-family", "ipc"])
def test_listeners_on_ports_that_can_coexist_are_accepted(listeners, endpoints):
    check_distinct_listeners(listeners, endpoints)


def _fake_resolver(names: dict[str, list[str]], asked: list[tuple[str, int]]):
    """A getaddrinfo answering ``names`` (IPv4 addresses) and failing as for an unknown name on any
    other, recording each (host, family) it is asked."""
    def getaddrinfo(host, port, family=0, type=0, *args):
        asked.append((host, family))
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in names[host]]
    return getaddrinfo


def test_a_name_is_every_ipv4_address_it_resolves_to_and_resolved_only_for_one_port(monkeypatch):
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(socket, "getaddrinfo", _fake_resolver({"pool": ["127.0.0.5", "127.0.0.6"]}, asked))
    with pytest.raises(ConfigError, match=re.escape(_clash("--gateway-http", f"pool:{P}",
                                                           "--gateway-grpc", f"127.0.0.6:{P}"))):
        check_distinct_listeners({"--gateway-http": f"pool:{P}", "--gateway-grpc": f"127.0.0.6:{P}"})
    assert asked == [("pool", socket.AF_INET)]  # IPv4 only: bertpool's ZeroMQ links refuse IPv6
    asked.clear()
    check_distinct_listeners({"--gateway-http": f"pool:{P}", "--gateway-grpc": f"127.0.0.7:{P}"})
    check_distinct_listeners({"--gateway-http": f"pool:{P}", "--metrics-address": f"other:{P + 1}"},
                             {"--address": f"tcp://pool:{P + 2}"})
    assert asked == [("pool", socket.AF_INET)]  # the second call, all on ports of their own, asked nothing


@pytest.mark.parametrize("other", [f"127.0.0.1:{P}", f"0.0.0.0:{P}", f"localhost:{P}"])
def test_a_name_that_does_not_resolve_is_left_to_its_bind(monkeypatch, other):
    """No new failure here: binding it fails with its own error ("cannot listen there: ..."), which
    a clash message would hide; only the same name, as written, is known to be one place."""
    monkeypatch.setattr(socket, "getaddrinfo", _fake_resolver({"localhost": ["127.0.0.1"]}, []))
    check_distinct_listeners({"--gateway-http": f"nosuchhost:{P}", "--gateway-grpc": other})
    with pytest.raises(ConfigError, match=re.escape(_clash("--gateway-http", f"nosuchhost:{P}",
                                                           "--gateway-grpc", f"NoSuchHost:{P}"))):
        check_distinct_listeners({"--gateway-http": f"nosuchhost:{P}", "--gateway-grpc": f"NoSuchHost:{P}"})


# ------------------------------------------------- bertpool-broker started alone

@pytest.mark.parametrize("flags, first, second", [
    (["--address", "tcp://127.0.0.1:{port}", "--metrics-address", "localhost:{port}"],
     "--address tcp://127.0.0.1:{port}", "--metrics-address localhost:{port}"),
    (["--address", "tcp://*:{port}", "--metrics-address", "{port}"],
     "--address tcp://*:{port}", "--metrics-address {port}"),
    (["--worker-address", "tcp://localhost:{port}", "--metrics-address", "0.0.0.0:{port}"],
     "--worker-address tcp://localhost:{port}", "--metrics-address 0.0.0.0:{port}"),
], ids=["name", "zmq-star", "wildcard"])
def test_broker_refuses_a_metrics_address_on_its_tcp_port_before_binding(tmp_path, monkeypatch, capsys, flags,
                                                                        first, second):
    """bertpool-broker checked --metrics-address against its endpoints only when binding it, after
    both sockets were bound: one line now, exit 2, and nothing bound."""
    from bertpool.broker import broker

    def bind(self):
        pytest.fail("the broker bound its sockets before refusing the clash")
    monkeypatch.setattr(broker.Broker, "bind", bind)
    port = free_tcp_port()
    argv = ["--address", f"ipc://{tmp_path}/f", "--worker-address", f"ipc://{tmp_path}/b", "--stats-interval-s", "0",
            *(flag.format(port=port) for flag in flags)]
    assert broker.main(argv) == 2
    out = capsys.readouterr()
    first, second = first.format(port=port), second.format(port=port)
    assert out.err.strip().splitlines() == [
        f"bertpool-broker: error: {first} and {second} would listen on the same port ({port}); give each a port "
        f"of its own"]
    assert not out.out  # no banner


def test_broker_cli_refuses_the_clash_in_one_line(tmp_path):
    """The same, as a user runs it: exit 2, one error line, no banner (nothing started)."""
    port = free_tcp_port()
    proc = subprocess.run([sys.executable, "-m", "bertpool.broker.broker", "--address", f"tcp://127.0.0.1:{port}",
                           "--worker-address", f"ipc://{tmp_path}/b", "--metrics-address", f"localhost:{port}"],
                          capture_output=True, text=True, timeout=60)
    message = _clash("--address", f"tcp://127.0.0.1:{port}", "--metrics-address", f"localhost:{port}", port)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"bertpool-broker: error: {message}"]
    assert not proc.stdout
