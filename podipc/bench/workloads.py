"""The loops of a bench cell, the same for every subject: ping, echo, stream, drain, idle (and batches).

Each loop takes a Sender and/or Receiver (podipc.bench.subjects) and hoists every
lookup out of its hot path, so a podipc channel and its raw peer are driven by the
very same bytecode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from podipc.bench.numbering import NumberedBatch
from podipc.bench.stats import SEQUENCE, SEQUENCE_SIZE, SequenceChecker, cpu_seconds
from podipc.bench.subjects import BatchReceiver, BatchSender, Buffer, Receiver, Sender
from podipc.errors import EndOfStream

T = TypeVar("T")
WARMUP_ROUND_TRIPS = 20
CLOCK_CHECK_EVERY = 16
"""Streaming checks the clock once every this many messages."""
FIRST_MESSAGE_WAIT_SECONDS = 15.0
LOSSY_QUIET_SECONDS_AT_END = 0.5
LOSSY_ECHO_GIVE_UP_TIMEOUTS = 40


@dataclass
class Effort:
    """Wall and CPU seconds one side spent on a loop."""

    wall: float
    cpu: float

    @classmethod
    def since(cls, wall_start: float, cpu_start: float) -> Effort:
        """Effort from the given starting readings until now."""
        return cls(time.perf_counter() - wall_start, cpu_seconds() - cpu_start)


def ping(
    sender: Sender, receiver: Receiver, size: int, seconds: float, max_round_trips: int
) -> tuple[list[int], int, Effort]:
    """Round trips of `size`-byte messages for `seconds` (after a warm-up): samples in ns, lost count, effort."""
    payload = bytearray(size)
    send, recv = sender.send, receiver.recv
    clock = time.perf_counter_ns
    lost = 0
    for _ in range(WARMUP_ROUND_TRIPS):
        send(payload)
        try:
            recv()
        except TimeoutError:
            lost += 1
    samples: list[int] = []
    append = samples.append
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    end = clock() + int(seconds * 1e9)
    for _ in range(max_round_trips):
        start = clock()
        send(payload)
        try:
            recv()
        except TimeoutError:
            lost += 1
            continue
        stop = clock()
        append(stop - start)
        if stop > end:
            break
    return samples, lost, Effort.since(wall_start, cpu_start)


def echo(receiver: Receiver, sender: Sender, lossy: bool) -> tuple[int, Effort]:
    """Send back every message until the end of stream, then close both ends: echoed count, effort."""
    recv, send = receiver.recv, sender.send
    count = 0
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    quiet = 0
    while True:
        try:
            message = recv()
        except EndOfStream:
            break
        except TimeoutError:
            if not lossy:
                raise
            quiet += 1
            if quiet >= LOSSY_ECHO_GIVE_UP_TIMEOUTS:
                break
            continue
        quiet = 0
        send(message)
        count += 1
    effort = Effort.since(wall_start, cpu_start)
    # close our receiving end first: a peer whose close waits for ours (stream sockets, iceoryx2) may go on
    receiver.close()
    sender.close()
    return count, effort


def stream(sender: Sender, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
    """Send numbered `size`-byte messages for `seconds` (at most `max_messages`), then close: sent, effort."""
    buffer = bytearray(size)
    numbered = size >= SEQUENCE_SIZE
    pack_into, send = SEQUENCE.pack_into, sender.send
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    send(buffer)  # message 0 waits for the consumer; the measured time starts once it is there
    sent = 1
    end = clock() + seconds
    while sent < max_messages:
        batch = min(CLOCK_CHECK_EVERY, max_messages - sent)
        if numbered:
            for sequence in range(sent, sent + batch):
                pack_into(buffer, 0, sequence)
                send(buffer)
        else:
            for _ in range(batch):
                send(buffer)
        sent += batch
        if clock() >= end:
            break
    sender.close()
    return sent, Effort.since(wall_start, cpu_start)


def first_message(receive: Callable[[], T], lossy: bool) -> T | None:
    """The first receive of a stream (None: it ended at once); a lossy link may time out for a while first."""
    first_wait = time.monotonic() + FIRST_MESSAGE_WAIT_SECONDS
    while True:
        try:
            return receive()
        except EndOfStream:
            return None
        except TimeoutError:
            if not lossy or time.monotonic() > first_wait:
                raise


def drain(receiver: Receiver, checker: SequenceChecker, numbered: bool, lossy: bool) -> tuple[float, Effort]:
    """Receive until the end of stream, checking sequence numbers: seconds from first to last message, effort."""
    recv = receiver.recv
    message = first_message(recv, lossy)
    if message is None:
        return 0.0, Effort(0.0, 0.0)
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    add, unpack = checker.add, SEQUENCE.unpack_from
    if not numbered:
        add(checker.expected)
    else:
        add(unpack(message)[0])
    last = wall_start
    try:
        if lossy:
            last = _drain_lossy(recv, add, unpack, numbered, checker)
        elif numbered:
            while True:
                add(unpack(recv())[0])
        else:
            while True:
                recv()
                add(checker.expected)
    except EndOfStream:
        last = clock() if not lossy else last
    return last - wall_start, Effort.since(wall_start, cpu_start)


def _drain_lossy(recv, add, unpack, numbered, checker) -> float:  # type: ignore[no-untyped-def]
    """Drain a lossy link: stop at the end marker or after LOSSY_QUIET_SECONDS_AT_END of silence."""
    clock = time.perf_counter
    last = clock()
    while True:
        try:
            message = recv()
        except TimeoutError:
            if clock() - last >= LOSSY_QUIET_SECONDS_AT_END:
                return last
            continue
        except EndOfStream:
            return last
        last = clock()
        add(unpack(message)[0] if numbered else checker.expected)


def idle(receiver: Receiver, seconds: float) -> Effort:
    """Wait `seconds` on an empty link: the CPU a waiting receiver burns."""
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    receiver.idle(seconds)
    return Effort.since(wall_start, cpu_start)


# --- batches: send_many / recv_many --------------------------------------------------------

JOIN_CHECK_MAX_SIZE = 4096
"""Batches of messages up to this size have their sequence numbers checked in one pass over the joined bytes."""


def stream_batches(sender: BatchSender, size: int, seconds: float, max_messages: int, batch: int) -> tuple[int, Effort]:
    """stream(), `batch` numbered messages per send_many call: sent, effort."""
    numbered = NumberedBatch(size, batch)
    number, send_many = numbered.number, sender.send_many
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    sender.send(number(0, 1)[0])  # message 0 waits for the consumer
    sent = 1
    end = clock() + seconds
    while sent < max_messages:
        # batches start at multiples of `batch` (the first one is a message short): numbered by byte planes
        count = min(batch - sent % batch, max_messages - sent)
        send_many(number(sent, count))
        sent += count
        if clock() >= end:
            break
    sender.close()
    return sent, Effort.since(wall_start, cpu_start)


_expected_batches: dict[tuple[int, int], NumberedBatch] = {}


def _expected_batch(size: int, count: int) -> NumberedBatch:
    """The receiver's own NumberedBatch of `count` messages of `size` bytes, what a batch from the sender holds."""
    expected = _expected_batches.get((size, count))
    if expected is None:
        if len(_expected_batches) > 8:
            _expected_batches.clear()
        expected = _expected_batches[size, count] = NumberedBatch(size, count)
    return expected


