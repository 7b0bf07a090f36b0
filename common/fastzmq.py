"""Lean non-blocking multipart send and receive for the per-request paths.

pyzmq's ``send_multipart``/``recv_multipart`` are Python loops over the sugar
``Socket.send``/``recv``/``getsockopt``, which re-check every frame's type and
build enum flags on every call. On the broker's and the worker's hot paths
(about ten frames a request each way) that Python overhead was most of the
cost of moving a message. These helpers call the Cython socket methods
directly with plain int flags; what goes on the wire, and which exceptions
come out, are the same as ``send_multipart(frames, NOBLOCK)`` and
``recv_multipart(NOBLOCK)`` (``zmq.Again`` when nothing can be sent or read,
``zmq.ZMQError`` otherwise). Frames must be ``bytes`` (or buffers).

Also here: :func:`open_monitor` and :func:`close_monitored`, the socket monitor
the client and the worker keep on their link to the broker (connections and
handshakes), opened and closed the same way by both; and :func:`out_of_files`,
which says what ZeroMQ never reports: that the process has no file descriptor
left, so its I/O thread can neither accept nor open a connection (it retries in
silence, and an accepting one in a busy loop).
"""

from __future__ import annotations

import errno
import os
import uuid

try:
    import resource  # POSIX; imported now, as out of file descriptors no module can be read
except ImportError:  # pragma: no cover (Windows)
    resource = None

import zmq
from zmq.backend import Socket as _CSocket

_send = _CSocket.send
_recv = _CSocket.recv
_get = _CSocket.get
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_nowait(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send one multipart message without blocking (as ``send_multipart(frames, zmq.NOBLOCK)``).

    ZeroMQ queues a multipart message atomically: once the first frame is taken the rest are too,
    so a ``zmq.Again`` (or EHOSTUNREACH) can only come from the first frame."""
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], _MORE_NOBLOCK)
    _send(sock, frames[last], _NOBLOCK)


def recv_nowait(sock: zmq.Socket) -> list[bytes]:
    """Receive one whole multipart message without blocking; ``zmq.Again`` when none waits.

    Each frame is read as a Frame, whose ``more`` flag is one C call, instead of asking the socket
    for RCVMORE (pyzmq builds an enum per getsockopt); ``bytes`` then copies it out as recv() would."""
    frame = _recv(sock, _NOBLOCK, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


def more_waiting(sock: zmq.Socket) -> bool:
    """Whether a whole message waits to be read (ZMQ_EVENTS has POLLIN).

    After the first message of a wake-up, asking is cheaper than the recv that would raise Again:
    about 5 us against 17 on a lone request's path, where the code of both is cold (1.5 against
    3.7 warm). A burst pays one question more; a lone message, the common case at low load, one
    exception less."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def recv_many(sock: zmq.Socket, limit: int) -> list[list[bytes]]:
    """Receive up to ``limit`` waiting messages without blocking (``[]`` when none waits). The bound
    keeps one busy socket from starving whatever else the caller serves (heartbeats, replies)."""
    messages = []
    try:
        for _ in range(limit):
            messages.append(recv_nowait(sock))
            if len(messages) == 1 and not more_waiting(sock):
                break  # a lone message: no recv that raises Again (see more_waiting)
    except zmq.Again:
        pass
    return messages


def open_monitor(sock: zmq.Socket, events: int, name: str) -> zmq.Socket:
    """A PAIR socket receiving ``sock``'s monitor ``events`` (call it before ``sock`` connects, so
    none is missed). Its inproc address is ``name`` plus a random part: unique however often a
    link is reopened (pyzmq's get_monitor_socket names it by file descriptor, which is reused).

    It never fills: libzmq sends each event with a blocking send from the thread that saw it, so
    a full monitor (1,000-odd events unread: a link flapping while its owner sits idle) stopped the
    context's I/O thread, and every socket of the process with it. Its owner reads it when it next
    uses the link (the Client also while idle: see its _io_main)."""
    address = f"inproc://{name}-monitor-{uuid.uuid4().hex}"
    sock.monitor(address, events)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.setsockopt(zmq.RCVHWM, 0)  # before connect: an inproc pipe's bound is set then (0: none)
    monitor.connect(address)
    return monitor


def close_monitored(sock: zmq.Socket, monitor: zmq.Socket, linger_ms: int) -> None:
    """Close ``sock`` (giving what it still queues ``linger_ms``) and its :func:`open_monitor`."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    sock.close(linger=linger_ms)
    monitor.close(linger=0)


def out_of_files(headroom: int = 0) -> str | None:
    """None while this process can open ``headroom`` + 1 more files; else why it cannot, for a
    message (its open-file limit, or the system's file table). With ``headroom`` 0: one open() and
    close(), cheap enough to ask once a second. A process at its limit can have a few descriptors
    free a moment later (its ZeroMQ I/O threads open and close one per connection attempt), so
    whoever explains a failure that already happened asks with some headroom: that also counts the
    open descriptors (Linux's /proc/self/fd; without it, only the probe is asked)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as exc:
        return files_exhausted(exc.errno)
    os.close(fd)
    if headroom <= 0 or resource is None:
        return None
    try:
        open_now = len(os.listdir("/proc/self/fd"))  # counts the listing's own descriptor too
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except OSError as exc:
        return files_exhausted(exc.errno)  # EMFILE while listing: out of them after all
    except ValueError:  # pragma: no cover (a limit that is not an int)
        return None
    if soft_limit != resource.RLIM_INFINITY and open_now + headroom >= soft_limit:
        return files_exhausted(errno.EMFILE)
    return None


def files_exhausted(code: int | None) -> str | None:
    """Why a call failed with errno ``code``, when it is EMFILE or ENFILE (else None): what to raise."""
    if code == errno.ENFILE:
        return "the system's open-file table is full (raise fs.file-max)"
    if code != errno.EMFILE:
        return None
    try:
        limit = f" of {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} file descriptors" if resource else ""
    except (OSError, ValueError):
        limit = ""
    return f"this process reached its open-file limit{limit}: raise ulimit -n (systemd: LimitNOFILE=)"
