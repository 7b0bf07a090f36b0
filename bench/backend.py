"""bertpool-bench-backend: served throughput against the model's own tight loop.

1. ``tight``: the backend in this process, called back to back for at least
   ``--seconds`` on the very requests the served run below sends (the same
   pairs, in the order they reach the pool, in batches of ``--batch-size``):
   the ceiling. The same pairs, since a compiled model's time depends on them:
   a batch holding one long pair runs in a longer sequence bucket (BERT-Base
   here: 424 ms at 128 against 222 ms at 64), so a loop over the first four
   pairs alone was a ceiling the served run could never reach.
2. ``served``: ``bertpool-serve`` with the same backend, loaded to saturation by
   ``bertpool-bench`` (enough clients to keep every worker's batches full).

Reports inferences/s of both, their ratio, and the single-request added
latency (one client, one request at a time: the median over requests of each
one's latency minus its own batch's compute time, less ``batch_timeout_ms``).

With ``--rounds N`` the two alternate N times and the report gives each ratio
(each served run against the tight loop of its own round) and their median:
on a shared machine the rate drifts by several percent between runs, more
than the difference being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import add_vocab_argument, echo_vocab, median, start_serve
from ..broker.broker import BrokerConfig
from ..clients.bench import MAX_CLIENTS, MAX_CYCLE, BenchConfig, load_pairs, run_bench, run_environment, sent_pairs
from ..common.cli import (check_count, check_writable, counted, output_file, report_error, report_interrupt,
                          sigterm_as_interrupt, write_output)
from ..common.errors import BertpoolError, ConfigError
from ..common import configdata
from ..common import protocol as P
from ..common.tokenizer import BertTokenizer, Features
from ..workers.backends import (BACKENDS, BackendConfig, choose_backend, fallback_vocab_path, load_backend,
                                run_padded)
from ..workers.worker import WorkerConfig


def tight_loop(backend, features: Features, order: list[int], batch_size: int,
               seconds: float) -> dict[str, float]:
    """Inferences/s and mean batch time of ``backend`` called back to back in this process on the rows
    ``order`` of ``features`` in batches of ``batch_size`` (the last one padded, as a worker pads it):
    the whole sequence, then again while under ``seconds``, so every pair counts as often as in
    ``order`` however long the loop runs."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    inputs = [(features.input_ids[rows], features.input_mask[rows], features.segment_ids[rows]) for rows in batches]
    run_padded(backend, *inputs[0], batch_size)  # warm-up
    replays, start = 0, time.perf_counter()
    while True:
        for batch in inputs:
            run_padded(backend, *batch, batch_size)
        replays += 1
        if (elapsed := time.perf_counter() - start) >= seconds:
            break
    return {"inferences_per_s": round(replays * len(order) / elapsed, 3),
            "batch_ms": round(elapsed / (replays * len(inputs)) * 1000, 3), "batches": replays * len(inputs),
            "requests": len(order), "replays": replays}


def saturation_clients(args: argparse.Namespace, parallel: int) -> int:
    """The clients of a served run at saturation: --clients, else enough that every one of ``parallel``
    workers always has a full batch waiting (two batches' worth each)."""
    return args.clients or 2 * parallel * args.batch_size


def served(args, worker: WorkerConfig, pairs, parallel: int, threads: int) -> dict[str, Any]:
    """Saturation throughput and single-request latency of a bertpool-serve pool whose workers run
    ``worker`` (handed over as data, every field) with ``threads`` threads each."""
    tmp = tempfile.mkdtemp(prefix="bertpool-bb-")
    front, back = f"ipc://{tmp}/front", f"ipc://{tmp}/back"
    worker = replace(worker, broker_address=back, backend=replace(worker.backend, threads=threads))
    configdata.write_json(worker, Path(tmp) / "worker.json")
    serve_args = ["--address", front, "--worker-address", back, "--parallel", str(parallel),
                  "--stats-interval-s", "0", "--worker-config-json", str(Path(tmp) / "worker.json"),
                  "--busy-poll-us", str(args.busy_poll_us)]
    log = open(Path(tmp) / "serve.log", "wb")
    proc = start_serve(serve_args, log)
    try:
        clients = saturation_clients(args, parallel)
        load = run_bench(BenchConfig(address=front, clients=clients, cycle=args.cycle, warmup=1,
                                     timeout_s=600, wait_workers=parallel, wait_timeout_s=600), pairs)
        single = run_bench(BenchConfig(address=front, clients=1, cycle=args.single_cycle, warmup=2,
                                       timeout_s=600), pairs)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
    server = single["server_mean"]
    beyond = single["beyond_compute_ms"]["p50"]  # None when no single request was answered
    added = None if beyond is None else round(beyond - args.batch_timeout_ms, 3)
    return {"parallel": parallel, "threads": threads, "clients": clients,
            "inferences_per_s": load["throughput_per_s"], "replies": load["replies"] + single["replies"],
            "errors": load["errors"] + single["errors"],
            "error_samples": {**single["error_samples"], **load["error_samples"]},
            "saturation_latency_ms": load["latency_ms"], "saturation_server_mean_ms": load["server_mean"],
            "single_latency_ms": single["latency_ms"],
            "single_server_mean_ms": server, "single_added_latency_ms_p50": added}


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number >= 1")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: not a number of seconds") from None
    try:
        P.check_timeout("--seconds", seconds)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return seconds


