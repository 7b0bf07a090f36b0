"""ZeroMQ CURVE for bertpool's two links: clients -> frontend, workers -> backend.

Off by default: without it both links are plain text, and every default
address binds 127.0.0.1 only. With it, the broker is the CURVE server on both
ROUTERs and each link has its own allow-list of public keys, kept apart by
ZAP domain (:data:`CLIENTS`, :data:`WORKERS`): a client key cannot register as
a worker, nor a worker key send requests. A peer with no key, or one not on
its link's list, never completes the handshake, so nothing it sends is read.
The broker reads both lists again on SIGHUP (:meth:`Authenticator.reload`):
keys added are let in, keys removed are refused from their next handshake on
(a peer already connected keeps its connection until it reconnects).

Keys are ZeroMQ certificate files as pyzmq's :func:`zmq.auth.create_certificates`
writes them (``NAME.key``: public; ``NAME.key_secret``: both halves);
``bertpool-keys`` (:mod:`bertpool.common.keys`) makes them.

The role modules call one function per socket, before bind/connect:
:func:`apply_server` (broker ROUTERs, after :func:`start_authenticator`) and
:func:`apply_client` (client and worker DEALERs). Both do nothing when the
config is ``None``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import ConfigError
from .configdata import SECRET

log = logging.getLogger("bertpool.security")

CLIENTS = "bertpool-clients"  # ZAP domain of the frontend (clients' link)
WORKERS = "bertpool-workers"  # ZAP domain of the backend (workers' link)
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------ key files

def _check_z85_key(key: bytes, what: str, path: str) -> bytes:
    """``key`` if it is a 40-character Z85 CURVE key, else ConfigError naming the file."""
    try:
        if len(key) == 40 and len(z85.decode(key)) == 32:
            return key
    except (ValueError, KeyError, IndexError, TypeError, struct.error):  # struct: Z85 digits out of range
        pass
    raise ConfigError(f"{path}: the {what} is not a valid 40-character Z85 CURVE key")


def load_public_key(path: str | os.PathLike) -> bytes:
    """The public key (Z85) in a certificate file (``.key``, or ``.key_secret``, which holds it too)."""
    public, _ = _load(path)
    return public


def load_peer_public_key(path: str | os.PathLike, where: str) -> bytes:
    """The public key in ``path``, a file that must hold nothing else: another host's key (the
    broker's, for a peer's --curve-server-key) or an allow-list entry. ConfigError if it also
    holds a secret key, naming ``where`` it was given: a secret key copied there has left its
    owner, and holding the broker's lets anyone who reads it pose as the broker."""
    public, secret = _load(path)
    if secret is not None:
        raise ConfigError(f"{path} holds a SECRET key, but {where} takes a public key only "
                          f"(NAME{PUBLIC_SUFFIX}): use the {PUBLIC_SUFFIX} file, remove this copy, and since "
                          f"others may have read it, make a new key pair for its owner (bertpool-keys)")
    return public


