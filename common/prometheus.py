"""A Prometheus endpoint (``--metrics-address``), shared by the commands that serve one.

The broker (``bertpool-broker``, and ``bertpool-serve`` through it) and the remote workers'
supervisor (``bertpool-workers``) each serve their own families from their own collectors;
what they share lives here: the check that the ``metrics`` extra is installed, the types and
descriptions of families named by METRICS-style tables, and the HTTP server itself.

prometheus-client is imported only inside these functions: importing this module never needs
the extra, so a command without ``--metrics-address`` runs without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .cli import parse_host_port
from .errors import ConfigError

EXTRA_HINT = "pip install 'bertpool[metrics]' (prometheus-client)"


def require_prometheus_client(flag: str = "--metrics-address"):
    """The prometheus_client module, or ConfigError naming ``flag`` and the extra that installs it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(f"{flag} needs prometheus-client: {EXTRA_HINT}") from exc
    return prometheus_client


def metric_type(name: str, histograms: Iterable[str] = ()) -> str:
    """The Prometheus type of the exported name ``name``: ``*_total`` names are counters, those in
    ``histograms`` histograms, the rest gauges."""
    if name.endswith("_total"):
        return "counter"
    return "histogram" if name in histograms else "gauge"


def family_name(name: str, histograms: Iterable[str] = ()) -> str:
    """The family of exported name ``name``: a counter's family has no ``_total`` (the client
    library adds it to the sample), the others are named as the name."""
    return name[:-len("_total")] if metric_type(name, histograms) == "counter" else name


def describe_families(metrics: dict[str, str], histograms: Iterable[str] = ()) -> list:
    """A collector's describe(): one empty family per entry of ``metrics`` (exported name -> help),
    of the type its collect() yields (``histograms``: the names that are histograms).

    The registry learns the sample names from these: prometheus-client's ``?name[]=`` filter
    serves only collectors whose names it knows, so a collector describing nothing answers every
    filtered scrape with an empty 200 (a target that looks healthy but reports nothing)."""
    from prometheus_client.core import Metric

    histograms = frozenset(histograms)
    return [Metric(family_name(name, histograms), help_text, metric_type(name, histograms))
            for name, help_text in metrics.items()]


class MetricsServer:
    """prometheus-client's HTTP server on a daemon thread, serving ``collectors`` (custom
    collectors, read at scrape time on that thread) from a registry of its own at ``address``
    (HOST:PORT, or PORT for 127.0.0.1, as :func:`~bertpool.common.cli.parse_host_port` reads it).

    ConfigError naming ``flag`` for a bad address, a missing extra, or an address it cannot
    listen on (in use, not on this host, an unknown name). close() stops it."""

    def __init__(self, address: str, collectors: Iterable[Any], flag: str = "--metrics-address") -> None:
        host, port = parse_host_port(address, flag)  # the address first: its error is the user's typo
        prometheus_client = require_prometheus_client(flag)
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self.registry.register(collector)
        try:
            self._server, self._thread = prometheus_client.start_http_server(port, addr=host,
                                                                             registry=self.registry)
        except OSError as exc:  # port in use, address not on this host, unknown host name
            raise ConfigError(f"{flag} {address}: cannot serve metrics there: {exc}") from exc
        self.host, self.port = host, self._server.server_port

    @property
    def url(self) -> str:
        """Where the metrics are scraped (an IPv6 host in brackets, as URLs need)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop listening and wait (5 s at most) for the server's thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
