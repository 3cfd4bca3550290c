"""podipc.aio.client across processes: many tasks in flight over one connection to a server process."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest

import podipc
import podipc.aio
from tests.integration.harness import url_for
from tests.integration.test_rpc import ServerProcess


@pytest.fixture
def served_url() -> Iterator[tuple[str, ServerProcess]]:
    """A server process with 8 workers on a fresh unix://@name URL."""
    url = url_for("unix-abstract")
    server = ServerProcess(url, workers=8)
    try:
        yield url, server
    finally:
        server.kill()


def test_100_concurrent_calls_with_some_cancelled_at_random_the_others_all_correct(
    served_url: tuple[str, ServerProcess],
) -> None:
    url, server = served_url

    async def scenario() -> tuple[list[object], set[int]]:
        draw = random.Random(14)
        async with podipc.aio.client(url, wait=10) as client:
            tasks = [
                asyncio.create_task(client.call(b"sleep:0.%d:%d" % (draw.randint(1, 4), index), timeout=30))
                for index in range(100)
            ]
            await asyncio.sleep(0.05)
            cancelled = set(draw.sample(range(100), 25))
            for index in cancelled:
                tasks[index].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert await client.call(b"after", timeout=10) == b"after"
            return results, cancelled

    results, cancelled = asyncio.run(scenario())
    for index, result in enumerate(results):
        if index in cancelled:
            assert isinstance(result, asyncio.CancelledError), (index, result)
        else:
            assert isinstance(result, bytes) and result.endswith(b":%d" % index), (index, result)
    served = server.stop()  # a task cancelled before its turn to write sent nothing; the rest were all served
    assert 100 - len(cancelled) + 1 <= served["calls"] == served["replied"] <= 101


def test_a_task_timeout_fails_that_call_only(served_url: tuple[str, ServerProcess]) -> None:
    url, _ = served_url

    async def scenario() -> None:
        async with podipc.aio.client(url, wait=10) as client:
            others = [asyncio.create_task(client.call(b"sleep:0.4:%d" % n, timeout=10)) for n in range(3)]
            with pytest.raises(podipc.Timeout):
                await client.call(b"sleep:1", timeout=0.2)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await client.call(b"sleep:1")
            assert await asyncio.gather(*others) == [b"sleep:0.4:%d" % n for n in range(3)]

    asyncio.run(scenario())


def test_every_task_in_flight_gets_peer_gone_within_2_s_when_the_server_is_killed_and_the_next_call_reconnects(
    served_url: tuple[str, ServerProcess],
) -> None:
    url, server = served_url
    restarted: list[ServerProcess] = []

    async def scenario() -> list[object]:
        async with podipc.aio.client(url, wait=10) as client:
            assert await client.call(b"up", timeout=5) == b"up"
            calls = [asyncio.create_task(client.call(b"sleep:30", timeout=60)) for _ in range(5)]
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(2.0):
                results = await asyncio.gather(*calls, return_exceptions=True)
            with pytest.raises(podipc.Timeout):
                await client.call(b"nobody there", timeout=0.3)
            later = asyncio.create_task(client.call(b"back", timeout=20))
            await asyncio.sleep(0.3)
            restarted.append(await asyncio.to_thread(ServerProcess, url, 1))
            assert await later == b"back"
            return results

    try:
        results = asyncio.run(scenario())
    finally:
        for process in restarted:
            process.kill()
    assert all(isinstance(result, podipc.PeerGone) for result in results), results


def test_close_from_another_thread_wakes_every_waiting_task_with_channel_closed(
    served_url: tuple[str, ServerProcess],
) -> None:
    url, _ = served_url

    async def scenario() -> list[object]:
        client = podipc.aio.client(url, wait=10)
        assert await client.call(b"up", timeout=5) == b"up"
        calls = [asyncio.create_task(client.call(b"sleep:30")) for _ in range(3)]
        await asyncio.sleep(0.2)
        threading.Timer(0.1, client.close).start()
        started = time.monotonic()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - started < 1.0
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(result, podipc.ChannelClosed) for result in results), results


def test_an_async_client_with_no_server_raises_peer_timeout() -> None:
    async def scenario() -> None:
        async with podipc.aio.client(url_for("unix-abstract"), wait=0.3) as client:
            with pytest.raises(podipc.PeerTimeout, match="no server listening"):
                await client.call(b"anyone?")

    asyncio.run(scenario())