def load_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; ConfigError if it holds no secret key or they differ."""
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path} holds only a public key; give the secret key file "
                          f"(NAME{SECRET_SUFFIX}, made by bertpool-keys)")
    secret = _check_z85_key(secret, "secret-key", str(path))
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{path}: its public-key does not belong to its secret-key")
    _warn_if_others_may_read(Path(path))
    return public, secret


def _warn_if_others_may_read(path: Path) -> None:
    """Log a warning when a secret key file is readable by its group or by others (bertpool-keys
    writes 0600): anyone who can read it can pose as its owner. A warning, not a refusal: a
    container or a mounted secret may have its own rules."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("secret key file %s is readable by others (mode %04o): anyone who can read it can "
                    "pose as its owner; chmod 600 it", path, mode)


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """Read one certificate file with pyzmq, translating every failure into ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"key file {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"key file {p} is not a regular file")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except OSError as exc:
        raise ConfigError(f"cannot read key file {p}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not a ZeroMQ certificate (no public-key line): {exc}") from exc
    except IndexError as exc:  # pyzmq's reader, on a key line without '='
        raise ConfigError(f"{p} is not a ZeroMQ certificate: a public-key or secret-key line without '='") from exc
    return _check_z85_key(public, "public-key", str(p)), secret


def load_allow_list(directory: str | os.PathLike, what: str) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in ``directory``, skipping hidden files as the
    shell's ``*.key`` does (an editor's lock or backup file, ``.#client.key``, is no key).
    ConfigError if it holds none, if one is bad, or if it holds a secret key: an allow-list
    takes public keys only (see :func:`load_peer_public_key`)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{what} allow-list {d} is not a directory")
    try:
        names = sorted(f.name for f in d.iterdir() if not f.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"cannot list {what} allow-list {d}: {exc.strerror or exc}") from exc
    secrets = [n for n in names if n.endswith(SECRET_SUFFIX)]
    if secrets:
        # Ignoring them would leave a peer's secret key lying in a directory that is copied and
        # read more freely than the key's owner would allow.
        raise ConfigError(f"{what} allow-list {d} holds secret key files ({', '.join(secrets)}): it takes "
                          f"public keys only (NAME{PUBLIC_SUFFIX}); remove them, and make new key pairs "
                          f"for their owners if others may have read them")
    files = [d / n for n in names if n.endswith(PUBLIC_SUFFIX)]
    if not files:
        # An empty list refuses everyone: surely a mistake, so say so instead of serving nobody.
        raise ConfigError(f"{what} allow-list {d} holds no public keys (*{PUBLIC_SUFFIX}): "
                          f"no {what} could connect")
    return frozenset(load_peer_public_key(f, f"the {what} allow-list {d}") for f in files)


def generate_key_pairs(directory: str | os.PathLike, names: list[str],
                       force: bool = False) -> list[tuple[str, str]]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) for each name into ``directory``
    (created 0700 if missing, its missing parents never writable by others) with pyzmq; returns
    their paths. ConfigError, before writing anything, on a bad name, a directory that cannot be
    used, or files (or symlinks, even dangling ones) in the way unless ``force``."""
    _check_key_names(names)
    d = Path(directory)
    try:
        _make_key_directory(d)
        existing = [str(d / f"{n}{s}") for n in names for s in (PUBLIC_SUFFIX, SECRET_SUFFIX)
                    if os.path.lexists(d / f"{n}{s}")]  # lexists: a dangling symlink is in the way too
    except OSError as exc:  # e.g. a parent we may not search: stat() itself fails
        raise ConfigError(f"cannot use key directory {d}: {exc.strerror or exc}") from exc
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    written = []
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        for name in names:
            written.append(_write_key_pair(d, name))
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {d}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    return written


def _check_key_names(names: list[str]) -> None:
    """ConfigError unless ``names`` are distinct bare key names (no path, no key suffix)."""
    if not names:
        raise ConfigError("give at least one key name")
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(f"bad key name {name!r}: use letters, digits, '.', '_' and '-' "
                              f"(no '/'), starting with a letter or digit")
        if name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)):
            # "client.key" would make client.key.key: a name the README's `cp keys/client.key` misses.
            raise ConfigError(f"bad key name {name!r}: give the bare name ({name.rsplit('.', 1)[0]}); "
                              f"bertpool-keys adds {PUBLIC_SUFFIX} and {SECRET_SUFFIX} itself")
    if len(set(names)) != len(names):
        raise ConfigError(f"key names repeat: {' '.join(names)}")


def _make_key_directory(d: Path) -> None:
    """Create ``d`` (mode 0700) and its missing parents, which are never group- or world-writable:
    under a permissive umask (000) they were 0777, so anyone could rename the key directory away
    and put their own in its place. OSError is the caller's to translate."""
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} exists and is not a directory")
    old_umask = os.umask(0o077)  # os.umask only sets: this reads the old one, then sets the one we want
    os.umask(old_umask | 0o022)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create key directory {d}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)


