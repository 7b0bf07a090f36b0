"""bertpool-serve: the broker and a supervised worker pool in one command.

The broker runs on a thread of this process; the workers are child processes.
Ctrl-C or SIGTERM stops the gateway child (if any) listening, while it finishes
its calls in flight, makes the broker refuse new requests (ERROR shutting_down)
and stops the workers, which answer what they hold; then the broker answers what
is left with shutting_down and exits (0). SIGHUP makes the broker read its CURVE
allow-lists again; it does not reload the model (serve says so).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from ..broker.broker import Broker, add_broker_arguments, broker_config_from_args
from ..common import security
from ..common.cli import (add_exit_status, check_distinct_listeners, exit_with_parent, ignore_hangup,
                          install_reload_handler, install_stop_handlers, report_error, setup_logging)
from ..common.errors import BertpoolError
from ..common.protocol import local_endpoint
from ..gateway.launch import add_serve_gateway_arguments, start_gateway_process
from ..workers.backends import ECHO_WARNING
from ..workers.supervisor import Supervisor, SupervisorCollector, add_supervisor_arguments, supervisor_config_from_args

log = logging.getLogger("bertpool.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertpool-serve",
        description="Serve a BERT sentence-pair classifier: start the broker and --parallel workers "
                    "(one per NeuronCore); print inferences/s every --stats-interval-s; stop on Ctrl-C or SIGTERM.",
        epilog="example: bertpool-serve --model runs/model-cpu --parallel 4")
    add_broker_arguments(parser)
    add_supervisor_arguments(parser)
    security.add_serve_arguments(parser)
    parser.add_argument("--stats-interval-s", type=float, default=1.0,
                        help="print inferences/s and batch fill this often, at least 0.1 s; 0 disables "
                             "(default: %(default)s)")
    add_serve_gateway_arguments(parser)
    add_exit_status(parser, "0 stopped (SIGTERM, Ctrl-C) after draining, 1 the pool failed while serving (a worker "
                            "that cannot load its model or is refused, the gateway gone), 2 it could not start "
                            "(a bad flag, an address in use, a gateway that cannot listen)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Started by a bench (child_env names it): stop, taking workers and gateway along, when it dies,
    # however it dies. Started by hand or by systemd: nothing changes.
    exit_with_parent()
    # A stop asked for while the pool starts is remembered, and acted on once it can stop (below):
    # Python's default SIGTERM would kill us mid-start, leaving the gateway to find out by itself.
    early_stop = threading.Event()
    install_stop_handlers(early_stop.set)
    ignore_hangup()  # a reload before there is a broker to reload: nothing to do (its handler comes below)
    try:
        config = broker_config_from_args(args, args.stats_interval_s)  # each address checked on its own
        # ... and none on another's port, before anything binds: the metrics server or the gateway child
        # would fail only once the broker is up (the broker compares its two endpoints itself).
        check_distinct_listeners({"--metrics-address": args.metrics_address, "--gateway-http": args.gateway_http,
                                  "--gateway-grpc": args.gateway_grpc},
                                 endpoints={"--address": args.address, "--worker-address": args.worker_address})
        broker = Broker(config)
        security.complete_serve_args(args, broker.config.curve)  # its workers get the broker's public key
        # Its workers connect where the broker binds (a wildcard host becomes loopback).
        supervisor = Supervisor(supervisor_config_from_args(args, local_endpoint(args.worker_address)))
        broker.bind()
    except BertpoolError as exc:
        return report_error("bertpool-serve", exc)
    if broker.metrics_server is not None:  # the deaths only the supervisor sees, on the same endpoint
        broker.metrics_server.registry.register(SupervisorCollector(supervisor))
    thread = threading.Thread(target=broker.run, name="broker", daemon=True)
    thread.start()
    try:
        gateway = start_gateway_process(args, cancel=early_stop)
    except BertpoolError as exc:  # asked for a gateway and cannot have one: serve nothing
        broker.stop(drain=False)
        thread.join(10)
        return report_error("bertpool-serve", exc)
    gateway_lost: list[int] = []
    if gateway is not None:
        def on_gateway_exit(code: int) -> None:
            # Never serve on without the gateway that was asked for: stop the whole pool, loudly.
            # (Signals to our process group do not reach it: it has a session of its own, and we stop it.
            # Except in the instant between its fork and that new session: a stop asked for meanwhile may
            # kill it, and a gateway that dies while we are asked to stop is no loss: we were stopping.)
            if broker.stopping or early_stop.is_set():
                return
            if code:
                log.error("the gateway (bertpool-gateway) exited with code %d; stopping", code)
                gateway_lost.append(code)
            broker.stop()
            supervisor.stop()
        gateway.watch(on_gateway_exit)
    # SIGTERM: the gateway stops listening first (a client or load balancer then finds it closed, and
    # goes elsewhere, instead of getting 503 from a draining pool) while it finishes its calls in flight;
    # the broker refuses new requests at once while the workers finish what they hold.
    def stop() -> None:
        if gateway is not None:
            gateway.terminate()
        broker.stop()
        supervisor.stop()
    install_stop_handlers(stop)
    install_reload_handler(lambda: reload(broker, supervisor))
    if early_stop.is_set():
        log.info("stopping: asked to while starting")
        stop()
    else:
        _print_banner(args, supervisor)
    try:
        supervisor.run()  # returns after stop() (signal), a worker that cannot load, or a lost gateway
    finally:
        if gateway is not None:
            gateway.stop()
        if not broker.stopping:  # the workers stopped on their own (a load failure)
            broker.stop()
        # The workers are gone, having answered what they held; the broker answers the rest.
        thread.join(broker.config.drain_timeout_s + 10)
    if supervisor.failed:
        return report_error("bertpool-serve", supervisor.failed, code=1)
    if gateway_lost:
        return report_error("bertpool-serve", f"the gateway exited with code {gateway_lost[0]}", code=1)
    return 0


def reload(broker: Broker, supervisor: Supervisor) -> bool:
    """SIGHUP: read the CURVE allow-lists again (True if the new ones are in use), after saying what a
    reload does not do: operators send SIGHUP expecting the model to be reloaded, and it is not."""
    model_dir = supervisor.config.worker.backend.model_dir
    if model_dir:
        # Said because a worker restarted later (after a crash) loads what the directory holds then: a
        # model replaced in place is served by some workers and not others until serve restarts.
        log.info("reload (SIGHUP): the model is NOT reloaded; the workers keep the one they loaded from %s. "
                 "To serve a new one, restart bertpool-serve", model_dir)
    return broker.reload_allow_lists()


def _print_banner(args: argparse.Namespace, supervisor: Supervisor) -> None:
    """What serve listens on and serves (stdout), and the echo warning (stderr)."""
    backend = supervisor.config.worker.backend
    served = f" serving {backend.model_dir}" if backend.model_dir else ""
    print(f"bertpool-serve: clients on {args.address}, workers on {args.worker_address}, "
          f"{args.parallel} x {backend.name} workers{served}", flush=True)
    if backend.name == "echo":
        print(f"bertpool-serve: WARNING: {ECHO_WARNING}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