def _counts(value: str) -> list[int]:
    """--parallel: comma-separated worker counts, each >= 1, none twice (a repeat is a served run more
    in every round, whose report rows could not be told apart; --rounds repeats them all)."""
    counts = [_positive(part.strip()) for part in value.split(",")]
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{value}: a worker count twice (use --rounds to repeat runs)")
    return counts


def _over_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker count's served runs, one per round, as one record: the run whose ratio is the median
    (the lower middle one for an even count), with the medians and each round's ratio over it. Each
    served run is judged against the tight loop of its own round, since this machine's speed drifts."""
    ranked = sorted(runs, key=lambda r: r["ratio_to_tight"])
    summary = dict(ranked[(len(ranked) - 1) // 2])
    added = [r["single_added_latency_ms_p50"] for r in runs if r["single_added_latency_ms_p50"] is not None]
    summary.update(ratios=[r["ratio_to_tight"] for r in runs],
                   ratio_to_tight=median([r["ratio_to_tight"] for r in runs]),
                   inferences_per_s=median([r["inferences_per_s"] for r in runs]),
                   tight_inferences_per_s=median([r["tight"]["inferences_per_s"] for r in runs]),
                   single_added_latency_ms_p50=median(added), errors=sum(r["errors"] for r in runs),
                   replies=sum(r["replies"] for r in runs))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench-backend",
        description="Served throughput at saturation against the same backend in a tight in-process "
                    "loop at the same batch size, plus single-request added latency. Exit status: 0 every "
                    "served request answered, 1 some failed (the report is still written), 2 the bench "
                    "could not run (bad flag, model or --tsv), 130 interrupted (Ctrl-C), 143 terminated "
                    "(SIGTERM); either way the pools it started are stopped.")
    parser.add_argument("--backend", choices=BACKENDS, default="tf",
                        help="the backend to measure; tf and neuron need --model (default: %(default)s)")
    parser.add_argument("--model", "--dir", dest="model", metavar="DIR", help="model directory")
    parser.add_argument("--batch-size", type=_positive, default=4, help="batch size (default: %(default)s)")
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0,
                        help="the served workers' batch timeout (default: %(default)s)")
    parser.add_argument("--echo-delay-ms", type=float, default=0.0,
                        help="echo backend: simulated compute time per batch (default: %(default)s)")
    parser.add_argument("--seconds", type=_seconds, default=20.0,
                        help="least tight-loop duration: it replays the served run's requests whole, as often "
                             "as that takes (default: %(default)s)")
    parser.add_argument("--parallel", type=_counts, default=[1, 2],
                        help="comma-separated worker counts to serve with (default: 1,2)")
    parser.add_argument("--clients", type=int, default=0, help="saturation clients (default: 2 x parallel x batch)")
    parser.add_argument("--cycle", type=_positive, default=8, help="requests per saturation client (default: %(default)s)")
    parser.add_argument("--single-cycle", type=_positive, default=20,
                        help="requests for the single-client run (default: %(default)s)")
    parser.add_argument("--rounds", type=_positive, default=1,
                        help="rounds of tight loop then served runs; the report gives the median ratio, each "
                             "served run against its own round's tight loop (default: %(default)s)")
    parser.add_argument("--busy-poll-us", type=float, default=0.0,
                        help="the served broker's --busy-poll-us, to measure what it saves at low load and "
                             "costs at saturation (default: off)")
    parser.add_argument("--tsv", help="MRPC-format pairs (default: the pairs bertpool ships)")
    add_vocab_argument(parser)
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON to FILE")
    args = parser.parse_args(argv)
    try:  # checked now, not when the first served run builds its BenchConfig after a tight loop
        if args.clients < 0:
            raise ConfigError(f"--clients must be >= 0, got {args.clients}")
        if args.clients:
            check_count("--clients", args.clients, MAX_CLIENTS)
        elif 2 * max(args.parallel) * args.batch_size > MAX_CLIENTS:
            raise ConfigError(f"saturating --parallel {max(args.parallel)} at --batch-size {args.batch_size} takes "
                              f"{2 * max(args.parallel) * args.batch_size} clients, more than {MAX_CLIENTS}; "
                              f"give --clients")
        check_count("--cycle", args.cycle, MAX_CYCLE)
        check_count("--single-cycle", args.single_cycle, MAX_CYCLE)
        BrokerConfig(busy_poll_us=args.busy_poll_us)  # its bound, now rather than when serve starts
    except ConfigError as exc:
        parser.error(str(exc))
    args.environment = run_environment("bertpool-bench-backend", argv)
    try:
        check_writable("--json", args.json)  # before the tight loops and pools, not after them
        with sigterm_as_interrupt():  # SIGTERM (timeout, kill) unwinds like Ctrl-C: the pool is stopped
            return _run(args)
    except BertpoolError as exc:  # a bad --model or --tsv, a backend that is not installed, a failed run
        return report_error("bertpool-bench-backend", exc)
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        return report_interrupt("bertpool-bench-backend", exc, "; its pool was stopped, no report")


