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

Writes a JSON report with each set-up's round trips/s, the ratios to relay, and the CPU
microseconds per round trip of the router (proxy or broker), the workers and the load (Linux
/proc; left out elsewhere): on a shared machine these move less than the rates do.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from . import add_vocab_argument, echo_vocab
from ..clients.bench import wait_for_workers
from ..common import protocol as P
from ..common.fastzmq import recv_many, send_nowait
from ..broker.broker import Broker, BrokerConfig

SETUPS = ("relay", "broker", "pool")


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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..workers.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(broker_address=address, batch_timeout_ms=0, vocab_path=vocab))
    threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True).start()
    worker.run()


def request_body(kind: str) -> bytes:
    """The REQUEST body every load socket sends: a text pair, or the same pair pre-tokenized."""
    a, b = "The quick brown fox jumps.", "A fast fox leapt over."
    if kind == "text":
        return P.text_request("bench", a, b)
    from ..common.tokenizer import BertTokenizer
    from ..workers.backends import fallback_vocab_path

    f = BertTokenizer(fallback_vocab_path()).encode_pairs([(a, b)])
    return P.features_request("bench", f.input_ids[0], f.input_mask[0], f.segment_ids[0])


def _load(address: str, sockets: int, warmup_s: float, duration_s: float, body: bytes, results) -> None:
    """Closed loop: each socket keeps one REQUEST in flight; count replies in the window."""
    ctx = zmq.Context()
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
            cpu: dict[str, Any] | None = None, vocab: str | None = None) -> float:
    """Round trips per second for one set-up (``metrics_address``: the broker's, to measure the
    cost of recording metrics; ``vocab``: the pool workers' vocabulary); with ``cpu``, also the
    CPU microseconds per round trip of the router (this process: the relay's proxy or the broker)
    and of the workers, from the window's start until every load process reported, and of the
    load processes (their window)."""
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
        broker = Broker(BrokerConfig(frontend=front, backend=back, metrics_address=metrics_address),
                        context=zctx)
        broker.bind()
        thread = threading.Thread(target=broker.run, daemon=True)
        target = _protocol_echo if setup == "broker" else _pool_worker
    thread.start()
    args = (back, stop, vocab) if setup == "pool" else (back, stop)
    procs = [ctx.Process(target=target, args=args, daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    if broker is not None:
        wait_for_workers(front, workers, timeout_s=60.0)
    results = ctx.Queue()
    share = [clients // load_procs + (i < clients % load_procs) for i in range(load_procs)]
    loaders = [ctx.Process(target=_load, args=(front, n, warmup_s, duration_s, body, results))
               for n in share if n]
    for p in loaders:
        p.start()
    # The window starts at the same monotonic instant in every loader (it is system-wide).
    window_start = max(results.get(timeout=120)[1] for _ in loaders)
    time.sleep(max(0.0, window_start - time.monotonic()))
    worker_pids = [p.pid for p in procs]
    router_cpu, worker_cpu = [_cpu_s(os.getpid())], [_cpu_s(pid) for pid in worker_pids]
    counts = [results.get(timeout=warmup_s + duration_s + 60) for _ in loaders]
    total = sum(n for n, _ in counts)
    if cpu is not None and total:
        cpu["router"] = _cpu_us_per_round_trip([os.getpid()], router_cpu, total)
        cpu["workers"] = _cpu_us_per_round_trip(worker_pids, worker_cpu, total)
        cpu["load"] = round(sum(c for _, c in counts) / total * 1e6, 1)
    for p in loaders:
        p.join(10)
    stop.set()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
    if broker is not None:
        broker.stop()
        thread.join(5)
    zctx.destroy(linger=0)  # also ends the relay's proxy thread
    return total / duration_s


def _proxy(frontend: zmq.Socket, backend: zmq.Socket) -> None:
    try:
        zmq.proxy(frontend, backend)
    except zmq.ZMQError:
        pass  # the context was destroyed: the relay is done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpool-bench-broker",
        description="Measure round trips/s through the bertpool broker against a plain zmq.proxy "
                    "ROUTER/DEALER relay, with the same closed-loop load, in one run.")
    parser.add_argument("--clients", type=int, default=48, help="client sockets (default: %(default)s)")
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
    add_vocab_argument(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown or min(args.clients, args.workers, args.load_procs) < 1:
        parser.error(f"bad --setups {sorted(unknown)} or non-positive count")
    body = request_body(args.request)
    vocab, vocab_name = echo_vocab(args.vocab)
    report: dict[str, Any] = {"clients": args.clients, "workers": args.workers, "request": args.request,
                              "vocab": vocab_name,
                              "duration_s": args.duration_s, "metrics": bool(args.metrics_address),
                              "round_trips_per_s": {}}
    report["cpu_us_per_round_trip"] = {}
    for setup in setups:
        cpu: dict[str, Any] = {}
        rate = measure(setup, args.clients, args.workers, args.load_procs, args.warmup_s, args.duration_s,
                       body, args.metrics_address, cpu, vocab)
        report["round_trips_per_s"][setup] = round(rate, 1)
        report["cpu_us_per_round_trip"][setup] = cpu
        print(f"{setup:>6}: {rate:10.1f} round trips/s; CPU us per round trip: router {cpu.get('router')}, "
              f"workers {cpu.get('workers')}, load {cpu.get('load')}", flush=True)
    relay = report["round_trips_per_s"].get("relay")
    if relay:
        report["ratio_to_relay"] = {k: round(v / relay, 3) for k, v in report["round_trips_per_s"].items()}
        print("ratio to relay:", report["ratio_to_relay"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