def check_batch(checker: SequenceChecker, messages: Sequence[Buffer], size: int) -> None:
    """Account for a batch: in one pass when it is the next run of numbers, else message by message."""
    count = len(messages)
    if count > 1 and size <= JOIN_CHECK_MAX_SIZE and size % SEQUENCE_SIZE == 0:
        joined = b"".join(messages)
        expected = _expected_batch(size, count).holds(checker.expected)
        if expected is not None and joined == expected:  # every byte as sent: numbers and the zeros after them
            checker.add_run(count)
            return
        if len(joined) == count * size:
            numbers = memoryview(joined).cast("Q")[:: size // SEQUENCE_SIZE]
            first = checker.expected
            if numbers[0] == first and numbers.tolist() == list(range(first, first + count)):
                checker.add_run(count)
                return
    add, unpack = checker.add, SEQUENCE.unpack_from
    for message in messages:
        add(unpack(message)[0])


def drain_batches(
    receiver: BatchReceiver, checker: SequenceChecker, size: int, batch: int, lossy: bool
) -> tuple[float, Effort]:
    """drain(), up to `batch` messages per recv_many call: seconds from first to last message, effort."""
    receive_many = receiver.recv_many
    messages = first_message(partial(receive_many, batch), lossy)
    if messages is None:
        return 0.0, Effort(0.0, 0.0)
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    last = wall_start
    try:
        while True:
            check_batch(checker, messages, size)
            try:
                # up to the next multiple of `batch`: whole batches are then checked against the sender's numbering
                messages = receive_many(batch - checker.expected % batch)
            except TimeoutError:
                if not lossy:
                    raise
                if clock() - last >= LOSSY_QUIET_SECONDS_AT_END:
                    break
                messages = ()
                continue
            last = clock()
    except EndOfStream:
        last = last if lossy else clock()
    return last - wall_start, Effort.since(wall_start, cpu_start)