def _run(args: argparse.Namespace) -> int:
    pairs, _ = load_pairs(args.tsv)
    cores = os.cpu_count() or 1
    backend = BackendConfig(name=choose_backend(args.backend, args.model), model_dir=args.model,
                            echo_delay_ms=args.echo_delay_ms)
    vocab, vocab_name = echo_vocab(args.vocab) if backend.name == "echo" else (args.vocab, args.vocab)
    worker = WorkerConfig(backend=backend, vocab_path=vocab,
                          batch_size=args.batch_size, batch_timeout_ms=args.batch_timeout_ms)
    report: dict[str, Any] = {"backend": args.backend, "model": args.model,
                              "vocab": vocab_name or "the model's own", "batch_size": args.batch_size,
                              "cores": cores, "busy_poll_us": args.busy_poll_us,
                              # Every setting (the fields above are the ones read most), and where it ran.
                              "config": {k: v for k, v in vars(args).items() if k != "environment"},
                              "environment": args.environment, "rounds": []}
    parallels = args.parallel
    # Each served run's requests, replayed by its tight loop (see the module's docstring).
    orders = {parallel: sent_pairs(BenchConfig(clients=saturation_clients(args, parallel), cycle=args.cycle),
                                   len(pairs)) for parallel in parallels}
    for number in range(1, args.rounds + 1):
        # With every core, as the single worker of --parallel 1 runs (TensorFlow's own default, its
        # inter-op pool as wide as the intra-op one, ran BERT-Base 2-4% slower here).
        tights = _tight_loops(replace(worker.backend, threads=cores), vocab, pairs, orders, args)
        results = []
        for parallel in parallels:
            print(f"round {number}: tight loop on x{parallel}'s requests: {tights[parallel]}", flush=True)
            result = served(args, worker, pairs, parallel, max(1, cores // parallel))
            result["tight"] = tights[parallel]
            result["ratio_to_tight"] = round(result["inferences_per_s"] / tights[parallel]["inferences_per_s"], 3)
            results.append(result)
            print(f"round {number}: served x{parallel}: {result['inferences_per_s']} inf/s, ratio "
                  f"{result['ratio_to_tight']}, single added latency p50 {result['single_added_latency_ms_p50']} ms",
                  flush=True)
        report["rounds"].append({"served": results})
    report["served"] = [_over_rounds([r["served"][i] for r in report["rounds"]]) for i in range(len(parallels))]
    for result in report["served"]:
        print(f"served x{result['parallel']}: ratio to tight {result['ratio_to_tight']} (median of "
              f"{result['ratios']}), single added latency p50 {result['single_added_latency_ms_p50']} ms",
              flush=True)
    if args.json:
        try:
            write_output("--json", args.json, json.dumps(report, indent=2) + "\n")
        except ConfigError as exc:  # the report is on stdout already
            return report_error("bertpool-bench-backend", exc)
    # A rate of failed requests (or of none) measures nothing: say so, and exit 1, as bertpool-bench does.
    failed = [(number, r) for number, rnd in enumerate(report["rounds"], 1) for r in rnd["served"]
              if r["errors"] or not r["replies"]]
    if failed:
        number, r = failed[0]
        sample = next(iter(r["error_samples"].items()), None)
        return report_error("bertpool-bench-backend",
                            f"{counted(len(failed), 'served run')} had failed requests; first, round {number} "
                            f"x{r['parallel']}: {r['errors']} of {r['errors'] + r['replies']} requests failed"
                            + (f", e.g. {sample[0]}: {sample[1]}" if sample else ""), code=1)
    return 0


def _tight_loops(config: BackendConfig, vocab: str | None, pairs, orders: dict[int, list[int]],
                 args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """One round's tight loop for each served run (``orders``: its requests), on one load of the
    backend in this process, dropped before the pools start (a NeuronCore it holds is theirs).
    Served runs that send the same requests (a fixed --clients) share one loop."""
    backend = load_backend(config)
    tokenizer = BertTokenizer(vocab or backend.vocab_path or fallback_vocab_path(), max_seq_length=backend.seq_length)
    features = tokenizer.encode_pairs([(p.text_a, p.text_b) for p in pairs])
    loops: dict[tuple[int, ...], dict[str, float]] = {}
    for order in orders.values():
        if tuple(order) not in loops:
            loops[tuple(order)] = tight_loop(backend, features, order, args.batch_size, args.seconds)
    return {parallel: loops[tuple(order)] for parallel, order in orders.items()}


if __name__ == "__main__":
    raise SystemExit(main())
