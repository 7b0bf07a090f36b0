"""bertpool-bench-broker: broker round trips/s against a plain ``zmq.proxy`` relay.

Three set-ups, measured in the same run with the same closed-loop load (C
client DEALER sockets spread over a few load processes, each keeping one
request in flight, for ``--duration-s`` after a warm-up):

* ``relay``:  ROUTER/DEALER ``zmq.proxy`` + N echo processes that return the
  body untouched: the floor cost of moving a message through ZeroMQ.
* ``broker``: the bertpool broker + N minimal protocol workers that answer each
  REQUEST at once: the broker's own cost (credit dispatch, tokens, tracking).
* ``pool``:   the bertpool broker + N real bertpool workers with the echo
  backend and zero delay: the whole serving path (decode, tokenize, batch,
  reply) without a model.

Then, with ``--single N`` (the default), one client alone sends N requests one at a time through
the same set-up: a plain DEALER for each set-up (the server side's round trip), and for ``pool``
also a :class:`bertpool.Client` (the whole path a user sees, whose time beyond each reply's own
compute is the single-request added latency; the pool's batch timeout is 0).

Writes a JSON report with each set-up's round trips/s, the ratios to relay, and the CPU
microseconds per round trip of the router (proxy or broker), the workers and the load (Linux
/proc; left out elsewhere): on a shared machine these move less than the rates do; and the
single-client latencies with each one's excess over the relay's.

On a VM these move between runs (a lone request's round trip by a tenth of a millisecond): with
``--rounds N`` every set-up is measured N times in turn, and the report's numbers are the medians of
the rounds' (each ratio and each excess over the relay taken within its own round), beside every
round's own under ``rounds``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from . import add_vocab_argument, echo_vocab, median_tree
from ..clients.bench import (MAX_CLIENTS, BenchConfig, next_result, percentiles, run_bench, run_environment,
                             wait_for_workers)
from ..workers.supervisor import check_processes
from ..common.cli import (STOPPED, add_exit_status, check_count, check_writable, output_file, parse_host_port,
                          report_error, report_interrupt, sigterm_as_interrupt, write_output)
from ..common import protocol as P
from ..common.data import Pair
from ..common.errors import BenchError, BertpoolError, ConfigError, RequestTimeout
from ..common.fastzmq import recv_many, send_nowait
from ..broker.broker import Broker, BrokerConfig

SETUPS = ("relay", "broker", "pool")
MAX_ROUNDS = 100  # each round takes about half a minute: a digit too many is refused, not run for a day


def _relay_echo(address: str, stop) -> None:
    """A relay backend: echo every message back unchanged."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    while not stop.is_set():
        if sock.poll(100):
            for _ in range(256):
                try:
                    sock.send_multipart(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
    sock.close(linger=0)


def _protocol_echo(address: str, stop) -> None:
    """A minimal bertpool worker: READY (taking up to 64 requests per message), then a canned answer
    to each REQUEST at once, one REPLIES message for each message received; it beats every second
    like a real worker, so the broker never presumes it dead while idle."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    # Named by pid and a random incarnation: unique across processes (id(sock) was not).
    incarnation = P.new_incarnation()
    name = f"echo-{os.getpid()}-{incarnation[:8]}"
    sock.send_multipart(P.ready_frames(name, None, incarnation, os.getpid(), 64, "echo", 1,
                                       requests_per_message=64))
    reply = P.reply_body("x", [0.5, 0.5], {})
    next_beat = time.monotonic() + 1.0
    while not stop.is_set():
        if sock.poll(100):
            for frames in recv_many(sock, 256):
                message = P.parse_from_broker(frames)
                requests = message.requests if message.kind == P.REQUESTS else [message]
                answers = [(P.REPLY, r.token, reply) for r in requests if r.kind == P.REQUEST]
                if answers:
                    send_nowait(sock, P.replies_frames(answers))
        if time.monotonic() >= next_beat:
            sock.send_multipart(P.heartbeat_frames())
            next_beat = time.monotonic() + 1.0
    sock.send_multipart(P.worker_disconnect_frames(name, incarnation))
    sock.close(linger=100)


def _pool_worker(address: str, stop, vocab: str | None = None) -> None:
    """A real bertpool worker, echo backend, no delay; ``vocab``: its WordPiece vocabulary (None:
    the echo backend's built-in character vocabulary)."""
    from ..common.tokenizer import serial_tokenizers
    from ..workers.worker import Worker, WorkerConfig

    serial_tokenizers()

    try:
        worker = Worker(WorkerConfig(broker_address=address, batch_timeout_ms=0, vocab_path=vocab))
        worker.load()
    except BertpoolError as exc:  # one line, and an exit code the bench sees (see _wait_for_workers)
        print(f"bertpool-bench-broker: error: a pool worker could not load: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True).start()
    worker.run()


PAIR = ("The quick brown fox jumps.", "A fast fox leapt over.")  # what every request asks


def request_body(kind: str) -> bytes:
    """The REQUEST body every load socket sends: a text pair, or the same pair pre-tokenized."""
    a, b = PAIR
    if kind == "text":
        return P.text_request("bench", a, b)
    from ..common.tokenizer import BertTokenizer
    from ..workers.backends import fallback_vocab_path

    f = BertTokenizer(fallback_vocab_path()).encode_pairs([(a, b)])
    return P.features_request("bench", f.input_ids[0], f.input_mask[0], f.segment_ids[0])


def _load(address: str, sockets: int, warmup_s: float, duration_s: float, body: bytes, results) -> None:
    """Closed loop: each socket keeps one REQUEST in flight; count replies in the window."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, sockets + 16)  # ZeroMQ's default, 1023, is below what --clients allows
    socks = [ctx.socket(zmq.DEALER) for _ in range(sockets)]
    poller = zmq.Poller()
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        poller.register(s, zmq.POLLIN)
    for s in socks:
        s.send_multipart([P.VERSION, P.REQUEST, body])
    start = time.monotonic() + warmup_s
    end = start + duration_s
    results.put(("start", start))
    count, cpu_start = 0, None
    while (now := time.monotonic()) < end:
        if cpu_start is None and now >= start:
            cpu_start = time.process_time()
        for s, _ in poller.poll(100):
            s.recv_multipart()
            if start <= now:
                count += 1
            s.send_multipart([P.VERSION, P.REQUEST, body])
    results.put((count, time.process_time() - (cpu_start or time.process_time())))
    for s in socks:
        s.close()
    ctx.term()


SINGLE_LIMIT_S = 120.0  # longest the single DEALER runs; it stops early at its first unanswered request


def _single_dealer(address: str, requests: int, body: bytes, results) -> None:
    """One DEALER alone: ``requests`` round trips one at a time, after as many unmeasured; put their
    latencies (ms) on ``results`` (fewer than asked if it ran out of time or got no answer)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    latencies = []
    limit = time.monotonic() + SINGLE_LIMIT_S
    for n in range(2 * requests):
        started = time.perf_counter()
        sock.send_multipart([P.VERSION, P.REQUEST, body])
        if not sock.poll(max(1, int((limit - time.monotonic()) * 1000))):
            break
        sock.recv_multipart()
        if n >= requests:
            latencies.append((time.perf_counter() - started) * 1000)
    results.put(latencies)
    sock.close()
    ctx.term()


def _latency(values: list[float]) -> dict[str, Any]:
    """p50 and p99 (ms, rounded to µs; None when empty) of a single client's round trips, and how many
    there were."""
    pct = percentiles(values)
    return {"p50": pct["p50"], "p99": pct["p99"], "requests": len(values)}


def single_latency(setup: str, address: str, requests: int, body: bytes,
                   worker_pids: list[int] | None = None) -> dict[str, Any]:
    """One client alone against a running set-up: a plain DEALER's round trips (``dealer``) and, for
    the pool, a bertpool Client's (``client``, with ``beyond_compute_p50``: the median of each
    reply's latency less its own batch's compute time). With ``worker_pids``, the DEALER's entry also
    has the CPU microseconds per round trip of the router (this process) and of the workers, all
    threads (ZeroMQ's I/O threads included): one request at a time pays every wake-up alone, which
    the load's rates share out over many."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_single_dealer, args=(address, requests, body, results), daemon=True)
    pids = {"router": [os.getpid()], "workers": worker_pids or []}
    before = {role: [_cpu_s(pid) for pid in role_pids] for role, role_pids in pids.items()}
    proc.start()
    out = {"dealer": _latency(results.get(timeout=SINGLE_LIMIT_S + 60))}
    proc.join(10)
    if worker_pids:
        # Counted over the probe's whole run, its unmeasured first ``requests`` round trips included.
        measured = out["dealer"]["requests"]
        sent = requests + measured if measured else 0
        out["dealer"]["cpu_us_per_round_trip"] = {
            role: _cpu_us_per_round_trip(role_pids, before[role], sent) for role, role_pids in pids.items()}
    if setup == "pool":
        report = run_bench(BenchConfig(address=address, clients=1, cycle=requests, warmup=requests,
                                       timeout_s=10.0), [Pair(*PAIR, label=None)])
        out["client"] = {"p50": report["latency_ms"]["p50"], "p99": report["latency_ms"]["p99"],
                         "requests": report["replies"],
                         "beyond_compute_p50": report["beyond_compute_ms"]["p50"]}
    return out


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (None where /proc is not there)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_us_per_round_trip(pids: list[int], before: list[float | None], round_trips: float) -> float | None:
    """CPU microseconds the processes ``pids`` spent per round trip since ``before``."""
    after = [_cpu_s(pid) for pid in pids]
    if round_trips <= 0 or any(v is None for v in before + after):
        return None
    return round(sum(a - b for a, b in zip(after, before)) / round_trips * 1e6, 1)


def measure(setup: str, clients: int, workers: int, load_procs: int, warmup_s: float,
            duration_s: float, body: bytes, metrics_address: str = "",
            cpu: dict[str, Any] | None = None, vocab: str | None = None,
            single: dict[str, Any] | None = None, single_requests: int = 0, busy_poll_us: float = 0.0) -> float:
    """Round trips per second for one set-up (``metrics_address``: the broker's, to measure the
    cost of recording metrics; ``vocab``: the pool workers' vocabulary; ``busy_poll_us``: the
    broker's, see BrokerConfig); with ``cpu``, also the
    CPU microseconds per round trip of the router (this process: the relay's proxy or the broker)
    and of the workers, from the window's start until every load process reported, and of the
    load processes (their window); with ``single`` and ``single_requests``, also what
    :func:`single_latency` measures once the load is done."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    tmp = tempfile.mkdtemp(prefix="bertpool-relay-")
    front, back = f"ipc://{tmp}/front", f"ipc://{tmp}/back"
    zctx = zmq.Context()
    broker = None
    if setup == "relay":
        f, b = zctx.socket(zmq.ROUTER), zctx.socket(zmq.DEALER)
        f.bind(front)
        b.bind(back)
        thread = threading.Thread(target=_proxy, args=(f, b), daemon=True)
        target = _relay_echo
    else:
        broker = Broker(BrokerConfig(frontend=front, backend=back, metrics_address=metrics_address,
                                     busy_poll_us=busy_poll_us), context=zctx)
        broker.bind()
        thread = threading.Thread(target=broker.run, daemon=True)
        target = _protocol_echo if setup == "broker" else _pool_worker
    thread.start()
    args = (back, stop, vocab) if setup == "pool" else (back, stop)
    procs = [ctx.Process(target=target, args=args, daemon=True) for _ in range(workers)]
    loaders: list = []
    try:  # whatever ends the run (an error, Ctrl-C, SIGTERM), no process it started runs on
        for p in procs:
            p.start()
        if broker is not None:
            _wait_for_workers(front, procs, workers, timeout_s=60.0)
        results = ctx.Queue()
        share = [clients // load_procs + (i < clients % load_procs) for i in range(load_procs)]
        loaders = [ctx.Process(target=_load, args=(front, n, warmup_s, duration_s, body, results), daemon=True)
                   for n in share if n]
        for p in loaders:
            p.start()
        # The window starts at the same monotonic instant in every loader (it is system-wide).
        window_start = max(_next_result(results, loaders, 120)[1] for _ in loaders)
        time.sleep(max(0.0, window_start - time.monotonic()))
        worker_pids = [p.pid for p in procs]
        router_cpu, worker_cpu = [_cpu_s(os.getpid())], [_cpu_s(pid) for pid in worker_pids]
        counts = [_next_result(results, loaders, warmup_s + duration_s + 60) for _ in loaders]
        total = sum(n for n, _ in counts)
        if cpu is not None and total:
            cpu["router"] = _cpu_us_per_round_trip([os.getpid()], router_cpu, total)
            cpu["workers"] = _cpu_us_per_round_trip(worker_pids, worker_cpu, total)
            cpu["load"] = round(sum(c for _, c in counts) / total * 1e6, 1)
        for p in loaders:
            p.join(10)
        if single is not None and single_requests:
            single.update(single_latency(setup, front, single_requests, body, worker_pids))
    finally:
        stop.set()
        for p in loaders:  # done after a full run; cut short otherwise
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(10)
            if p.is_alive():
                p.terminate()
        if broker is not None:
            broker.stop()
            thread.join(5)
        zctx.destroy(linger=0)  # also ends the relay's proxy thread
    return total / duration_s


def _exited(procs: list, what: str, also_zero: bool = False) -> None:
    """BenchError if one of ``procs`` (the bench's own) exited with an error (``also_zero``: at all),
    so that the bench stops instead of waiting out its timeout for what that process would have done."""
    for p in procs:
        if p.exitcode is not None and (p.exitcode or also_zero):
            raise BenchError(f"a {what} process exited with code {p.exitcode} (its error, if any, is above)")


def _wait_for_workers(address: str, procs: list, n: int, timeout_s: float) -> None:
    """wait_for_workers, in one-second slices, stopping at once when a worker process exits (e.g. it
    could not load) instead of after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait_for_workers(address, n, timeout_s=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except RequestTimeout:
            _exited(procs, "worker", also_zero=True)  # it should serve until stop: any exit is a failure
            if time.monotonic() >= deadline:
                raise


def _next_result(results, procs: list, timeout_s: float):
    """The next item on ``results``, waited for in one-second slices: BenchError as soon as one of
    ``procs`` (the load processes that put them) failed, or after ``timeout_s``."""
    return next_result(results, time.monotonic() + timeout_s,
                       f"the load processes reported nothing within {timeout_s:g} s", lambda: _exited(procs, "load"))


def _proxy(frontend: zmq.Socket, backend: zmq.Socket) -> None:
    try:
        zmq.proxy(frontend, backend)
    except zmq.ZMQError:
        pass  # the context was destroyed: the relay is done


def _describe(single: dict[str, Any]) -> str:
    line = f"DEALER p50 {single['dealer']['p50']} ms, p99 {single['dealer']['p99']} ms"
    cpu = single["dealer"].get("cpu_us_per_round_trip")
    if cpu:
        line += f" (CPU us per round trip: router {cpu['router']}, workers {cpu['workers']})"
    if "client" in single:
        client = single["client"]
        line += (f"; bertpool.Client p50 {client['p50']} ms, p99 {client['p99']} ms, beyond its own compute "
                 f"p50 {client['beyond_compute_p50']} ms")
    return line


def _single_summary(singles: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``single_over_relay_ms``: each single-client p50 less the relay's (the DEALER through the
    broker, through the pool, and bertpool.Client through the pool, with and without its compute:
    ``pool_client_beyond_compute`` is what bertpool adds to ZeroMQ's own round trip, which on a VM
    moves by a tenth of a millisecond between runs; None without a relay run or an answer);
    ``single_added_latency_ms``: the Client's time beyond its own compute through the pool (batch
    timeout 0), the issue's "added latency over the batch time"."""
    def at(setup: str, who: str, field: str = "p50") -> float | None:
        return singles.get(setup, {}).get(who, {}).get(field)

    relay = at("relay", "dealer")
    over = {name: None if relay is None or value is None else round(value - relay, 3)
            for name, value in (("broker", at("broker", "dealer")), ("pool", at("pool", "dealer")),
                                ("pool_client", at("pool", "client")),
                                ("pool_client_beyond_compute", at("pool", "client", "beyond_compute_p50")))}
    return {"single_over_relay_ms": over, "single_added_latency_ms": at("pool", "client", "beyond_compute_p50")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench-broker",
        description="Measure round trips/s through the bertpool broker against a plain zmq.proxy "
                    "ROUTER/DEALER relay, with the same closed-loop load, in one run.")
    add_exit_status(parser, f"0 measured, 2 it could not run (a bad flag, a --vocab or pool worker that cannot "
                            f"load), {STOPPED}; either way its processes are stopped")
    parser.add_argument("--clients", type=int, default=48,
                        help=f"client sockets, at most {MAX_CLIENTS} (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="echo workers (default: %(default)s)")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="processes driving the client sockets (default: %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured warm-up (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured window (default: %(default)s)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated subset of {','.join(SETUPS)} (default: all)")
    parser.add_argument("--request", choices=("text", "features"), default="text",
                        help="send a text pair (workers tokenize) or pre-tokenized features "
                             "(default: %(default)s)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", default="",
                        help="run the broker with its Prometheus endpoint on, to measure what recording "
                             "metrics costs (default: off)")
    parser.add_argument("--busy-poll-us", type=float, default=0.0,
                        help="the broker's --busy-poll-us in the broker and pool set-ups, to measure what "
                             "it saves and costs (default: off)")
    parser.add_argument("--single", type=int, default=1000, metavar="N",
                        help="after each set-up's load, one client alone sends N requests one at a time "
                             "(0: skip) (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="measure every set-up N times, in turn, each time with fresh processes; the report's "
                             "numbers are then the medians over the rounds (each ratio and each excess over "
                             "the relay taken within its own round), and 'rounds' holds each round's "
                             f"(at most {MAX_ROUNDS}) (default: %(default)s)")
    add_vocab_argument(parser)
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON to FILE")
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown or not setups:
        parser.error(f"--setups must name some of {', '.join(SETUPS)}, got {args.setups!r}")
    try:
        check_count("--clients", args.clients, MAX_CLIENTS)
        check_processes("--workers", args.workers)
        check_processes("--load-procs", args.load_procs)
        check_count("--rounds", args.rounds, MAX_ROUNDS, "each runs every set-up")
        if args.metrics_address:  # now, not when the broker set-up starts after the relay's run
            parse_host_port(args.metrics_address, "--metrics-address")
        BrokerConfig(busy_poll_us=args.busy_poll_us)  # likewise
    except ConfigError as exc:
        parser.error(str(exc))
    args.environment = run_environment("bertpool-bench-broker", argv)
    if args.single < 0:
        parser.error(f"--single must be >= 0, got {args.single}")
    if not 0 <= args.warmup_s <= P.MAX_TIMEOUT_S:
        parser.error(f"--warmup-s must be >= 0 and at most {P.MAX_TIMEOUT_S:g} s, got {args.warmup_s}")
    try:
        P.check_timeout("--duration-s", args.duration_s)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        check_writable("--json", args.json)  # before the set-ups run, not after them
        with sigterm_as_interrupt():  # SIGTERM (timeout, kill) unwinds like Ctrl-C: its processes are stopped
            return _run(args, setups)
    except BertpoolError as exc:  # e.g. a --metrics-address the broker cannot bind, a bad --vocab
        return report_error("bertpool-bench-broker", exc)
    except KeyboardInterrupt as exc:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        return report_interrupt("bertpool-bench-broker", exc, "; its processes were stopped, no report")


def _run(args: argparse.Namespace, setups: list[str]) -> int:
    body = request_body(args.request)
    vocab, vocab_name = echo_vocab(args.vocab)
    if "pool" in setups:  # read once here, so a bad file is one line now, not an error in every worker later
        from ..common.tokenizer import BertTokenizer
        from ..workers.backends import fallback_vocab_path

        BertTokenizer(vocab or fallback_vocab_path())
    report: dict[str, Any] = {"clients": args.clients, "workers": args.workers, "request": args.request,
                              "vocab": vocab_name,
                              "duration_s": args.duration_s, "metrics": bool(args.metrics_address),
                              "busy_poll_us": args.busy_poll_us,
                              # Every setting (the fields above are the ones read most), and where it ran.
                              "config": {"setups": setups, "load_procs": args.load_procs,
                                         "warmup_s": args.warmup_s, "single": args.single, "vocab": args.vocab,
                                         "rounds": args.rounds},
                              "environment": args.environment}
    rounds = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {number} of {args.rounds}:", flush=True)
        rounds.append(_round(args, setups, body, vocab))
    if args.rounds == 1:
        report.update(rounds[0])
    else:
        report.update(median_tree(rounds))
        report["rounds"] = rounds
        print(f"median of {args.rounds} rounds:", flush=True)
        _print_summary(report)
    if args.json:  # a file that cannot be written now is a ConfigError, reported by main (exit 2)
        write_output("--json", args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _round(args: argparse.Namespace, setups: list[str], body: bytes, vocab: str | None) -> dict[str, Any]:
    """Every set-up measured once, in order, each with its own fresh processes: the round's rates,
    CPU, ratios to the relay and single-client latencies (the report's fields of those names)."""
    out: dict[str, Any] = {"round_trips_per_s": {}, "cpu_us_per_round_trip": {}}
    singles: dict[str, dict[str, Any]] = {}
    for setup in setups:
        cpu: dict[str, Any] = {}
        single: dict[str, Any] = {}
        rate = measure(setup, args.clients, args.workers, args.load_procs, args.warmup_s, args.duration_s,
                       body, args.metrics_address, cpu, vocab, single, args.single, args.busy_poll_us)
        out["round_trips_per_s"][setup] = round(rate, 1)
        out["cpu_us_per_round_trip"][setup] = cpu
        print(f"{setup:>6}: {rate:10.1f} round trips/s; CPU us per round trip: router {cpu.get('router')}, "
              f"workers {cpu.get('workers')}, load {cpu.get('load')}", flush=True)
        if single:
            singles[setup] = single
            print(f"{'':>6}  one client alone: {_describe(single)}", flush=True)
    relay = out["round_trips_per_s"].get("relay")
    if relay:
        out["ratio_to_relay"] = {k: round(v / relay, 3) for k, v in out["round_trips_per_s"].items()}
    if singles:
        out["single_client_ms"] = singles
        out.update(_single_summary(singles))
    _print_summary(out)
    return out


def _print_summary(record: dict[str, Any]) -> None:
    """The ratios to the relay and the single-client summary of a round or of the rounds' medians."""
    if "ratio_to_relay" in record:
        print("ratio to relay:", record["ratio_to_relay"], flush=True)
    if "single_client_ms" in record:
        print("one client alone:", {k: record[k] for k in ("single_over_relay_ms", "single_added_latency_ms")},
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
