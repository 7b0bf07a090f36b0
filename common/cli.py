"""Small helpers every bertpool command's thin ``main()`` shares."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .defaults import DEFAULT_BACKEND, DEFAULT_FRONTEND
from .errors import ConfigError


def setup_logging() -> None:
    """Timestamped INFO logging to stderr, the same for every process role."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def install_stop_handlers(stop: Callable[[], None]) -> None:
    """Call ``stop()`` on SIGINT (Ctrl-C) and SIGTERM, so the process can wind down cleanly; on a
    thread of its own, as :func:`install_reload_handler` does: a handler runs on the main thread between
    any two bytecodes, perhaps inside ``stop()`` itself, and a second signal there (serve gets several
    when its parent dies) blocked for ever on a lock the first call held. ``stop`` must be thread-safe
    and may run more than once."""
    def handler(*_) -> None:
        threading.Thread(target=stop, name="stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM (timeout, kill, systemd): 128 + SIGTERM
STOPPED = "130 interrupted (Ctrl-C), 143 terminated (SIGTERM)"  # the tools that unwind on a signal


def add_exit_status(parser: argparse.ArgumentParser, codes: str) -> None:
    """End ``parser``'s --help with "Exit status: CODES.", so every command says what its codes mean."""
    status = f"Exit status: {codes}."
    parser.epilog = f"{parser.epilog}. {status}" if parser.epilog else status


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (:func:`sigterm_as_interrupt`) like Ctrl-C's KeyboardInterrupt,
    so that the same cleanup runs (:func:`replacing_dir` removes its staging directory)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (a no-op elsewhere:
    only the main thread may set handlers); the previous handler is restored after. For one-shot
    tools that write files; servers stop through :func:`install_stop_handlers` instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def report_interrupt(prog: str, exc: KeyboardInterrupt, note: str = "") -> int:
    """One line saying ``prog`` was interrupted (Ctrl-C) or terminated (SIGTERM), then ``note``; the
    exit code, 130 or 143."""
    terminated = isinstance(exc, Terminated)
    print(f"{prog}: {'terminated' if terminated else 'interrupted'}{note}", file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


# Set by a bertpool parent (the supervisor for its workers, bertpool-serve for its gateway) to its own pid.
PARENT_PID_ENV = "BERTPOOL_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) plus our pid, for a child process that calls :func:`exit_with_parent`."""
    env = dict(os.environ if env is None else env)
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Get SIGTERM (a clean stop) when our parent, ``parent_pid`` or the one :func:`child_env` named,
    dies, however it dies, SIGKILL included, so no worker, gateway or bench client outlives what
    started it (holding its ports, joining the next pool under an old config, or waiting forever).
    Linux's PR_SET_PDEATHSIG (it survives exec; other systems: no-op). With neither (a process started
    by hand), nothing changes."""
    named = os.environ.pop(PARENT_PID_ENV, None)  # popped: our own children are not its children
    if parent_pid is None:
        if not named or not named.isdigit():
            return
        parent_pid = int(named)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def ignore_hangup() -> None:
    """SIGHUP means "reload" to bertpool-serve and bertpool-broker, so operators send it to every
    bertpool process; one with nothing to reload (a worker, the supervisor, the gateway) ignores it
    rather than die by its default action and orphan or stop what depends on it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def install_reload_handler(reload: Callable[[], None]) -> None:
    """Call ``reload()`` on SIGHUP (re-read files such as CURVE allow-lists without a restart), on a
    thread of its own: a signal handler runs on the main thread between any two bytecodes, perhaps
    while that thread holds a lock ``reload`` needs."""
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload, name="reload", daemon=True).start())


