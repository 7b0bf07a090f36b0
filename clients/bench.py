"""bertpool-bench: many client processes x many requests each, like the Neuron demo.

The AWS demo ran 48 x ``bert_client.py --cycle 128``. Here ``--clients`` C
processes each send ``--cycle`` R requests one after another (each waits for
its reply, as the demo's clients did), after ``--warmup`` requests that are
not measured. All clients start the measured phase together (a barrier), so
throughput is total replies / wall time of the measured phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..common import security
from ..common.cli import report_error
from ..common.data import Pair, default_pairs, read_mrpc_tsv
from ..common.errors import BertpoolError, ConfigError, RequestError, RequestTimeout
from ..common.metrics import binary_report
from .client import Client


@dataclass(frozen=True)
class BenchConfig:
    address: str = "tcp://127.0.0.1:5555"  # the broker's client endpoint
    clients: int = 48                      # client processes
    cycle: int = 128                       # measured requests per client
    warmup: int = 2                        # unmeasured requests per client first
    timeout_s: float = 60.0                # per-request deadline
    start_timeout_s: float = 120.0         # longest wait for all clients to connect and warm up
    wait_workers: int = 0                  # first wait until the pool has this many workers
    wait_timeout_s: float = 600.0          # longest wait for those workers
    curve: security.CurveClientConfig | None = None  # CURVE keys for every client; None = plain text

    def __post_init__(self) -> None:
        for name in ("clients", "cycle"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")


@dataclass
class _ClientResult:
    latencies_ms: list[float]
    labels: list[tuple[int, int | None, int]]  # (predicted, expected, index of the pair sent)
    timings: list[dict[str, float]]
    errors: dict[str, int]
    started: float
    finished: float


def _client_main(index: int, config: BenchConfig, pairs: list[Pair], barrier, results) -> None:
    """One client process: warm up, wait at the barrier, run the measured cycle."""
    errors: Counter = Counter()
    latencies, labels, timings = [], [], []
    try:
        with Client(config.address, timeout_s=config.timeout_s, curve=config.curve) as client:
            for i in range(config.warmup):
                pair = pairs[(index + i) % len(pairs)]
                try:
                    client.predict(pair.text_a, pair.text_b)
                except RequestError:
                    pass  # warm-up failures are not measured
            barrier.wait(config.start_timeout_s)
            started = time.monotonic()
            for i in range(config.cycle):
                pair_index = (index * config.cycle + i) % len(pairs)
                pair = pairs[pair_index]
                t0 = time.perf_counter()
                try:
                    result = client.predict(pair.text_a, pair.text_b)
                except RequestError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                labels.append((result.label, pair.label, pair_index))
                timings.append(result.timings)
            finished = time.monotonic()
    except Exception as exc:  # report, never hang the parent
        results.put(("failed", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ok", index, _ClientResult(latencies, labels, timings, dict(errors), started, finished)))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/p999, mean and max of ``values`` (milliseconds), rounded to µs."""
    if not values:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    a = np.asarray(values)
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {"p50": round(float(q[0]), 3), "p90": round(float(q[1]), 3), "p99": round(float(q[2]), 3),
            "p999": round(float(q[3]), 3), "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)}


def wait_for_workers(address: str, n: int, timeout_s: float,
                     curve: security.CurveClientConfig | None = None) -> None:
    """Block until the broker at ``address`` reports ``n`` ready workers; RequestTimeout if not."""
    deadline = time.monotonic() + timeout_s
    with Client(address, curve=curve) as client:
        while True:
            try:
                if len(client.stats(timeout_s=max(0.1, min(5.0, deadline - time.monotonic())))["workers"]) >= n:
                    return
            except RequestError:
                pass  # broker not up yet: keep trying until the deadline
            if time.monotonic() > deadline:
                raise RequestTimeout(f"{n} workers not ready at {address} within {timeout_s} s")
            time.sleep(0.2)  # polling a remote counter; no event exists to wait on


def run_bench(config: BenchConfig, pairs: list[Pair]) -> dict[str, Any]:
    """Run the benchmark against a live pool; return the report (see summarize())."""
    if not pairs:
        raise ConfigError("no sentence pairs to send")
    if config.wait_workers:
        wait_for_workers(config.address, config.wait_workers, config.wait_timeout_s, config.curve)
    ctx = mp.get_context("spawn")  # no inherited ZeroMQ state in the children
    barrier = ctx.Barrier(config.clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(i, config, pairs, barrier, results), daemon=True)
             for i in range(config.clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(config.start_timeout_s)
    except Exception as exc:
        _stop(procs)
        raise RequestError(f"clients did not all start within {config.start_timeout_s} s") from exc
    collected, failures = [], []
    limit = time.monotonic() + config.start_timeout_s + config.cycle * config.timeout_s
    try:
        for _ in range(config.clients):
            status, index, value = results.get(timeout=max(1.0, limit - time.monotonic()))
            (collected if status == "ok" else failures).append(value)
    finally:
        _stop(procs)
    if failures:
        raise RequestError(f"{len(failures)} bench clients failed, first: {failures[0]}")
    report = summarize(config, collected)
    report["backends"] = pool_backends(config.address, curve=config.curve)
    return report


def pool_backends(address: str, timeout_s: float = 5.0,
                  curve: security.CurveClientConfig | None = None) -> dict[str, int] | None:
    """How many ready workers serve each backend (echo, tf, neuron); None if the broker does not say."""
    try:
        with Client(address, curve=curve) as client:
            workers = client.stats(timeout_s=timeout_s)["workers"]
    except RequestError:
        return None
    return dict(Counter(str(w.get("backend")) for w in workers.values()))


def _stop(procs) -> None:
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.terminate()
            p.join()


def summarize(config: BenchConfig, results: list[_ClientResult]) -> dict[str, Any]:
    latencies = [x for r in results for x in r.latencies_ms]
    labels = [x for r in results for x in r.labels]
    errors: Counter = Counter()
    for r in results:
        errors.update(r.errors)
    elapsed = max(r.finished for r in results) - min(r.started for r in results)
    known = [(p, e) for p, e, _ in labels if e is not None]
    timings = [t for r in results for t in r.timings]
    server = {k: round(float(np.mean([t.get(k, 0.0) for t in timings])), 3) if timings else None
              for k in ("queue_ms", "batch_wait_ms", "compute_ms", "batch_size")}
    return {
        "config": {**asdict(config), "curve": config.curve is not None},  # never the keys
        "requests": len(latencies) + sum(errors.values()),
        "replies": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "elapsed_s": round(elapsed, 4),
        "throughput_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": percentiles(latencies),
        "server_mean": server,
        "accuracy": round(sum(p == e for p, e in known) / len(known), 4) if known else None,
        "labelled": len(known),
        "quality": quality(labels),
    }


def quality(labels: list[tuple[int, int | None, int]]) -> dict[str, Any] | None:
    """Accuracy, F1 and confusion counts over the distinct labelled pairs sent (None if none).

    Each pair counts once, with its first answer, so the numbers are the data
    set's own whatever the number of requests; ``inconsistent_pairs`` counts
    pairs that got different labels on different requests (0 for a
    deterministic model).
    """
    answers: dict[int, set[int]] = {}
    first: dict[int, tuple[int, int]] = {}
    for predicted, expected, index in labels:
        if expected is None:
            continue
        answers.setdefault(index, set()).add(predicted)
        first.setdefault(index, (predicted, expected))
    if not first:
        return None
    return {**binary_report(first.values()), "scope": "distinct pairs, first answer each",
            "inconsistent_pairs": sum(len(a) > 1 for a in answers.values())}


def load_pairs(tsv: str | None) -> tuple[list[Pair], str]:
    """Pairs from an MRPC-format TSV, else the pairs bertpool ships."""
    if tsv:
        return read_mrpc_tsv(tsv), str(tsv)
    return default_pairs(), "bertpool sample pairs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench",
        description="Load a bertpool server with C client processes x R requests each and report "
                    "throughput, latency percentiles and accuracy.",
        epilog="example: bertpool-bench --clients 48 --cycle 128 --tsv ../shared/data/glue_mrpc_dev.tsv "
               "--json bench.json")
    parser.add_argument("--address", default="tcp://127.0.0.1:5555",
                        help="the broker's client endpoint (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=48, help="client processes (default: %(default)s)")
    parser.add_argument("--cycle", type=int, default=128,
                        help="measured requests per client (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured requests per client first (default: %(default)s)")
    parser.add_argument("--tsv", help="MRPC-format TSV of pairs (default: pairs bertpool ships)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="per-request deadline (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--wait-workers", type=int, default=0, metavar="N",
                        help="first wait until the pool has N ready workers (default: do not wait)")
    parser.add_argument("--wait-timeout-s", type=float, default=600.0,
                        help="longest wait for --wait-workers (default: %(default)s)")
    parser.add_argument("--model-note", metavar="TEXT",
                        help="a line about the model served, printed and kept in the report "
                             "(e.g. 'random weights: chance-level accuracy')")
    security.add_client_arguments(parser, own="the bench clients' own (all of them use it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = BenchConfig(address=args.address, clients=args.clients, cycle=args.cycle,
                             warmup=args.warmup, timeout_s=args.timeout_s,
                             wait_workers=args.wait_workers, wait_timeout_s=args.wait_timeout_s,
                             curve=security.client_config_from_args(args))
        pairs, source = load_pairs(args.tsv)
        report = run_bench(config, pairs)
    except BertpoolError as exc:
        return report_error("bertpool-bench", exc)
    report["pairs_source"] = source
    report["model_note"] = args.model_note
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["errors"] else 0


def format_report(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    lines = [f"requests {report['requests']}  errors {report['errors']}  "
             f"throughput {report['throughput_per_s']:.1f}/s  elapsed {report['elapsed_s']:.2f} s",
             f"latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
             f"p99.9 {lat['p999']:.2f}  max {lat['max']:.2f}",
             f"server mean ms  {report['server_mean']}"]
    if report.get("backends"):
        lines.append("served by  " + ", ".join(f"{n} x {b}" for b, n in sorted(report["backends"].items())))
    q = report.get("quality")
    if q is None:
        lines.append("accuracy n/a (no labelled pairs)")
    else:
        c = q["confusion"]
        lines.append(f"accuracy {q['accuracy']:.4f}  F1 {q['f1']:.4f}  precision {q['precision']:.4f}  "
                     f"recall {q['recall']:.4f}  over {q['n']} distinct pairs  (tp {c['tp']} fp {c['fp']} "
                     f"tn {c['tn']} fn {c['fn']}; inconsistent pairs {q['inconsistent_pairs']})")
    if report.get("model_note"):
        lines.append(f"model: {report['model_note']}")
    if "echo" in (report.get("backends") or {}):
        lines.append("WARNING: echo workers answered: these answers are not a model's; accuracy is meaningless")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
