"""bertpool-bench-faults: steady many-client load while workers are SIGKILLed or SIGSTOPped.

Starts ``bertpool-serve`` (broker + supervised workers, echo backend with a
fixed per-batch delay standing in for a model: a test and bench aid, not a
model), drives it with ``--clients`` closed-loop clients (each waits for its
reply, then sends the next request, every one with distinct text whose echo
answer is recomputed and checked), and injects faults for ``--duration-s``
per phase:

* ``kill``: SIGKILL the busiest worker every ``--kill-every-s`` (the supervisor
  restarts it; the broker re-dispatches what it held);
* ``stop``: SIGSTOP the busiest worker every ``--stop-every-s``, SIGCONT it
  ``--stop-for-s`` later (heartbeats notice it; it re-registers on waking).

Per phase it reports requests answered correctly, wrong answers, typed errors,
lost ones (no reply within the client timeout; goal 0), duplicates, latency
(overall, and for requests in flight at a fault or sent within
``recovery_window_s`` after it: p99 and max), and per fault the time until the pool is whole again (all
``--parallel`` workers registered, the faulty one gone or re-registered).
Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import start_serve
from ..clients.bench import MAX_CLIENTS, run_environment, wait_for_workers
from ..workers.supervisor import check_processes
from ..clients.client import Client
from ..common.cli import (STOPPED, add_exit_status, check_count, check_writable, counted, exit_with_parent,
                          output_file, report_error, report_interrupt, sigterm_as_interrupt, write_output)
from ..common.errors import ConfigError, RequestError, RequestTimeout
from ..common.protocol import check_heartbeat, check_timeout

PHASES = ("kill", "stop")


@dataclass(frozen=True)
class FaultBenchConfig:
    clients: int = 48                 # closed-loop clients
    client_procs: int = 4             # processes the clients are spread over
    parallel: int = 4                 # workers
    duration_s: float = 60.0          # length of each phase
    kill_every_s: float = 5.0         # kill phase: one SIGKILL this often
    stop_every_s: float = 10.0        # stop phase: one SIGSTOP this often
    stop_for_s: float = 5.0           # ... lasting this long before SIGCONT
    echo_delay_ms: float = 20.0       # per-batch compute the echo backend simulates
    batch_timeout_ms: float = 5.0     # workers' batch fill timeout
    heartbeat_interval_s: float = 1.0  # broker and workers (the defaults of bertpool-serve)
    heartbeat_liveness: int = 3
    client_timeout_s: float = 30.0    # a request unanswered this long counts as lost
    recovery_window_s: float = 5.0    # requests sent this soon after a fault are "during recovery"
    phases: tuple[str, ...] = PHASES

    def __post_init__(self) -> None:
        check_count("clients", self.clients, MAX_CLIENTS)  # each a thread with a connection of its own
        check_processes("client_procs", self.client_procs)
        check_processes("parallel", self.parallel)  # serve's own bound, checked before serve starts
        if self.parallel < 2:
            raise ConfigError("parallel must be >= 2: a pool of one has no survivor to fail over to")
        if self.client_procs > self.clients:
            raise ConfigError(f"client_procs ({self.client_procs}) must be at most clients ({self.clients}): "
                              f"a process with no client would run nothing")
        if not self.phases or not set(self.phases) <= set(PHASES):
            raise ConfigError(f"phases must be one or more of {PHASES}, got {self.phases}")
        for name in ("duration_s", "kill_every_s", "stop_every_s", "stop_for_s", "client_timeout_s",
                     "recovery_window_s"):
            check_timeout(name, getattr(self, name))  # also NaN: a phase of NaN seconds would never end
        for name in ("echo_delay_ms", "batch_timeout_ms"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0, got {value}")
        check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        if self.stop_for_s >= self.stop_every_s:
            raise ConfigError(f"stop_for_s ({self.stop_for_s:g}) must be less than stop_every_s "
                              f"({self.stop_every_s:g}): a worker is stopped for part of each period")


def _client_proc(address: str, first: int, n: int, timeout_s: float, stop, out, parent_pid: int) -> None:
    """Run n closed-loop client threads until stop; put one record list per process on out:
    (sent_at wall-clock, latency_s, outcome) where outcome is ok, wrong, lost or an error code.
    It ends with the bench (``parent_pid``), however that ends: a stop event nobody sets never ends."""
    exit_with_parent(parent_pid)
    from ..common.tokenizer import BertTokenizer
    from ..workers.backends import echo_probabilities, fallback_vocab_path

    tokenizer = BertTokenizer(fallback_vocab_path())
    records: list[tuple[float, float, str]] = []
    late = [0]
    lock = threading.Lock()

    def run(c: int) -> None:
        mine = []
        with Client(address, timeout_s=timeout_s) as client:
            i = 0
            while not stop.is_set():
                a, b = f"client {c} request {i}", f"distinct text {i * 7919 + c}"
                sent, t0 = time.time(), time.perf_counter()
                try:
                    result = client.predict(a, b)
                    f = tokenizer.encode_pairs([(a, b)])
                    want = echo_probabilities(f.input_ids, f.input_mask)[0]
                    outcome = "ok" if np.allclose(result.probabilities, want) else "wrong"
                except RequestTimeout:
                    outcome = "lost"
                except RequestError as exc:
                    outcome = getattr(exc, "code", type(exc).__name__)
                mine.append((sent, time.perf_counter() - t0, outcome))
                i += 1
            with lock:
                late[0] += client.counters.late_replies
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=run, args=(first + k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((records, late[0]))


class _Monitor(threading.Thread):
    """Polls the broker's stats; answers "is the pool whole" questions."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.latest: dict[str, Any] = {}
        self.changed = threading.Condition()

    def run(self) -> None:
        with Client(self.address, timeout_s=10) as client:
            while not self.stop.is_set():
                try:
                    stats = client.stats()
                except RequestError:
                    continue
                with self.changed:
                    self.latest = stats
                    self.changed.notify_all()
                self.stop.wait(0.05)

    def wait_for(self, predicate, timeout_s: float) -> float | None:
        """Seconds until predicate(stats) held, or None on timeout."""
        start = time.monotonic()
        with self.changed:
            while not (self.latest and predicate(self.latest)):
                left = start + timeout_s - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
        return time.monotonic() - start

    def busiest(self) -> int | None:
        workers = list(self.latest.get("workers", {}).values())
        if not workers:
            return None
        return max(workers, key=lambda w: w.get("inflight", 0)).get("pid")