def output_file(value: str) -> str:
    """argparse ``type`` of a file a command writes after its run (``--json``, ``--log``): refused at
    once if it could not be written then (its directory missing, or the path a directory), so an
    hour's results are never lost to a typo."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a directory, not a file")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: directory {path.absolute().parent} does not exist")
    return value


def check_writable(flag: str, path: str | os.PathLike | None, make_parent: bool = False) -> None:
    """ConfigError (``cannot write FLAG PATH: why``) unless ``path`` (an :func:`output_file` flag's
    value; None: not given) can be opened for writing now, before a run whose results would be lost:
    :func:`output_file` checks only what argparse can say cheaply (its directory exists, it is no
    directory), and a read-only place, or one such as /proc, passes that. The probe opens the file for
    appending, so an existing file is left as it is, and removes a file it created. ``make_parent``:
    make its missing directories first (for a command whose outputs go under a tree it makes)."""
    if path is None:
        return
    target = Path(path)
    try:
        if make_parent:
            target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        with open(target, "a"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}") from exc
    if not existed:
        target.unlink(missing_ok=True)


def write_output(flag: str, path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (an :func:`output_file` flag's value, after the run): a write that
    fails then (a full disk, a directory gone) is ConfigError naming the flag, not a traceback."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}") from exc


def check_output_dir(flag: str, output: str | os.PathLike, force: bool, hint: str = "") -> None:
    """ConfigError unless ``output`` may be written: absent, an empty directory, or (with ``force``) a
    non-empty one; ``hint``: another way out the message names (e.g. ", or --reuse")."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {output} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise ConfigError(f"{flag} {output} exists and is not empty (use --force to replace it{hint})")
    _check_creatable(f"{flag} {output}", path)


def _check_creatable(name: str, output: Path) -> None:
    """ConfigError ``cannot write NAME: why`` unless a directory can be made beside ``output``, where
    :func:`replacing_dir` stages it: checked before any work by making (and removing) a probe
    directory in the nearest existing ancestor, since only the kernel knows (a read-only mount, no
    permission, /proc, a file where a parent directory should be)."""
    ancestor = _existing_ancestor(output.absolute().parent, name)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise ConfigError(f"cannot write {name}: cannot create a directory in {ancestor} "
                          f"({exc.strerror or exc})") from None


def _existing_ancestor(path: Path, name: str) -> Path:
    """``path`` or its nearest ancestor that exists; ConfigError ``cannot write NAME`` if that is not a
    directory (mkdir would say "File exists", naming the file but not the problem) or cannot be looked at."""
    try:
        while not path.exists():
            path = path.parent
        if not path.is_dir():
            raise ConfigError(f"cannot write {name}: {path} is a file, not a directory")
    except OSError as exc:  # e.g. no permission to look inside a parent
        raise ConfigError(f"cannot write {name}: {exc.strerror or exc}") from None
    return path


def check_replaceable(flag: str, output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> Path:
    """The absolute path of ``output``, a directory a command writes and, with --force, deletes first;
    ConfigError if deleting it could destroy what the user did not ask to replace: the current
    directory (or one holding it), or any of ``inputs`` (flag -> path): an input inside it (a file, a
    directory or a checkpoint prefix), or a directory input it lies inside."""
    target = Path(output).resolve()
    if Path.cwd().resolve().is_relative_to(target):
        raise ConfigError(f"{flag} {output} is the current directory or holds it; give a directory of its own")
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source.is_relative_to(target) or source.is_dir() and target.is_relative_to(source):
            raise ConfigError(f"{flag} {output} must lie outside {name} {path}, and not contain it")
    return target


@contextlib.contextmanager
def replacing_dir(output: Path, force: bool) -> Iterator[Path]:
    """Write a directory so that ``output`` appears complete or not at all: the block writes to the
    path this yields (beside ``output``, not created yet); when the block ends without error that
    becomes ``output``, replacing the old one (a non-empty one only with ``force``). On any error,
    Ctrl-C included (and SIGTERM, under :func:`sigterm_as_interrupt`), what was written goes and
    ``output`` is as it was."""
    _existing_ancestor(output.parent, str(output))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    old: Path | None = None  # where the old output waits while the new one moves in
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            yield staging
            if output.exists():
                if any(output.iterdir()) and not force:
                    raise ConfigError(f"{output} appeared meanwhile; not replacing it without --force")
                # Two renames, not a delete and a rename: an interrupt between them finds the old one
                # aside and puts it back (a delete of a large model took seconds, and lost it).
                old = output.parent / f".{output.name}.old-{os.getpid()}"
                output.rename(old)
            staging.rename(output)
        except OSError as exc:  # writing the staging directory (a full disk), or moving it in
            if exc.errno not in _NO_WRITE_ERRNOS and not any(
                    _within(name, (staging, output)) for name in (exc.filename, exc.filename2)):
                raise  # e.g. reading an input: the block's own error
            raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        if old is not None and old.exists() and not output.exists():
            old.rename(output)  # interrupted between the renames
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# What a write reports without naming a file (a write() to a file already open): always about writing.
# EFBIG: a file grown past a file-size limit (ulimit -f, the file system's largest file).
_NO_WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")
                             if hasattr(errno, name))