def _write_key_pair(d: Path, name: str) -> tuple[str, str]:
    """Write one key pair into ``d`` with pyzmq; (public, secret) paths. Each file replaces what is
    there atomically: pyzmq writes both into a staging directory inside ``d`` (same file system; mode
    0700, and the caller's umask 077 creates the secret 0600), they are flushed to disk, then each is
    os.replace'd over its name. A crash or a full disk midway leaves every name holding its old key or
    its new one, never a truncated or missing key (it was unlinked first, then rewritten); a symlink
    in the way is replaced, never followed. Not both names at once: the public key is replaced first,
    so a crash between the two renames leaves the new public key beside the old secret (run it
    again, with --force). OSError is the caller's to translate."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=d))  # hidden: no *.key an allow-list reads
    try:
        written = zmq.auth.create_certificates(staging, name)
        os.chmod(written[0], 0o644)
        os.chmod(written[1], 0o600)  # already, by the umask; said here, as the contract
        for path in written:
            _fsync(path, os.O_RDONLY)
        targets = []
        for path in written:
            target = d / Path(path).name
            os.replace(path, target)
            targets.append(str(target))
        _fsync(d, os.O_RDONLY | os.O_DIRECTORY)  # the renames themselves
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets[0], targets[1]


def _fsync(path: str | os.PathLike, flags: int) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk, so a rename never lands before the
    data it names."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------- configs

@dataclass(frozen=True)
class CurveClientConfig:
    """CURVE for a connecting socket (a client's or a worker's DEALER). Give the files, or the
    loaded keys (Z85 bytes) instead; files are loaded and every key is checked at construction."""
    server_key_file: str | None = None   # the broker's public key file (NAME.key)
    secret_key_file: str | None = None   # our own key pair (NAME.key_secret)
    # Z85 keys, loaded from the files when empty. Secret: they never travel to a child process
    # (configdata), which loads them from the files again.
    server_key: bytes = field(default=b"", repr=False, metadata={SECRET: True})  # the broker's public key
    public_key: bytes = field(default=b"", repr=False, metadata={SECRET: True})  # our public key
    secret_key: bytes = field(default=b"", repr=False, metadata={SECRET: True})  # our secret key

    def __post_init__(self) -> None:
        if self.server_key_file is not None:
            if self.server_key:
                raise ConfigError("give the broker's public key as a file or as a key, not both")
            object.__setattr__(self, "server_key", load_peer_public_key(
                self.server_key_file, "--curve-server-key (the broker's public key)"))
        if self.secret_key_file is not None:
            if self.public_key or self.secret_key:
                raise ConfigError("give our key pair as a file or as keys, not both")
            public, secret = load_key_pair(self.secret_key_file)
            object.__setattr__(self, "public_key", public)
            object.__setattr__(self, "secret_key", secret)
        if not self.server_key:
            raise ConfigError("CURVE needs the broker's public key (--curve-server-key FILE)")
        if not self.secret_key:
            raise ConfigError("CURVE needs our own key pair (--curve-secret-key FILE.key_secret)")
        _check_z85_key(self.server_key, "server key", "server_key")
        _check_z85_key(self.public_key, "public key", "public_key")
        if zmq.curve_public(_check_z85_key(self.secret_key, "secret key", "secret_key")) != self.public_key:
            raise ConfigError("public_key does not belong to secret_key")


@dataclass(frozen=True)
class CurveServerConfig:
    """CURVE for the broker: its key pair and one allow-list directory per link; the files
    are loaded and checked at construction (ConfigError)."""
    secret_key_file: str     # the broker's key pair (NAME.key_secret)
    allow_clients_dir: str   # public keys (*.key) of the clients allowed on the frontend
    allow_workers_dir: str   # public keys (*.key) of the workers allowed on the backend
    public_key: bytes = field(init=False, repr=False)  # loaded from secret_key_file
    secret_key: bytes = field(init=False, repr=False)  # loaded from secret_key_file

    def __post_init__(self) -> None:
        public, secret = load_key_pair(self.secret_key_file)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "secret_key", secret)
        same = (Path(self.allow_clients_dir).resolve() == Path(self.allow_workers_dir).resolve())
        if same:
            raise ConfigError("--curve-allow-clients and --curve-allow-workers must be different "
                              "directories, so a client's key cannot register as a worker")
        self.allowed(CLIENTS)
        self.allowed(WORKERS)

    def allowed(self, domain: str) -> frozenset[bytes]:
        """The public keys allowed in ``domain`` (re-read from its directory; ConfigError if bad)."""
        if domain == CLIENTS:
            return load_allow_list(self.allow_clients_dir, "client")
        if domain == WORKERS:
            return load_allow_list(self.allow_workers_dir, "worker")
        raise ConfigError(f"unknown ZAP domain {domain!r}")


# -------------------------------------------------------------------- sockets

# Monitor events of a connecting socket that end (or complete) ZeroMQ's handshake with the server.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(head: bytes, address: str, curve: CurveClientConfig | None,
                      allow_flag: str) -> tuple[int, str | None, bool]:
    """A monitor event of a socket connecting to ``address``, from the first frame ``head`` of its
    message (uint16 event, uint32 value): ``(event, why, final)``. ``why`` says for a person what
    went wrong with a failed handshake (None for any other event); ``final`` is True when retrying
    cannot help: the broker refused our key, or one side uses CURVE and the other not. A failure
    with no detail is not final: a broker dying mid-handshake causes one too, though a wrong
    server key causes one on every try. ``curve``: the socket's own CURVE settings;
    ``allow_flag``: the broker flag whose directory must hold our public key."""
    event = int.from_bytes(head[:2], "little") if len(head) >= 2 else 0
    value = int.from_bytes(head[2:6], "little") if len(head) >= 6 else 0
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        ours = curve.public_key.decode() if curve is not None else "(none)"
        return event, (f"the broker at {address} refused our CURVE public key {ours} (ZAP status "
                       f"{value}): copy its .key file into the broker's {allow_flag} directory"), True
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return event, (f"the server at {address} uses CURVE and we do not (give --curve-server-key "
                           f"and --curve-secret-key)" if curve is None else
                           f"we use CURVE and the server at {address} does not"), True
        return event, (f"the server at {address} broke ZeroMQ's handshake (protocol error {value:#x}): "
                       f"is it a bertpool broker, and the address the right port?"), True
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        if curve is not None:
            return event, (f"the CURVE handshake with the broker at {address} failed: is "
                           f"--curve-server-key the broker's public key, and does the broker use CURVE?"), False
        # Without CURVE, a broker that requires it may hang up before saying so (a race).
        return event, (f"the server at {address} ended ZeroMQ's handshake (errno {value}): if the "
                       f"broker uses CURVE, give --curve-server-key and --curve-secret-key"), False
    return event, None, False


def apply_client(sock: zmq.Socket, curve: CurveClientConfig | None) -> None:
    """Make ``sock`` (before connect) a CURVE client of the broker; nothing when ``curve`` is None."""
    if curve is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)


def apply_server(sock: zmq.Socket, curve: CurveServerConfig | None, domain: str) -> None:
    """Make ``sock`` (before bind) a CURVE server whose peers ZAP checks against ``domain``'s
    allow-list; nothing when ``curve`` is None. Call :func:`start_authenticator` first."""
    if curve is None:
        return
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


class _AllowList:
    """pyzmq credentials provider for one ZAP domain: allows the listed keys, counts and logs
    the refused ones (each refused key is logged once, so a peer retrying cannot flood the log)."""

    _MAX_LOGGED = 1024

    def __init__(self, domain: str, keys: frozenset[bytes]) -> None:
        self.domain = domain
        self.keys = keys
        self.allowed = 0
        self.denied = 0
        self._logged: set[bytes] = set()
        self._lock = threading.Lock()

    def replace(self, keys: frozenset[bytes]) -> tuple[int, int]:
        """Allow ``keys`` from now on; (keys added, keys removed). A key refused before and
        refused again is logged again."""
        with self._lock:
            added, removed = len(keys - self.keys), len(self.keys - keys)
            self.keys = keys  # one reference swap: a handshake judged meanwhile sees old or new
            self._logged.clear()
        return added, removed

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        with self._lock:
            if ok:
                self.allowed += 1
                return True
            self.denied += 1
            first = key not in self._logged and len(self._logged) < self._MAX_LOGGED
            if first:
                self._logged.add(key)
        if first:
            log.warning("CURVE: refused a %s with unknown public key %s", _peer(domain),
                        key.decode("ascii", "replace"))
        return False

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"allowed": self.allowed, "denied": self.denied}


def _peer(domain: str) -> str:
    return {CLIENTS: "client", WORKERS: "worker"}.get(domain, domain)


class Authenticator:
    """The broker's ZAP handler (a pyzmq ThreadAuthenticator) with one allow-list per link."""

    def __init__(self, context: zmq.Context, curve: CurveServerConfig) -> None:
        self._curve = curve
        self.lists = {d: _AllowList(d, curve.allowed(d)) for d in (CLIENTS, WORKERS)}
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("bertpool.security.zap"))
        # Configured before it starts: no handshake is ever judged without the lists (and a
        # domain with no list is refused by pyzmq anyway).
        for domain, allow in self.lists.items():
            self._auth.configure_curve_callback(domain, credentials_provider=allow)
        try:
            self._auth.start()
        except zmq.ZMQError as exc:  # EADDRINUSE: this context already has a ZAP handler
            raise ConfigError(f"cannot start the CURVE authenticator: {exc} (one broker per "
                              f"ZeroMQ context)") from exc

    def reload(self) -> str:
        """Read both allow-list directories again and use them for every handshake from now on; a
        line saying what changed. Both lists or neither: a directory that cannot be read, or holds
        no key, raises ConfigError and the lists in use stay as they were."""
        fresh = {d: self._curve.allowed(d) for d in self.lists}
        changes = []
        for domain, keys in fresh.items():
            added, removed = self.lists[domain].replace(keys)
            changes.append(f"{_peer(domain)}s {len(keys)} (+{added} -{removed})")
        return "CURVE allow-lists reloaded: " + ", ".join(changes)

    def stats(self) -> dict[str, dict[str, int]]:
        """Handshakes ZAP allowed and denied, per link (peers with no key at all fail before ZAP
        and are not counted)."""
        return {_peer(d) + "s": a.counts() for d, a in self.lists.items()}

    def stop(self) -> None:
        self._auth.stop()