def _pids(stats: dict) -> set[int]:
    return {w.get("pid") for w in stats.get("workers", {}).values()}


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _run_phase(config: FaultBenchConfig, phase: str, workdir: Path) -> dict[str, Any]:
    front, back = f"ipc://{workdir}/{phase}-front", f"ipc://{workdir}/{phase}-back"
    log_path = workdir / f"{phase}-serve.log"
    serve_args = ["--address", front, "--worker-address", back, "--parallel", str(config.parallel),
                  "--backend", "echo", "--echo-delay-ms", str(config.echo_delay_ms),
                  "--batch-timeout-ms", str(config.batch_timeout_ms), "--stats-interval-s", "0",
                  "--heartbeat-interval-s", str(config.heartbeat_interval_s),
                  "--heartbeat-liveness", str(config.heartbeat_liveness)]
    with open(log_path, "wb") as log:
        serve = start_serve(serve_args, log)
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    faults: list[dict[str, Any]] = []
    stopped: set[int] = set()
    procs: list = []
    try:
        wait_for_workers(front, config.parallel, timeout_s=120)
        monitor = _Monitor(front)
        monitor.start()
        share = [config.clients // config.client_procs + (i < config.clients % config.client_procs)
                 for i in range(config.client_procs)]
        procs = [ctx.Process(target=_client_proc, args=(front, sum(share[:i]), n, config.client_timeout_s,
                                                        stop, out, os.getpid()))
                 for i, n in enumerate(share) if n]
        for p in procs:
            p.start()
        time.sleep(2.0)  # let every client connect and the load settle before the first fault
        every = config.kill_every_s if phase == "kill" else config.stop_every_s
        started = time.monotonic()
        while time.monotonic() - started < config.duration_s:
            pid = monitor.busiest()
            if pid is None:
                time.sleep(0.1)
                continue
            at = time.time()
            if phase == "kill":
                os.kill(pid, signal.SIGKILL)
                whole = monitor.wait_for(lambda s: len(s["workers"]) == config.parallel and pid not in _pids(s),
                                         timeout_s=every * 4)
                faults.append({"at_unix_s": at, "pid": pid, "pool_whole_after_s": _round(whole)})
            else:
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
                removed = monitor.wait_for(lambda s: pid not in _pids(s), timeout_s=config.stop_for_s)
                time.sleep(max(0.0, config.stop_for_s - (removed or config.stop_for_s)))
                os.kill(pid, signal.SIGCONT)
                stopped.discard(pid)
                back_in = monitor.wait_for(lambda s: pid in _pids(s) and len(s["workers"]) == config.parallel,
                                           timeout_s=every * 2)
                faults.append({"at_unix_s": at, "pid": pid, "presumed_dead_after_s": _round(removed),
                               "stopped_for_s": config.stop_for_s,
                               "pool_whole_after_sigcont_s": _round(back_in)})
            time.sleep(max(0.0, at + every - time.time()))
        stop.set()
        results = [out.get(timeout=config.client_timeout_s + 60) for _ in procs]
        for p in procs:
            p.join(30)
        monitor.stop.set()
        final = monitor.latest
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stop.set()
        for p in procs:  # after a normal run they are done; after an error or SIGTERM they must not run on
            if p.is_alive():
                p.terminate()
                p.join(10)
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    return _report(config, phase, results, faults, final)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _report(config: FaultBenchConfig, phase: str, results, faults, final) -> dict[str, Any]:
    records = [r for recs, _ in results for r in recs]
    late = sum(n for _, n in results)
    outcomes = Counter(outcome for _, _, outcome in records)
    latencies = [lat for _, lat, _ in records]
    fault_times = [f["at_unix_s"] for f in faults]
    # In flight at a fault, or sent within the recovery window after it.
    during = [lat for sent, lat, _ in records
              if any(sent <= t + config.recovery_window_s and sent + lat >= t for t in fault_times)]
    broker = final.get("broker", {})
    return {
        "phase": phase, "faults": len(faults), "requests": len(records),
        "answered_correctly": outcomes.pop("ok", 0), "wrong_answers": outcomes.pop("wrong", 0),
        "lost": outcomes.pop("lost", 0), "typed_errors": dict(outcomes),
        "duplicates_seen_by_clients": late,
        "latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                       "max": _percentile(latencies, 100)},
        "latency_during_recovery_ms": {"requests": len(during), "p99": _percentile(during, 99),
                                       "max": _percentile(during, 100)},
        "per_fault": faults,
        "broker_counters": {k: broker.get(k) for k in ("replies", "redispatched", "worker_lost",
                                                        "late_replies_dropped", "workers_lost", "requeued")},
    }