def _within(name: object, roots: tuple[Path, ...]) -> bool:
    """Whether ``name`` (an OSError's filename: a path, or None) is one of ``roots`` or lies inside one."""
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(name)).absolute()
    return any(path.is_relative_to(root.absolute()) for root in roots)


def check_count(flag: str, value: int, most: int, why: str = "") -> None:
    """ConfigError unless ``value`` is a whole number in 1..``most`` (a count of clients, requests or
    processes; ``why``: what the bound is, said beside it)."""
    if value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")
    if value > most:
        raise ConfigError(f"{flag} must be at most {most}{f' ({why})' if why else ''}, got {value}")


def counted(n: int, noun: str) -> str:
    """``1 client``, ``4 clients``: a count and its noun, plural unless it is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def report_error(prog: str, exc: BaseException, code: int = 2) -> int:
    """Print one clear ``prog: error: ...`` line (no traceback) and return the exit code."""
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return code


def add_link_arguments(parser) -> None:
    """Flags the broker and the workers share, defined once so bertpool-serve sets both sides:
    heartbeats on the backend link and the largest message a socket accepts."""
    parser.add_argument("--heartbeat-interval-s", type=float, default=1.0,
                        help="broker and workers beat each other this often (default: %(default)s)")
    parser.add_argument("--heartbeat-liveness", type=int, default=3,
                        help="a peer silent this many heartbeat intervals is presumed dead "
                             "(default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=4 << 20,
                        help="ZeroMQ MAXMSGSIZE: a peer sending a larger frame is disconnected before it "
                             "is read; must exceed the broker's --max-request-bytes (default: %(default)s)")


def process_endpoint(value: str) -> str:
    """argparse type of a flag naming the broker's endpoint: anything but ``inproc://``, which only
    reaches sockets of the same process (every bertpool command's peers are other processes). The
    rest is checked by the command's config (``protocol.check_endpoint``)."""
    if value.startswith("inproc://"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: inproc:// reaches only sockets in the same process, and the broker, its workers and "
            f"its clients are separate processes; use ipc:// or tcp://")
    return value


def add_address_arguments(parser, frontend: bool = True, backend: bool = True, bind: bool = False) -> None:
    """The broker's endpoints, declared once: ``--address`` (clients) and ``--worker-address``
    (workers). ``bind``: the command binds them (the broker, bertpool-serve); else it connects."""
    if frontend:
        parser.add_argument("--address", default=DEFAULT_FRONTEND, type=process_endpoint,
                            help="where clients connect, tcp:// or ipc:// (default: %(default)s)" if bind
                            else "the broker's client endpoint (default: %(default)s)")
    if backend:
        parser.add_argument("--worker-address", default=DEFAULT_BACKEND, type=process_endpoint,
                            help="where workers connect; bind tcp://0.0.0.0:PORT for workers on other "
                                 "hosts (default: %(default)s)" if bind
                            else "the broker's worker endpoint (default: %(default)s)")


def parse_host_port(value: str, flag: str) -> tuple[str, int]:
    """The value of a listening flag (``flag``, for messages): ``HOST:PORT`` or a bare ``PORT``
    (meaning 127.0.0.1:PORT) -> (host, port).

    HOST is an IPv4 address, ``[IPv6]`` or a host name; PORT is 1..65535.
    ConfigError on anything else.
    """
    text = value.strip() if isinstance(value, str) else ""
    if "://" in text:  # a URL (http://..., tcp://...): the scheme is ours to choose, not the user's
        raise ConfigError(f"{flag} {value!r}: give HOST:PORT (or PORT alone for 127.0.0.1), not a URL")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    if not host:
        raise ConfigError(f"{flag} {value!r}: no host before ':'; give HOST:PORT, or PORT "
                          f"alone for 127.0.0.1")
    host = check_host(flag, value, host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{flag} {value!r}: the port must be a number in 1..65535 "
                          f"(give HOST:PORT, or PORT alone for 127.0.0.1)")
    return host, int(port_text)


def check_host(flag: str, value: str, host: str) -> str:
    """The non-empty HOST of ``value`` (a HOST:PORT or an endpoint, for messages), brackets removed:
    an IPv4 address, ``[IPv6]`` or a host name; ConfigError naming ``flag`` otherwise. The one host
    check of parse_host_port (HTTP, metrics) and protocol.check_endpoint (ZeroMQ's tcp://)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        _check_ip(flag, value, host)
        return host
    if ":" in host:
        try:  # an IPv6 address without brackets, or one colon too many
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{flag} {value!r}: give HOST:PORT (or PORT alone for 127.0.0.1)") from None
        raise ConfigError(f"{flag} {value!r}: write an IPv6 host in brackets, [::1]:PORT")
    if host[:1].isdigit() and all(part.isdigit() for part in host.split(".")):
        _check_ip(flag, value, host)  # looks like IPv4: must be one
    elif not all(part and all(c.isalnum() or c == "-" for c in part) for part in host.split(".")):
        _check_ip(flag, value, host)
    return host


def _check_ip(flag: str, value: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"{flag} {value!r}: {host!r} is not a valid host") from exc


OFF = ("off", "")  # a listening flag's value for "not this one" (--http/--grpc, --gateway-http/--gateway-grpc)
_ZMQ_WILDCARDS = {"*": "0.0.0.0", "": "0.0.0.0", "[*]": "::"}  # ZeroMQ's spellings of "every address"


def check_distinct_listeners(listeners: dict[str, str | None], endpoints: dict[str, str] | None = None) -> None:
    """ConfigError, naming both flags, unless the listening flags in ``listeners`` (flag -> HOST:PORT
    as :func:`parse_host_port` reads it; None and ``off`` skipped) and ``endpoints`` (flag -> a
    ZeroMQ endpoint bound here; only ``tcp://`` ones take a port) would all bind different TCP ports.
    Checked before anything starts: otherwise the second one fails only once the first listens,
    after the broker, the pool or the gateway has started (and gRPC says why only in a C-level log
    line). Two hosts on one port clash when they bind a common address (:func:`_hosts_overlap`):
    ``localhost`` and ``127.0.0.1``, or a wildcard (``0.0.0.0``, ``*``, ``::``) and any address of
    its family. Names are resolved only for two listeners on one port."""
    bound = [(flag, value, _endpoint_address(value)) for flag, value in (endpoints or {}).items()]
    bound += [(flag, value, parse_host_port(value, flag)) for flag, value in listeners.items()
              if value is not None and value not in OFF]
    for i, (flag, value, address) in enumerate(bound):
        for other_flag, other_value, other in bound[:i]:
            if address and other and address[1] == other[1] and _hosts_overlap(address[0], other[0]):
                raise ConfigError(f"{other_flag} {other_value} and {flag} {value} would listen on the same "
                                  f"port ({address[1]}); give each a port of its own")


def _endpoint_address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) a ZeroMQ endpoint binds, a wildcard host as its address; None for other
    transports (ipc://: a file, which the broker compares itself) and a port its own check refuses."""
    from .protocol import tcp_host_port  # not at the top: protocol imports this module (check_host)

    tcp = tcp_host_port(endpoint)
    if tcp is None or not tcp[1].isdigit():
        return None
    host = _ZMQ_WILDCARDS.get(tcp[0], tcp[0])
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), int(tcp[1])


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether listening on hosts ``a`` and ``b`` (one port) would clash: the same name, a common
    address, or a wildcard and an address of its family. A name that does not resolve clashes only
    with itself: binding it fails with its own error, or (a ZeroMQ interface name such as ``eth0``)
    binds an address not known here."""
    if a.lower() == b.lower():
        return True
    ips_a, ips_b = _bound_addresses(a), _bound_addresses(b)
    if ips_a is None or ips_b is None:
        return False
    return any(x == y or x.version == y.version and (x.is_unspecified or y.is_unspecified)
               for x in ips_a for y in ips_b)


def _bound_addresses(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a server listening on ``host`` binds: an IP address (a wildcard included) is
    itself; a host name is every IPv4 address getaddrinfo gives it (bertpool's ZeroMQ links refuse
    IPv6, and a name's IPv6 addresses are not compared), as the servers resolve it to bind; None
    for a name that does not resolve."""
    try:
        return frozenset({ipaddress.ip_address(host)})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # socket.gaierror (no such name), or a label idna cannot encode
        return None
    return frozenset(ipaddress.ip_address(info[4][0]) for info in infos)
