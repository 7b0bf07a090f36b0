"""The supervisor: start N worker processes, one per NeuronCore, and restart the dead.

Each worker process gets its own core through the environment the Neuron
runtime documents: ``NEURON_RT_VISIBLE_CORES=<core>`` (``NEURONCORE_GROUP_SIZES``
has had no effect since Neuron 1.20 and is not set). For the neuron backend,
``--parallel`` is checked first against the NeuronCores the runtime can see
(:mod:`.neuron_cores`). A worker that exits is restarted after a backoff that
doubles while it keeps dying young (capped; a slot that keeps dying young is
reported as crash-looping, once, at ERROR). One that cannot load its model
(exit code 2, whatever the reason) at start is never restarted: the supervisor
stops every worker and reports that worker's error. A restart of a worker that
had served and now cannot load (its model directory or key file changed under a
serving pool) is retried slowly instead, while the other workers serve what they
loaded; only when none is left does the pool stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..common import configdata, prometheus, security
from ..common.cli import (add_address_arguments, add_exit_status, check_count, child_env, counted, ignore_hangup,
                          install_stop_handlers, report_error, setup_logging)
from ..common.errors import BertpoolError, ConfigError
from ..common.tokenizer import serial_tokenizers
from ..compile.runtime import quiet_tensorflow
from .backends import ECHO_WARNING, MAX_THREADS
from .neuron_cores import NEURON_SYSFS, check_cores
from .worker import (EXIT_LOAD_FAILED, EXIT_REFUSED, WorkerConfig, add_worker_arguments, flags_given,
                     worker_config_from_args)

log = logging.getLogger("bertpool.supervisor")

# Most worker processes per CPU core (os.cpu_count()). Each is a process with its own model copy, I/O
# thread and tokenizer: beyond a few per core they only split the cores further (benches run 2 per core).
# A typo (--parallel 1000) forked 140 workers in 10 s on 2 cores, and 99999999999999999999 grew the
# supervisor's memory until it was killed. The neuron backend is also held to its NeuronCores (check_cores).
MAX_WORKERS_PER_CPU = 8


def check_processes(name: str, value: int) -> None:
    """ConfigError unless ``value`` processes (workers, or a bench's own) is in 1..MAX_WORKERS_PER_CPU per core."""
    cores = os.cpu_count() or 1
    check_count(name, value, MAX_WORKERS_PER_CPU * cores, f"{MAX_WORKERS_PER_CPU} processes per CPU core, {cores} here")


@dataclass(frozen=True)
class SupervisorConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)  # template for every worker
    parallel: int = 4                  # worker processes, one per NeuronCore
    first_core: int = 0                # NeuronCore index of the first worker
    restart_backoff_s: float = 0.5     # first restart delay; doubles while workers die young
    max_backoff_s: float = 30.0        # cap on the restart delay
    healthy_after_s: float = 30.0      # a worker alive this long resets its backoff
    stop_grace_s: float = 10.0         # SIGTERM -> SIGKILL grace period on stop
    neuron_sysfs: str = NEURON_SYSFS   # where the Neuron driver lists its devices (neuron backend)

    def __post_init__(self) -> None:
        # The one check, for every caller; named as the flag that sets it (serve, workers, the benches
        # pass it on), so a command's message names what its user typed.
        check_processes("--parallel", self.parallel)
        if self.first_core < 0:
            raise ConfigError(f"first_core must be >= 0, got {self.first_core}")


def worker_argv(config: WorkerConfig, config_file: str | Path, load_error_file: str | None = None) -> list[str]:
    """The command line that runs one worker process with ``config``, which it writes as data (every
    field, CURVE keys as file paths only) to ``config_file`` (mode 0600); its load error goes to
    ``load_error_file``."""
    security.check_key_files(config.curve)
    configdata.write_json(config, config_file)
    argv = [sys.executable, "-m", "bertpool.workers.worker", "--config-json", str(config_file)]
    if load_error_file:
        argv += ["--load-error-file", load_error_file]
    return argv


