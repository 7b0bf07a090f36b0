"""bertpool-bench --sweep-clients: the same load at several client counts, one record per step.

Each step is a full ``run_bench`` (clients/bench.py) with ``clients`` set to
the step's count: its own client processes, warm-up and barrier, then
``cycle`` requests per client (C x cycle in all) or ``duration_s`` seconds.
The report keeps every step's record in ``steps``, in the order given, so
throughput against latency can be read (or plotted, clients/plot.py) as
concurrency grows, as Triton's perf_analyzer does.

If a step after the first cannot run (e.g. the broker went away), the sweep
stops there: the steps done are kept, and ``stopped`` and ``diagnosis`` say
why; the first step failing fails the sweep.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..common.data import Pair
from ..common.errors import BenchError, ConfigError, RequestError, RequestTimeout
from ..common.cli import counted
from .bench import (MAX_CLIENTS, RETRY_COUNTERS, BenchConfig, format_errors, format_footer, format_retries, ms,
                    no_broker_message, report_config, run_bench)

MAX_STEPS = 64  # a sweep is a handful of concurrencies, not a loop


def parse_clients_list(text: str) -> list[int]:
    """``"1,4,16,48"`` -> [1, 4, 16, 48]; ConfigError for anything but distinct integers >= 1."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        counts = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--sweep-clients must be comma-separated integers such as 1,4,16,48, "
                          f"got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"--sweep-clients counts must be >= 1, got {text!r}")
    if max(counts) > MAX_CLIENTS:  # as --clients: each client is a process of its own
        raise ConfigError(f"--sweep-clients counts must be at most {MAX_CLIENTS}, got {text!r}")
    if len(set(counts)) != len(counts):
        raise ConfigError(f"--sweep-clients has a count twice: {text!r}")
    if len(counts) > MAX_STEPS:
        raise ConfigError(f"--sweep-clients has {len(counts)} steps; at most {MAX_STEPS}")
    return counts


def run_sweep(config: BenchConfig, clients: list[int], pairs: list[Pair], progress: bool = False) -> dict[str, Any]:
    """Run ``config``'s load once per client count; return the sweep report.

    Report: ``sweep_clients``, ``steps`` (one run_bench report each, with
    ``clients``), totals (``requests``, ``replies``, ``errors``), ``ok``,
    ``pool`` (from the last step's STATS), ``backends`` (every backend any
    step saw, with the most workers of it seen in one step), ``stopped`` and
    ``diagnosis`` (None unless a step failed).
    """
    base = report_config(config)
    base.pop("clients")
    steps: list[dict[str, Any]] = []
    stopped = None
    for n, count in enumerate(clients):
        step_config = replace(config, clients=count)
        try:
            steps.append(run_bench(step_config, pairs, progress=progress,
                                   desc=f"{counted(count, 'client')} ({n + 1}/{len(clients)})"))
        except (RequestError, BenchError) as exc:
            if not steps:
                raise
            message = str(exc)
            if isinstance(exc, RequestTimeout):
                # A later step's only RequestTimeout is its STATS probe (it waits for no workers): the
                # broker answered the earlier steps, so "nothing ever answered" (a fresh Client's view) is
                # wrong; say what the single run says when STATS fails after the run, keeping a cause
                # that says more than a timeout (a BrokerUnavailable, a refused handshake).
                cause = None if isinstance(exc.__cause__, RequestTimeout) else exc.__cause__
                message = (no_broker_message(config.address, config.connect_timeout_s, cause)
                           + " (it answered the earlier steps: it went away)")
            stopped = {"clients": count, "error": {"type": type(exc).__name__, "message": message}}
            break
        if step_config.wait_workers:  # waited once; the pool does not shrink between steps
            config = replace(config, wait_workers=0)
    last = steps[-1]
    backends: dict[str, int] = {}  # the union over the steps: the last may have lost its broker or workers
    for s in steps:
        for backend, workers in (s.get("backends") or {}).items():
            backends[backend] = max(workers, backends.get(backend, 0))
    diagnosis = stopped["error"]["message"] if stopped else next(
        (s["diagnosis"] for s in steps if s.get("diagnosis")), None)
    return {
        "sweep_clients": clients,
        "config": base,
        "steps": steps,
        "requests": sum(s["requests"] for s in steps),
        "replies": sum(s["replies"] for s in steps),
        "errors": sum(s["errors"] for s in steps),
        # What the pool served beyond the measured requests, over the whole sweep (see summarize).
        "warmup_replies": sum(s["warmup_replies"] for s in steps),
        "client_retries": {name: sum(s["client_retries"][name] for s in steps) for name in RETRY_COUNTERS},
        "ok": stopped is None and all(s["ok"] for s in steps),
        "pool": last.get("pool"),
        "backends": dict(sorted(backends.items())),
        "stopped": stopped,
        "diagnosis": diagnosis,
        # The footer's quality line: the pairs are the same at every step, so the widest step says most.
        "quality": max(steps, key=lambda s: s["labelled"])["quality"],
    }


def format_sweep(report: dict[str, Any]) -> str:
    """A table, one row per step, then errors by type per failing step and the shared footer."""
    # replies/s: the throughput is replies over the step's time, failed requests not in it (as the plot's
    # axis says); "req/s" read as requests sent, which differs from it by the errors.
    header = (f"{'clients':>7} {'requests':>8} {'errors':>6} {'replies/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'batch':>5} {'accuracy':>8}")
    lines = [header]
    for s in report["steps"]:
        lat = s["latency_ms"]
        fill = (s.get("server_mean") or {}).get("batch_size")
        acc = s.get("accuracy")
        lines.append(f"{s['clients']:>7} {s['requests']:>8} {s['errors']:>6} {s['throughput_per_s']:>9.1f} "
                     f"{ms(lat['p50']):>8} {ms(lat['p90']):>8} {ms(lat['p99']):>8} {ms(lat['max']):>8} "
                     f"{'-' if fill is None else f'{fill:.2f}':>5} {'-' if acc is None else f'{acc:.4f}':>8}")
    for s in report["steps"]:
        errors = format_errors({**s, "diagnosis": None})
        if errors:
            lines.append(f"step with {counted(s['clients'], 'client')}: " + errors[0])
            lines += errors[1:]
    lines += format_retries(report)
    if report.get("stopped"):
        lines.append(f"sweep stopped at {counted(report['stopped']['clients'], 'client')}")
    if report.get("diagnosis"):
        lines.append(f"diagnosis: {report['diagnosis']}")
    lines.append("batch = mean real rows per model call (server timings)")
    lines += format_footer(report)
    return "\n".join(lines)
