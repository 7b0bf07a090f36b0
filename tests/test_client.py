"""Client library: futures, timeouts, BUSY, ERROR, thread safety, closing."""

from __future__ import annotations

import threading

import pytest

from bertpool.broker.broker import Broker, BrokerConfig
from bertpool.clients.client import Client, Prediction
from bertpool.common.errors import ClientClosed, ConfigError, RemoteError, RequestTimeout, ServerBusy


@pytest.fixture
def bare_broker(tmp_path):
    """A broker with no workers: requests queue until they time out or hit BUSY."""
    b = Broker(BrokerConfig(frontend=f"ipc://{tmp_path}/f", backend=f"ipc://{tmp_path}/b", max_queue=3))
    b.bind()
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    yield b
    b.stop()
    t.join(5)


def test_timeout_raises_typed_error(bare_broker):
    with Client(bare_broker.config.frontend, timeout_s=0.2) as client:
        with pytest.raises(RequestTimeout):
            client.predict("nobody", "answers")
        with pytest.raises(TimeoutError):  # also a builtin TimeoutError
            client.submit("a", "b", timeout_s=0.05).result()


def test_busy_raises_server_busy(bare_broker):
    with Client(bare_broker.config.frontend, timeout_s=2) as client:
        futures = [client.submit("a", str(i)) for i in range(4)]
        with pytest.raises(ServerBusy):
            futures[3].result()
        with pytest.raises(RequestTimeout):
            futures[0].result()


def test_close_fails_pending_requests(bare_broker):
    client = Client(bare_broker.config.frontend, timeout_s=30)
    future = client.submit("a", "b")
    client.close()
    with pytest.raises(ClientClosed):
        future.result(timeout=5)
    with pytest.raises(ClientClosed):
        client.submit("a", "b")
    client.close()  # idempotent


def test_stats(bare_broker):
    with Client(bare_broker.config.frontend) as client:
        stats = client.stats()
    assert stats["workers"] == {} and "broker" in stats


@pytest.mark.parametrize("kwargs", [{"address": "localhost:5555"}, {"timeout_s": 0}, {"max_in_flight": 0}])
def test_bad_client_config(kwargs):
    with pytest.raises(ConfigError):
        Client(**{"address": "tcp://127.0.0.1:5555", **kwargs})


def test_non_string_text_is_a_type_error(bare_broker):
    with Client(bare_broker.config.frontend) as client, pytest.raises(TypeError):
        client.submit(b"bytes", "b")


def test_many_threads_share_one_client(start_pool):
    pool = start_pool("--backend", "echo", "--batch-timeout-ms", "1", parallel=2)
    results: dict[int, list[Prediction]] = {}
    with Client(pool.address, timeout_s=30) as client:
        def work(t: int) -> None:
            results[t] = client.predict_many([(f"thread {t}", f"item {i}") for i in range(25)],
                                             max_in_flight=5)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8))
    assert all(len(r) == 25 for r in results.values())
    ids = [p.id for r in results.values() for p in r]
    assert len(set(ids)) == len(ids)


def test_error_reply_raises_remote_error(start_pool):
    pool = start_pool("--backend", "echo", parallel=1)
    with Client(pool.address, timeout_s=10) as client:
        with pytest.raises(RemoteError) as err:
            client.predict("   ", "empty a")
    assert err.value.code == "bad_text"