def worker_env(core: int) -> dict[str, str]:
    """This process's environment plus the Neuron runtime's core assignment and our pid (the worker
    exits with us: common.cli.exit_with_parent)."""
    env = child_env()  # the worker stops when we die, even by SIGKILL
    env["NEURON_RT_VISIBLE_CORES"] = str(core)
    quiet_tensorflow(env)  # TF's C++ INFO lines from every worker would bury the pool's own log
    serial_tokenizers(env)  # one process per core already: the tokenizer's own thread pool would oversubscribe
    return env


@dataclass
class _Slot:
    """One core's worker: its process and restart bookkeeping."""
    index: int
    core: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    young_deaths: int = 0          # deaths in a row, each within healthy_after_s of its start
    ran: bool = False              # a process of this slot got past loading (see _Slot.healthy)
    failing: str | None = None     # why its last process could not start or load (None: it could)

    def healthy(self, now: float, healthy_after_s: float) -> bool:
        """Whether its process has been alive ``healthy_after_s``: it loaded (a load takes less)."""
        return self.process is not None and now - self.started >= healthy_after_s


# A slot whose workers die young this many times in a row is called crash-looping, once, at ERROR:
# its restarts go on (the backoff caps their rate), but an operator must look at why.
CRASH_LOOP_DEATHS = 5
# Prefix of the supervisor's temporary directory (workers' configs and load errors), followed by
# the supervisor's pid: a supervisor killed outright (SIGKILL) cannot remove it, the next one does.
TEMP_PREFIX = "bertpool-workers-"
OWNER_FILE = "owner"  # in that directory: "<hostname> <pid>" of the supervisor that made it


# Why a worker process ended without being asked (bertpool_worker_exits_total's cause label): killed by a
# signal, a non-zero exit, exit 0, could not load its model or configuration, refused by the broker.
EXIT_CAUSES = ("signal", "error", "exited", "load_failed", "refused")


# The supervisor's Prometheus families, name -> help: bertpool-serve exports them on the broker's endpoint,
# bertpool-workers on its own --metrics-address (one definition, so one dashboard reads both). Listed in
# the README's "Monitoring" section, as the broker's are.
SUPERVISOR_METRICS = {
    "bertpool_worker_exits_total": "The supervisor's worker processes that ended without being asked, by cause: "
                                   "signal (killed: OOM killer, a crash in native code, by hand), error (a non-zero "
                                   "exit), exited (exit 0), load_failed (could not load its model or configuration), "
                                   "refused (the broker ended its handshake); those that die before READY included",
    "bertpool_worker_slots_failing": "The supervisor's worker slots whose worker could not start, load or register "
                                     "and is retried while the others serve (until a worker of the slot has run "
                                     "30 s, or dies of something else)",
}


def exit_cause(code: int) -> str:
    """The :data:`EXIT_CAUSES` entry of a worker's Popen return code."""
    if code == EXIT_LOAD_FAILED:
        return "load_failed"
    if code == EXIT_REFUSED:
        return "refused"
    return "signal" if code < 0 else "error" if code else "exited"


