"""The Client from asyncio (the README's pattern: ``await asyncio.wrap_future(client.submit(...))``),
and the README's client examples run as written against a live echo pool."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bertpool.clients.client import Client, Prediction
from bertpool.common.errors import ClientClosed

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0  # bound on any one await in these tests (they end far sooner)


@pytest.fixture
def slow_pool(start_pool):
    """An echo pool whose every batch takes 50 ms: requests stay in flight long enough to watch."""
    return start_pool("--backend", "echo", "--echo-delay-ms", "50", parallel=2)


def test_a_hundred_awaits_in_flight_do_not_block_the_loop(slow_pool):
    """A heartbeat coroutine keeps ticking while 100 requests wait: it sees some but not all of them
    answered, which only happens if the loop ran it between replies (nothing blocked the loop)."""
    async def main(client: Client) -> tuple[list, list[int]]:
        answered: list[int] = []
        seen_at_ticks: list[int] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            while not stop.is_set():
                seen_at_ticks.append(len(answered))
                await asyncio.sleep(0.001)

        async def one(i: int) -> Prediction:
            result = await asyncio.wrap_future(client.submit("a", f"pair {i}", timeout_s=WAIT_S))
            answered.append(i)
            return result

        ticker = asyncio.create_task(heartbeat())
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), WAIT_S)
        stop.set()
        await ticker
        return results, seen_at_ticks

    with Client(slow_pool.address, timeout_s=WAIT_S) as client:
        results, seen = asyncio.run(main(client))
    assert [r.id for r in results] == sorted((r.id for r in results), key=lambda rid: int(rid.rsplit("-", 1)[1]))
    assert all(isinstance(r, Prediction) and r.label in (0, 1) for r in results)
    assert any(0 < n < 100 for n in seen), "the heartbeat never ran while requests were in flight"


def test_cancelling_an_awaiting_task_leaves_the_client_serving(slow_pool):
    """Cancelled awaits (wait_for timing out, a caller gone) detach their request; the Client goes on
    serving the others and later ones, and counts no error."""
    async def main(client: Client) -> tuple[list, list]:
        futures = [client.submit("doomed", str(i), timeout_s=WAIT_S) for i in range(20)]
        tasks = [asyncio.ensure_future(asyncio.wrap_future(f)) for f in futures]
        kept = [asyncio.wrap_future(client.submit("kept", str(i), timeout_s=WAIT_S)) for i in range(20)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert all(f.cancelled() for f in futures)  # the concurrent Futures too: their answers are dropped
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(client.submit("x", "y", timeout_s=WAIT_S)), 0.001)
        return await asyncio.gather(*kept), await asyncio.gather(
            *(asyncio.wrap_future(client.submit("after", str(i))) for i in range(20)))

    with Client(slow_pool.address, timeout_s=WAIT_S) as client:
        kept, after = asyncio.run(main(client))
        assert len(kept) == len(after) == 20
        assert client.predict("still", "serving").label in (0, 1)
        counters = client.counters
    assert counters.malformed_replies == counters.unknown_replies == counters.reconnects == 0


def test_predict_in_a_coroutine_answers_but_holds_the_loop(slow_pool):
    """As documented: predict() in the loop's thread works (no deadlock, even with awaits of the same
    Client pending) but blocks the loop for its round trip; the awaited way lets it run."""
    async def main(client: Client) -> tuple[Prediction, int, Prediction, int]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.01)
        others = [asyncio.wrap_future(client.submit("other", str(i))) for i in range(10)]
        before = ticks
        blocking = client.predict("in the", "loop thread")  # 50 ms of echo delay, the loop held
        held = ticks - before
        before = ticks
        awaited = await asyncio.wrap_future(client.submit("awaited", "instead"))
        free = ticks - before
        await asyncio.wait_for(asyncio.gather(*others), WAIT_S)
        stop.set()
        await ticker
        return blocking, held, awaited, free

    with Client(slow_pool.address, timeout_s=WAIT_S) as client:
        blocking, held, awaited, free = asyncio.run(main(client))
    assert blocking.label in (0, 1) and awaited.label in (0, 1)
    assert held == 0, "predict() is documented to hold the loop"
    assert free > 0, "an awaited submit() let the loop run"


def test_an_await_on_a_client_closed_meanwhile_raises_client_closed(slow_pool):
    async def main(client: Client) -> list:
        waits = [asyncio.wrap_future(client.submit("a", str(i), timeout_s=WAIT_S)) for i in range(10)]
        await asyncio.get_running_loop().run_in_executor(None, client.close)  # close() joins a thread
        outcomes = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), WAIT_S)
        with pytest.raises(ClientClosed, match="create a new Client"):
            client.submit("after", "close")
        return outcomes

    client = Client(slow_pool.address, timeout_s=WAIT_S)
    outcomes = asyncio.run(main(client))
    assert all(isinstance(o, (Prediction, ClientClosed)) for o in outcomes), outcomes


def readme_client_examples() -> list[str]:
    """The python blocks of the README's "Client library" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Client library\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_client_examples_run_as_written(start_pool, tmp_path):
    """Each example, with only the address changed, runs to completion against a live echo pool."""
    pool = start_pool("--backend", "echo", parallel=1)
    examples = readme_client_examples()
    assert len(examples) >= 2 and any("wrap_future" in e for e in examples)
    for example in examples:
        assert "tcp://127.0.0.1:5555" in example
        proc = subprocess.run([sys.executable, "-c", example.replace("tcp://127.0.0.1:5555", pool.address)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, f"{example}\n{proc.stderr}"
        assert "failed" not in proc.stdout, proc.stdout