def warn_if_exposed(endpoints: list[str], curve: CurveServerConfig | None) -> list[str]:
    """Log a warning for each tcp endpoint bound beyond loopback without CURVE (its traffic is
    plain text and anyone who can reach it may connect); returns those endpoints."""
    if curve is not None:
        return []
    exposed = [e for e in endpoints if e.startswith("tcp://") and _host(e) not in _LOOPBACK]
    for endpoint in exposed:
        log.warning("%s is reachable beyond this host WITHOUT CURVE: its traffic is plain text and any "
                    "peer may connect (see README, Security: --curve-secret-key)", endpoint)
    return exposed


_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _host(endpoint: str) -> str:
    """The host part of ``tcp://HOST:PORT`` (``[v6]`` kept in brackets)."""
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]


def start_authenticator(context: zmq.Context, curve: CurveServerConfig | None) -> Authenticator | None:
    """Start the ZAP handler on ``context`` (before any CURVE server socket binds); None when off."""
    return None if curve is None else Authenticator(context, curve)


def server_stats(auth: Authenticator | None) -> dict[str, Any]:
    """``{"curve": {...}}`` for the broker's stats when CURVE is on, else ``{}``."""
    return {} if auth is None else {"curve": auth.stats()}


# ------------------------------------------------------------------------ CLI

