"""The lean send/receive helpers move the same messages as pyzmq's multipart calls; the monitor
helpers report a link's events, however often it is reopened."""

from __future__ import annotations

import pytest
import zmq

from bertpool.common import fastzmq
from bertpool.common.fastzmq import close_monitored, open_monitor, recv_many, recv_nowait, send_nowait

WAIT_MS = 10_000


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("inproc://fastzmq")
    dealer.connect("inproc://fastzmq")
    yield router, dealer
    ctx.destroy(linger=0)


@pytest.mark.parametrize("frames", [[b"one"], [b"BP3", b"\x01", b"t" * 8, b"", b"x" * 100_000]])
def test_round_trip_matches_send_and_recv_multipart(pair, frames):
    router, dealer = pair
    send_nowait(dealer, frames)
    assert router.poll(WAIT_MS)
    identity, *got = recv_nowait(router)
    assert got == frames
    send_nowait(router, [identity, *frames])
    assert dealer.poll(WAIT_MS) and dealer.recv_multipart() == frames


def test_nothing_waiting_raises_again_and_recv_many_is_bounded(pair):
    router, dealer = pair
    with pytest.raises(zmq.Again):
        recv_nowait(router)
    assert recv_many(router, 10) == []
    for i in range(5):
        dealer.send_multipart([b"m", str(i).encode()])
    assert router.poll(WAIT_MS)
    got = []
    while len(got) < 5:
        assert router.poll(WAIT_MS)
        batch = recv_many(router, 2)
        assert 1 <= len(batch) <= 2  # never more than asked
        got += batch
    assert [m[2] for m in got] == [b"0", b"1", b"2", b"3", b"4"]


def test_a_lone_message_is_read_without_a_recv_that_raises_again(pair, monkeypatch):
    """After a wake-up's first message, recv_many asks ZMQ_EVENTS whether more wait instead of trying
    a recv that raises Again (17 us against 5 on a lone request's path, cold); a burst is still read
    whole, each message once."""
    router, dealer = pair
    calls = []
    real_recv = fastzmq._recv

    def counting_recv(sock, flags, copy):
        calls.append(1)
        return real_recv(sock, flags, copy)

    monkeypatch.setattr(fastzmq, "_recv", counting_recv)
    dealer.send_multipart([b"lone", b"message"])
    assert router.poll(WAIT_MS)
    got = recv_many(router, 256)
    assert len(got) == 1 and got[0][1:] == [b"lone", b"message"]
    assert len(calls) == 3  # the identity and two frames: no fourth recv, to raise Again
    for i in range(3):
        dealer.send_multipart([b"m", str(i).encode()])
    got = []
    for _ in range(3):  # at least one message a turn
        if len(got) == 3:
            break
        assert router.poll(WAIT_MS)
        got += recv_many(router, 256)
    assert [m[2] for m in got] == [b"0", b"1", b"2"]


def test_unroutable_send_raises_like_send_multipart(pair):
    router, _ = pair
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    with pytest.raises(zmq.ZMQError):
        send_nowait(router, [b"nobody", b"BP3", b"x"])


def test_a_link_reopened_gets_its_own_monitor_each_time(tmp_path):
    """Each open_monitor reports its own socket's connection, also right after a close_monitored (a
    reused address would collide with the one being torn down)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    address = f"ipc://{tmp_path}/router"
    router.bind(address)
    try:
        for _ in range(3):
            dealer = ctx.socket(zmq.DEALER)
            monitor = open_monitor(dealer, zmq.EVENT_CONNECTED, "test")
            dealer.connect(address)
            assert monitor.poll(WAIT_MS)
            assert int.from_bytes(monitor.recv_multipart()[0][:2], "little") == zmq.EVENT_CONNECTED
            close_monitored(dealer, monitor, linger_ms=0)
            assert dealer.closed and monitor.closed
    finally:
        ctx.destroy(linger=0)