def run_fault_bench(config: FaultBenchConfig) -> dict[str, Any]:
    """Run each phase in config.phases on a fresh pool; return the report."""
    report: dict[str, Any] = {"config": asdict(config), "phases": {}}
    with tempfile.TemporaryDirectory(prefix="bertpool-faults-") as tmp:
        for phase in config.phases:
            report["phases"][phase] = _run_phase(config, phase, Path(tmp))
    return report


# FaultBenchConfig fields that are flags of their own (--client-procs for client_procs), with their help.
_FLAGS = (
    ("clients", "closed-loop clients, each with one request in flight"),
    ("client_procs", "processes the clients are spread over"),
    ("parallel", "workers in the pool, at least 2"),
    ("duration_s", "length of each phase"),
    ("kill_every_s", "kill phase: SIGKILL the busiest worker this often"),
    ("stop_every_s", "stop phase: SIGSTOP the busiest worker this often"),
    ("stop_for_s", "stop phase: SIGCONT it this long after"),
    ("echo_delay_ms", "compute time per batch the echo backend simulates"),
    ("heartbeat_interval_s", "broker and worker heartbeat interval"),
    ("heartbeat_liveness", "silent intervals before a peer is presumed dead"),
    ("client_timeout_s", "a request unanswered this long counts as lost"),
)


def build_parser() -> argparse.ArgumentParser:
    """bertpool-bench-faults' flags (each with its help and default)."""
    d = FaultBenchConfig()
    parser = argparse.ArgumentParser(
        prog="bertpool-bench-faults",
        description="Steady closed-loop load on a bertpool-serve pool (echo backend with a fixed per-batch "
                    "delay) while workers are SIGKILLed, then SIGSTOPped; reports correct answers, typed "
                    "errors, lost requests, latency during recovery and time until the pool is whole.")
    add_exit_status(parser, f"0 every request answered, correctly or with a typed error, 1 some were lost or "
                            f"answered wrongly, late or twice (the report is still written; the error line says how "
                            f"many, phase by phase), 2 a bad flag, {STOPPED}; either way its pool and clients "
                            f"are stopped")
    for name, help_text in _FLAGS:
        default = getattr(d, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated phases to run, among kill,stop (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = FaultBenchConfig(**{name: getattr(args, name) for name, _ in _FLAGS},
                                  phases=tuple(p for p in args.phases.split(",") if p))
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        check_writable("--json", args.json)  # before minutes of faults, not after them
    except ConfigError as exc:
        return report_error("bertpool-bench-faults", exc)
    environment = run_environment("bertpool-bench-faults", argv)
    try:
        with sigterm_as_interrupt():  # SIGTERM (timeout, kill) unwinds like Ctrl-C: the pool is stopped
            report = {**run_fault_bench(config), "environment": environment}
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        return report_interrupt("bertpool-bench-faults", exc, "; its pool and clients were stopped, no report")
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.json:
        try:
            write_output("--json", args.json, text + "\n")
        except ConfigError as exc:  # the report is on stdout already
            return report_error("bertpool-bench-faults", exc)
    failures = _failures(report)
    if failures:  # what the faults are run to rule out: a script or CI job must not read it as a pass
        return report_error("bertpool-bench-faults", "; ".join(failures), code=1)
    return 0


def _failures(report: dict[str, Any]) -> list[str]:
    """What the pool got wrong, phase by phase: requests lost (no answer within --client-timeout-s),
    answered wrongly, and answers that came after their request was settled (a second answer, or one
    after the client gave up). A typed error is an answer (the pool said what went wrong,
    e.g. worker_lost past --max-redispatch), so it is not one of them."""
    failures = []
    for phase, result in report["phases"].items():
        parts = [f"{result['lost']} lost"] if result["lost"] else []
        if result["wrong_answers"]:
            parts.append(f"{result['wrong_answers']} answered wrongly")
        if result["duplicates_seen_by_clients"]:
            parts.append(f"{counted(result['duplicates_seen_by_clients'], 'answer')} late or twice")
        if parts:
            failures.append(f"{phase} phase, of {counted(result['requests'], 'request')} sent: {', '.join(parts)}")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
