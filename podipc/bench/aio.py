"""The client's loops of a cell for asyncio subjects (`--api async`): ping, drain, idle, in one event loop.

The same loops as podipc.bench.workloads, awaited; each cell runs in its own
`asyncio.run()`. While the stream drains, a 1 ms ticker task runs in the same loop and
records how late each tick came: a consumer that never yields to the loop shows as lag
(issue 12: "an asyncio loop consuming at full rate keeps a 1 ms ticker's lag p99 under
5 ms"). The report also says how each asyncio receiver waits: on a readiness descriptor
the loop watches, or through podipc.aio's helper thread (channels without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from podipc.bench.stats import SEQUENCE, SEQUENCE_SIZE, SequenceChecker, cpu_seconds, percentile
from podipc.bench.subjects import AsyncReceiver, AsyncSender
from podipc.bench.workloads import FIRST_MESSAGE_WAIT_SECONDS, LOSSY_QUIET_SECONDS_AT_END, WARMUP_ROUND_TRIPS, Effort
from podipc.errors import EndOfStream

TICK_SECONDS = 0.001
"""The ticker's period: one tick per millisecond."""


class Ticker:
    """A task that sleeps TICK_SECONDS at a time and records how late it woke, while `measuring` is set."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.measuring = False
        self.measured_since = 0.0
        self._due: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking in the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._tick())

    def measure(self) -> None:
        """Count lags from now on."""
        self.measuring = True
        self.measured_since = time.monotonic()

    async def _tick(self) -> None:
        clock = time.monotonic
        while True:
            self._due = clock() + TICK_SECONDS
            await asyncio.sleep(TICK_SECONDS)
            if self.measuring:
                self.lags.append(clock() - self._due)

    async def stop(self) -> dict[str, Any]:
        """Stop; the summary (a tick that was due and never ran counts with its lag so far)."""
        now = time.monotonic()
        if self.measuring and self._due is not None and now > self._due:
            self.lags.append(now - self._due)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.summary(now - self.measured_since if self.measuring else 0.0)

    def summary(self, seconds: float) -> dict[str, Any]:
        """Ticks and their lag percentiles in milliseconds over `seconds` of measuring."""
        ordered = sorted(max(lag, 0.0) for lag in self.lags)
        lag_ms = [round(percentile(ordered, p) * 1000.0, 3) if ordered else None for p in (50.0, 99.0, 100.0)]
        return {
            "interval_ms": TICK_SECONDS * 1000.0,
            "seconds": round(seconds, 4),
            "ticks": len(ordered),
            "lag_p50_ms": lag_ms[0],
            "lag_p99_ms": lag_ms[1],
            "lag_max_ms": lag_ms[2],
        }


async def ping(
    sender: AsyncSender, receiver: AsyncReceiver, size: int, seconds: float, max_round_trips: int
) -> tuple[list[int], int, Effort]:
    """Round trips of `size`-byte messages for `seconds` (after a warm-up): samples in ns, lost count, effort."""
    payload = bytearray(size)
    send, recv = sender.send, receiver.recv
    clock = time.perf_counter_ns
    lost = 0
    for _ in range(WARMUP_ROUND_TRIPS):
        await send(payload)
        try:
            await recv()
        except TimeoutError:
            lost += 1
    samples: list[int] = []
    append = samples.append
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    end = clock() + int(seconds * 1e9)
    for _ in range(max_round_trips):
        start = clock()
        await send(payload)
        try:
            await recv()
        except TimeoutError:
            lost += 1
            continue
        stop = clock()
        append(stop - start)
        if stop > end:
            break
    return samples, lost, Effort.since(wall_start, cpu_start)


async def drain(
    receiver: AsyncReceiver, checker: SequenceChecker, numbered: bool, lossy: bool, ticker: Ticker
) -> tuple[float, Effort]:
    """Receive until the end of stream, checking sequence numbers: seconds from first to last message, effort."""
    recv = receiver.recv
    first_wait = time.monotonic() + FIRST_MESSAGE_WAIT_SECONDS
    while True:
        try:
            message = await recv()
            break
        except EndOfStream:
            return 0.0, Effort(0.0, 0.0)
        except TimeoutError:
            if not lossy or time.monotonic() > first_wait:
                raise
    ticker.measure()
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    add, unpack = checker.add, SEQUENCE.unpack_from
    add(unpack(message)[0] if numbered else checker.expected)
    last = wall_start
    try:
        while True:
            try:
                message = await recv()
            except TimeoutError:
                if not lossy:
                    raise
                if clock() - last >= LOSSY_QUIET_SECONDS_AT_END:
                    break
                continue
            last = clock()
            add(unpack(message)[0] if numbered else checker.expected)
    except EndOfStream:
        last = last if lossy else clock()
    return last - wall_start, Effort.since(wall_start, cpu_start)


async def idle(receiver: AsyncReceiver, seconds: float) -> Effort:
    """Wait `seconds` on an empty link in the loop: the CPU a waiting asyncio receiver burns."""
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    await receiver.idle(seconds)
    return Effort.since(wall_start, cpu_start)


async def measure_latency(
    sender: AsyncSender, receiver: AsyncReceiver, size: int, seconds: float, max_count: int, idle_seconds: float
) -> dict[str, Any]:
    """Idle probe (when planned), ping-pong, then end both streams; how the receiver waits."""
    idle_effort = await idle(receiver, idle_seconds) if idle_seconds > 0 else None
    samples, lost, effort = await ping(sender, receiver, size, seconds, max_count)
    wakeup = receiver.wakeup()
    await sender.close()
    with contextlib.suppress(EndOfStream, TimeoutError):
        while True:
            await receiver.recv()
    await receiver.close()
    return {"samples": samples, "lost": lost, "effort": effort, "idle": idle_effort, "wakeup": wakeup}


async def measure_throughput(receiver: AsyncReceiver, size: int, lossy: bool) -> dict[str, Any]:
    """Count the stream at the asyncio consumer while the ticker runs beside it."""
    checker = SequenceChecker()
    ticker = Ticker()
    ticker.start()
    try:
        seconds, effort = await drain(receiver, checker, size >= SEQUENCE_SIZE, lossy, ticker)
        wakeup = receiver.wakeup()
    finally:
        ticked = await ticker.stop()
        await receiver.close()
    return {"checker": checker, "seconds": seconds, "effort": effort, "ticker": ticked, "wakeup": wakeup}
