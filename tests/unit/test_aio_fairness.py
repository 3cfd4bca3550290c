"""podipc.aio takes turns with the event loop: an endpoint that never has to wait still lets other tasks run."""

from __future__ import annotations

import asyncio
from typing import Any

from podipc.aio.endpoints import AsyncConsumer, AsyncProducer

MESSAGES = 20000


class AlwaysReady:
    """A stand-in sync endpoint whose every attempt succeeds at once: a channel with messages always waiting."""

    _contract = True
    closed = False

    def __init__(self) -> None:
        self.attempts = 0

    def try_recv(self) -> bytes:
        self.attempts += 1
        return b"m"

    def try_send(self, data: Any) -> bool:
        self.attempts += 1
        return True

    def _flush_now(self) -> bool:
        return True


def turns_of_another_task_while(work: Any) -> int:
    """How often a second task ran while `work()` (a coroutine function) ran to its end."""

    async def main() -> int:
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        task = asyncio.ensure_future(other())
        await asyncio.sleep(0)  # let it start
        started = turns
        await work()
        task.cancel()
        return turns - started

    return asyncio.run(main())


def test_a_consumer_whose_messages_are_always_waiting_still_lets_other_tasks_run() -> None:
    inbox = AsyncConsumer(AlwaysReady())  # type: ignore[arg-type]

    async def consume() -> None:
        for _ in range(MESSAGES):
            await inbox.recv()

    assert turns_of_another_task_while(consume) > 0
    assert inbox._sync.attempts == MESSAGES  # type: ignore[attr-defined]  # and every attempt took one message


def test_a_producer_that_never_waits_for_room_still_lets_other_tasks_run() -> None:
    out = AsyncProducer(AlwaysReady())  # type: ignore[arg-type]

    async def produce() -> None:
        for _ in range(MESSAGES):
            await out.send(b"m")

    assert turns_of_another_task_while(produce) > 0