def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker's CURVE flags (bertpool-broker, bertpool-serve)."""
    g = parser.add_argument_group("CURVE security (off unless --curve-secret-key is given)")
    g.add_argument("--curve-secret-key", metavar="FILE",
                   help="the broker's NAME.key_secret (from bertpool-keys): encrypt and authenticate both "
                        "links with CURVE; needs --curve-allow-clients and --curve-allow-workers")
    g.add_argument("--curve-allow-clients", metavar="DIR",
                   help="directory of the public keys (*.key) of the clients allowed to connect")
    g.add_argument("--curve-allow-workers", metavar="DIR",
                   help="directory of the public keys (*.key) of the workers allowed to register")


def server_config_from_args(args: argparse.Namespace) -> CurveServerConfig | None:
    """CurveServerConfig from the broker's flags; None without --curve-secret-key (ConfigError
    for an allow-list without it, or a key without both allow-lists)."""
    key, clients, workers = args.curve_secret_key, args.curve_allow_clients, args.curve_allow_workers
    if key is None:
        if clients or workers:
            raise ConfigError("--curve-allow-clients/--curve-allow-workers need --curve-secret-key")
        return None
    if not clients or not workers:
        raise ConfigError("--curve-secret-key needs both --curve-allow-clients DIR and "
                          "--curve-allow-workers DIR (who may connect on each link)")
    return CurveServerConfig(key, clients, workers)


def add_client_arguments(parser: argparse.ArgumentParser, own: str = "this client's own") -> None:
    """A connecting peer's CURVE flags (bertpool-worker(s), bertpool-bench)."""
    g = parser.add_argument_group("CURVE security (off unless both flags are given)")
    g.add_argument("--curve-server-key", metavar="FILE",
                   help="the broker's public NAME.key: connect with CURVE (needs --curve-secret-key)")
    g.add_argument("--curve-secret-key", dest="curve_client_secret_key", metavar="FILE",
                   help=f"{own} NAME.key_secret; its NAME.key must be in the broker's "
                        f"allow-list")


