"""bertpool-serve's own metrics, on the broker's endpoint beside the pool's: what only its supervisor sees.

The broker counts a worker restart when the restarted process says READY; a worker that dies while it
loads (a crash loop at start, a model damaged under a serving pool) never does, so only the supervisor,
which starts and reaps the processes, can count it. Names and help: SUPERVISOR_METRICS (listed in the
README's "Monitoring" section, as the broker's are).
"""

from __future__ import annotations

from typing import Any, Iterator

from ..broker.metrics import describe_families
from ..workers.supervisor import Supervisor

SUPERVISOR_METRICS = {
    "bertpool_worker_exits_total": "bertpool-serve's worker processes that ended without being asked, by cause: "
                                   "signal (killed: OOM killer, a crash in native code, by hand), error (a non-zero "
                                   "exit), exited (exit 0), load_failed (could not load its model or configuration), "
                                   "refused (the broker ended its handshake); those that die before READY included",
    "bertpool_worker_slots_failing": "bertpool-serve's worker slots whose worker could not start, load or register "
                                     "and is retried while the others serve (until a worker of the slot has run "
                                     "30 s, or dies of something else)",
}


class SupervisorCollector:
    """A prometheus-client custom collector reading one supervisor's counts at scrape time (on the
    HTTP server's thread: its fields are plain ints, updated by the supervisor's thread)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list:
        """One empty family per SUPERVISOR_METRICS entry (see BrokerCollector.describe: the
        ``?name[]=`` filter finds collectors by what they describe)."""
        return describe_families(SUPERVISOR_METRICS)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._supervisor
        exits = CounterMetricFamily("bertpool_worker_exits", SUPERVISOR_METRICS["bertpool_worker_exits_total"],
                                    labels=["cause"])
        for cause, n in dict(s.exits).items():
            exits.add_metric([cause], n)
        yield exits
        yield GaugeMetricFamily("bertpool_worker_slots_failing", SUPERVISOR_METRICS["bertpool_worker_slots_failing"],
                                value=s.failing_slots)