def describe_exit(code: int) -> str:
    """How a worker process ended, for a log line: ``exited with code 1`` or ``was killed by SIGKILL``
    (Popen's negative return code), with who usually sends that signal."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"was killed by signal {-code}"
    who = {"SIGKILL": " (by hand, or the kernel's OOM killer: see dmesg)",
           "SIGSEGV": " (a crash in native code: TensorFlow or the Neuron runtime)"}.get(name, "")
    return f"was killed by {name}{who}"


def sweep_stale_dirs(root: str | Path | None = None) -> int:
    """Remove the temporary directories of supervisors on this host that are gone (killed outright, so
    their own cleanup never ran); how many. A directory is stale only when its owner file names this
    host and a pid that no longer runs: one whose owner cannot be told (an older layout, another user,
    another host sharing /tmp) is left alone, as is one whose pid runs (perhaps reused: kept, not lost)."""
    removed = 0
    host = socket.gethostname()
    for path in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        try:
            owner_host, pid = (path / OWNER_FILE).read_text(encoding="utf-8").split()
            if path.stat().st_uid != os.getuid() or owner_host != host or _pid_runs(int(pid)):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Supervisor:
    """Keep ``parallel`` workers alive until stop().

    A worker that dies is restarted after a backoff (restart_backoff_s, doubling while it dies young, up
    to max_backoff_s); a slot that dies young CRASH_LOOP_DEATHS times in a row is reported once at
    ERROR. A worker that cannot start or load (exit EXIT_LOAD_FAILED or EXIT_REFUSED) stops the pool
    (``failed`` says why) when that is the slot's first process, or when no other slot can serve; a
    restart of a slot that ran before (the model or a key file changed under a serving pool) is
    retried every max_backoff_s instead, while the others serve what they loaded."""

    def __init__(self, config: SupervisorConfig) -> None:
        """ConfigError when the neuron backend asks for cores the Neuron runtime cannot see."""
        if config.worker.backend.name == "neuron":
            check_cores(config.parallel, config.first_core, config.neuron_sysfs, os.environ)
        self.config = config
        self._stop = threading.Event()
        self._slots = [_Slot(i, config.first_core + i) for i in range(config.parallel)]
        # This supervisor process: its pid, plus a random part for hosts (containers) where two
        # supervisors share a hostname and a pid. Two supervisors' slots never coincide.
        self._run_id = f"{os.getpid()}.{secrets.token_hex(2)}"
        self.failed: str | None = None  # the first reason the pool stopped for good (no model, refused...)
        # Worker processes that ended unasked, by exit_cause: each death the supervisor saw, those before a
        # READY included (the broker counts restarts by READY; a worker dying as it loads never says one).
        self.exits = dict.fromkeys(EXIT_CAUSES, 0)
        self._errors_dir: Path | None = None  # workers' configs (0600), and why they stopped for good
        # The longest worker name (the last core's) in a WorkerConfig now: a name too long for READY is a
        # ConfigError here, not a traceback when run() starts that worker.
        self._worker_config(self._slots[-1])

    def stop(self) -> None:
        """Ask run() to stop the workers and return (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> None:
        """Start the workers, restart the dead ones, and stop them all on stop() or a load failure."""
        stale = sweep_stale_dirs()
        if stale:
            log.info("removed %d temporary director%s left by supervisors that were killed", stale,
                     "y" if stale == 1 else "ies")
        self._errors_dir = self._make_temp_dir(Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")))
        try:
            for slot in self._slots:
                if self._stop.is_set():  # stopped before we ran (a signal during start-up), or failed
                    break
                self._start(slot)
            # The wait bounds how late a death or stop() is noticed; no busy loop.
            while not self._stop.wait(0.2):
                for slot in self._slots:
                    self._check(slot)
        finally:
            self._terminate_all()
            shutil.rmtree(self._errors_dir, ignore_errors=True)
            self._log_restarts()

    @staticmethod
    def _make_temp_dir(path: Path) -> Path:
        """``path``, a private directory (made if missing), with the owner file sweep_stale_dirs reads."""
        path.mkdir(mode=0o700, exist_ok=True)
        (path / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        return path

    def _worker_config(self, slot: _Slot) -> WorkerConfig:
        """The config of ``slot``'s worker: the template, named for the slot."""
        # Unique to host, supervisor process and core, stable across this slot's restarts: the
        # broker spots a restart by the slot (and tells the processes apart by their incarnation).
        name = f"{self.config.worker.name or socket.gethostname()}:{self._run_id}:core-{slot.core}"
        return dataclasses.replace(self.config.worker, name=name, slot=name)

    def _start(self, slot: _Slot) -> None:
        """Start ``slot``'s worker; one that cannot be started (its config or key files unwritable or
        gone, no memory to fork) is handled as a worker that could not load, never a traceback."""
        cfg = self._worker_config(slot)
        slot.started = time.monotonic()
        try:
            if not self._errors_dir.is_dir():  # removed under us (a /tmp cleaner such as systemd-tmpfiles)
                log.warning("%s was removed while serving; making it again", self._errors_dir)
                self._make_temp_dir(self._errors_dir)
            self._error_file(slot).unlink(missing_ok=True)  # a reason is this process's, not an earlier one's
            argv = worker_argv(cfg, self._errors_dir / f"worker-{slot.index}.json", str(self._error_file(slot)))
            slot.process = subprocess.Popen(argv, env=worker_env(slot.core))
        except (BertpoolError, OSError) as exc:
            self._cannot_serve(slot, f"worker {slot.index} (NeuronCore {slot.core}) could not be started: {exc}")
            return
        log.info("started %s (pid %d) on NeuronCore %d", cfg.name, slot.process.pid, slot.core)

    def _check(self, slot: _Slot) -> None:
        """Restart ``slot``'s worker when its backoff is over; notice its death."""
        now = time.monotonic()
        if slot.process is None:
            if now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            return
        if slot.healthy(now, self.config.healthy_after_s):
            slot.ran, slot.failing = True, None
        code = slot.process.poll()
        if code is None:
            return
        pid, slot.process = slot.process.pid, None
        self.exits[exit_cause(code)] += 1
        if code in (EXIT_LOAD_FAILED, EXIT_REFUSED):  # restarting at once cannot help
            what = ("could not load its model or configuration" if code == EXIT_LOAD_FAILED
                    else "cannot talk to the broker")
            self._cannot_serve(slot, f"worker {slot.index} (NeuronCore {slot.core}) {what}: "
                                     f"{self._load_error(slot, code)}")
        else:
            self._died(slot, pid, code, now - slot.started, now)

    def _died(self, slot: _Slot, pid: int, code: int, lived: float, now: float) -> None:
        """A worker that had started died: restart it after a backoff that doubles while it dies young."""
        slot.ran, slot.failing = True, None
        young = lived < self.config.healthy_after_s
        slot.young_deaths = slot.young_deaths + 1 if young else 0
        slot.backoff_s = (min(slot.backoff_s * 2, self.config.max_backoff_s) if young and slot.backoff_s
                          else self.config.restart_backoff_s)
        slot.restart_at = now + slot.backoff_s
        log.warning("worker %d (pid %d, NeuronCore %d) %s after %.1f s; restarting it in %.1f s (restart %d of "
                    "this slot; %d in a row died within %.0f s of starting)", slot.index, pid, slot.core,
                    describe_exit(code), lived, slot.backoff_s, slot.restarts + 1, slot.young_deaths,
                    self.config.healthy_after_s)
        if slot.young_deaths == CRASH_LOOP_DEATHS:
            log.error("worker %d (NeuronCore %d) is crash-looping: %d deaths in a row, each within %.0f s of "
                      "starting; still restarting it, at most every %.0f s, while the other workers serve. Find "
                      "why in its log lines above (or dmesg for the OOM killer), then fix it or stop serve",
                      slot.index, slot.core, slot.young_deaths, self.config.healthy_after_s,
                      self.config.max_backoff_s)

    def _cannot_serve(self, slot: _Slot, reason: str) -> None:
        """``slot``'s worker could not start or load, for ``reason``: restarting it at once cannot help.
        Its first process (the model or config is wrong from the start), or no other slot able to serve:
        stop the pool. Otherwise (the model or a key file changed under a serving pool): retry it every
        max_backoff_s, saying so, while the other workers serve what they loaded."""
        slot.process, slot.failing = None, reason
        others = [s for s in self._slots if s is not slot and s.failing is None]
        if not slot.ran or not others:
            if slot.ran:
                reason = f"{reason}; no other worker is left to serve"
            self.failed = self.failed or reason  # the first reason is the one serve exits with
            log.error("%s; stopping all workers", reason)
            self._stop.set()
            return
        slot.backoff_s = self.config.max_backoff_s
        slot.restart_at = time.monotonic() + slot.backoff_s
        log.error("%s. %s; retrying this one in %.0f s (restart %d of this slot). Fix or restore what it "
                  "names, or stop serve", reason, "1 other worker keeps serving what it loaded" if len(others) == 1
                  else f"{len(others)} other workers keep serving what they loaded", slot.backoff_s, slot.restarts + 1)

    @property
    def failing_slots(self) -> int:
        """Slots whose worker could not start or load, retried while the others serve."""
        return sum(slot.failing is not None for slot in self._slots)

    def _error_file(self, slot: _Slot) -> Path:
        return self._errors_dir / f"worker-{slot.index}.error"

    def _load_error(self, slot: _Slot, code: int) -> str:
        try:
            # Without its full stop: the reason is quoted inside a sentence ("...: REASON; stopping").
            return self._error_file(slot).read_text(encoding="utf-8").strip().rstrip(".") or "no reason given"
        except OSError:
            return f"exit code {code}, no reason recorded (see its log above)"

    def _log_restarts(self) -> None:
        """At the end, how often each slot was restarted (nothing when none was)."""
        restarted = [f"worker {s.index}: {s.restarts}" for s in self._slots if s.restarts]
        if restarted:
            log.info("workers restarted %s in all (%s)", counted(sum(s.restarts for s in self._slots), "time"),
                     ", ".join(restarted))

    def _terminate_all(self) -> None:
        procs = [s.process for s in self._slots if s.process is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_grace_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class SupervisorCollector:
    """A prometheus-client custom collector of one supervisor's SUPERVISOR_METRICS, read at scrape time.

    The broker counts a restart when the restarted process says READY; a worker that dies while it
    loads (a crash loop at start, a model damaged under a serving pool) never does, so only the
    supervisor, which starts and reaps the processes, can count it. Runs on the HTTP server's thread:
    the fields it reads are plain ints, updated by the supervisor's thread."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list:
        """One empty family per SUPERVISOR_METRICS entry (for the ``?name[]=`` filter)."""
        return prometheus.describe_families(SUPERVISOR_METRICS)

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


def start_metrics_server(supervisor: Supervisor, address: str) -> prometheus.MetricsServer | None:
    """bertpool-workers' --metrics-address: serve ``supervisor``'s SUPERVISOR_METRICS at ``address``
    (HOST:PORT, or PORT for 127.0.0.1), or nothing when it is empty. ConfigError, as the broker's
    flag gives, for a bad address, a missing ``metrics`` extra or an address it cannot listen on."""
    if not address:
        return None
    server = prometheus.MetricsServer(address, [SupervisorCollector(supervisor)])
    log.info("metrics on %s", server.url)
    return server


def add_supervisor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parallel", type=int, default=4,
                        help=f"worker processes, one per NeuronCore, at most {MAX_WORKERS_PER_CPU} per CPU core "
                             f"(default: %(default)s)")
    parser.add_argument("--first-core", type=int, default=0,
                        help="NeuronCore index of the first worker (default: %(default)s)")
    parser.add_argument("--neuron-sysfs", default=NEURON_SYSFS, metavar="DIR",
                        help="neuron backend: where the Neuron driver lists its devices, to count the "
                             "NeuronCores --parallel may use (default: %(default)s)")
    parser.add_argument("--worker-config-json", metavar="FILE",
                        help="the workers' whole config as JSON, every WorkerConfig field (how benches "
                             "start a pool); its broker_address must be --worker-address; not combined "
                             "with the other worker flags")
    add_worker_arguments(parser)


def supervisor_config_from_args(args: argparse.Namespace, worker_address: str) -> SupervisorConfig:
    """The pool's config from the command line, built once, so SupervisorConfig's checks (--parallel's
    bound among them) run once."""
    if args.worker_config_json is not None:
        worker = _worker_config_from_json(args, worker_address)
    else:
        # Share the machine's cores between TensorFlow workers unless told otherwise (a default, so held to
        # the bound a --threads given is checked against). max(1, ...): --parallel is checked below, by
        # SupervisorConfig; a bad one must reach that check, not divide by zero here.
        threads = args.threads or min(MAX_THREADS, max(1, (os.cpu_count() or 1) // max(1, args.parallel)))
        worker = worker_config_from_args(args, worker_address, threads=threads)
    return SupervisorConfig(worker=worker, parallel=args.parallel, first_core=args.first_core,
                            neuron_sysfs=args.neuron_sysfs)


def _worker_config_from_json(args: argparse.Namespace, worker_address: str) -> WorkerConfig:
    """--worker-config-json: refuse worker flags beside it, and a broker address it would not reach."""
    flags = argparse.ArgumentParser(add_help=False)
    add_worker_arguments(flags)
    given = flags_given(flags, args)
    if given:
        raise ConfigError(f"--worker-config-json holds the workers' whole config: drop {', '.join(given)}")
    worker = configdata.read_json(WorkerConfig, args.worker_config_json)
    curve = security.client_config_from_args(args)
    if curve is not None and worker.curve != curve:  # never let the file quietly drop the keys asked for
        raise ConfigError("--worker-config-json holds the workers' whole config, CURVE keys included, and its "
                          "keys are not the CURVE key flags given: drop those flags, or put the same key files "
                          "in the file")
    if worker.broker_address != worker_address:
        raise ConfigError(f"--worker-config-json: broker_address {worker.broker_address} is not "
                          f"--worker-address {worker_address}")
    return worker


def main(argv: list[str] | None = None) -> int:
    """bertpool-workers: run the supervised worker pool against an existing broker."""
    parser = argparse.ArgumentParser(
        prog="bertpool-workers",
        description="Start N bertpool workers (one per NeuronCore) that connect to a broker, "
                    "and restart any that die.")
    add_address_arguments(parser, frontend=False)
    add_supervisor_arguments(parser)
    security.add_client_arguments(parser, own="the workers' own (all of this command's workers use it)")
    # Only here, not in add_supervisor_arguments: bertpool-serve's --metrics-address is the broker's, which
    # serves these families too.
    parser.add_argument("--metrics-address", metavar="HOST:PORT", default="",
                        help="serve this supervisor's Prometheus metrics (worker exits by cause, slots failing "
                             "to load) at http://HOST:PORT/metrics; a bare PORT means 127.0.0.1 (needs the "
                             "[metrics] extra; default: off)")
    add_exit_status(parser, "0 stopped (SIGTERM, Ctrl-C), 1 the pool stopped because a worker cannot load its "
                            "model or was refused by the broker (restarting it would not help), 2 a bad flag (a "
                            "--metrics-address it cannot listen on included)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        supervisor = Supervisor(supervisor_config_from_args(args, args.worker_address))
        # Listening before any worker starts: a bad address is exit 2 with nothing started.
        metrics = start_metrics_server(supervisor, args.metrics_address)
    except BertpoolError as exc:
        return report_error("bertpool-workers", exc)
    if supervisor.config.worker.backend.name == "echo":
        print(f"bertpool-workers: WARNING: {ECHO_WARNING}", file=sys.stderr, flush=True)
    install_stop_handlers(supervisor.stop)
    ignore_hangup()  # nothing to reload; dying of it would orphan the workers
    try:
        supervisor.run()
    finally:
        if metrics is not None:
            metrics.close()
    return 1 if supervisor.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