def client_config_from_args(args: argparse.Namespace) -> CurveClientConfig | None:
    """CurveClientConfig from --curve-server-key/--curve-secret-key; None when neither is given."""
    server = getattr(args, "curve_server_key", None)
    secret = getattr(args, "curve_client_secret_key", None)
    if server is None and secret is None:
        return None
    if server is None or secret is None:
        raise ConfigError("CURVE needs both --curve-server-key FILE and --curve-secret-key FILE")
    return CurveClientConfig(server_key_file=server, secret_key_file=secret)


def check_key_files(curve: CurveClientConfig | None) -> None:
    """A child process (a worker) gets CURVE keys as file paths, never as key material:
    ConfigError when ``curve`` was built from loaded keys instead of files."""
    if curve is not None and (curve.server_key_file is None or curve.secret_key_file is None):
        raise ConfigError("worker processes need CURVE keys as files (server_key_file, secret_key_file)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """bertpool-serve's extra flags: the key pairs its own workers and its gateway present to its broker."""
    parser.add_argument("--curve-worker-secret-key", dest="curve_client_secret_key", metavar="FILE",
                        help="with --curve-secret-key: the NAME.key_secret this command's workers use; "
                             "its NAME.key must be in --curve-allow-workers")
    parser.add_argument("--curve-gateway-secret-key", metavar="FILE",
                        help="with --curve-secret-key and --gateway-http/--gateway-grpc: the NAME.key_secret "
                             "the gateway connects with; its NAME.key must be in --curve-allow-clients")


def _check_allowed(server: CurveServerConfig, secret_file: str, domain: str, consequence: str) -> None:
    """ConfigError unless the public half of ``secret_file`` is on ``domain``'s allow-list."""
    flag, directory = (("--curve-allow-workers", server.allow_workers_dir) if domain == WORKERS
                       else ("--curve-allow-clients", server.allow_clients_dir))
    if load_key_pair(secret_file)[0] not in server.allowed(domain):
        raise ConfigError(f"{secret_file}: its public key is not in {flag} {directory}, so {consequence}")


def complete_serve_args(args: argparse.Namespace, server: CurveServerConfig | None) -> None:
    """Point bertpool-serve's workers and gateway at its own broker's public key (sets
    ``args.curve_server_key``), and check up front that their keys are on their links' allow-lists
    (ConfigError if not, or if a gateway is asked for without a key)."""
    worker_secret = getattr(args, "curve_client_secret_key", None)
    gateway_secret = getattr(args, "curve_gateway_secret_key", None)
    if server is None:
        for flag, given in (("--curve-worker-secret-key", worker_secret),
                            ("--curve-gateway-secret-key", gateway_secret)):
            if given is not None:
                raise ConfigError(f"{flag} needs --curve-secret-key (the broker's key)")
        args.curve_server_key = None
        return
    if worker_secret is None:
        raise ConfigError("--curve-secret-key needs --curve-worker-secret-key FILE: the key pair this "
                          "command's own workers present (its .key in --curve-allow-workers)")
    gateway = getattr(args, "gateway_http", None) or getattr(args, "gateway_grpc", None)
    if gateway and gateway_secret is None:
        raise ConfigError("with --curve-secret-key, a gateway needs --curve-gateway-secret-key FILE: the key "
                          "pair it connects to the broker with (its .key in --curve-allow-clients)")
    _check_allowed(server, worker_secret, WORKERS, "the workers could never register")
    if gateway_secret is not None:
        _check_allowed(server, gateway_secret, CLIENTS, "the gateway could never connect")
    args.curve_server_key = str(_broker_public_file(server))


def _broker_public_file(server: CurveServerConfig) -> Path:
    """The broker's public key file, beside its secret one (``NAME.key`` for ``NAME.key_secret``),
    for serve's workers and gateway. ConfigError if it is missing or not that key: they used to be
    given the secret file instead, which every peer now refuses (:func:`load_peer_public_key`)."""
    secret = Path(server.secret_key_file)
    stem = secret.name[:-len(SECRET_SUFFIX)] if secret.name.endswith(SECRET_SUFFIX) else secret.stem
    public = secret.with_name(stem + PUBLIC_SUFFIX)
    why = None
    try:
        if load_peer_public_key(public, "the broker's public key file") != server.public_key:
            why = "holds another key"
    except ConfigError as exc:
        why = str(exc)
    if why is not None:
        raise ConfigError(f"serve's workers and gateway connect with the broker's public key, read from "
                          f"{public} beside --curve-secret-key {secret} (bertpool-keys writes both): {why}")
    return public
