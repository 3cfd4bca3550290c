"""Bench subjects for fan-in (pattern=fanin, podipc.fanin): N producer processes into one consumer.

`fanin-unix-N` (over unix://@name), `fanin-tcp-N` (over tcp://127.0.0.1:PORT), `fanin-mq-N`
(mq:///name), `fanin-sysvmq-N` (sysvmq://name; both podipc.queue_fanin), `fanin-zmq+ipc-N` and
`fanin-zmq+tcp-N` (podipc.transports.zmq.fanin), N = 1, 2 or 4, are
measured in throughput cells only. A fan-in's producers are separate processes
(gunicorn-style workers), so the cell runs N of them: the server's sender is producer
"bench-0", and it starts N - 1 producer processes ("bench-1" ...) when it opens, each with
its own named producer. When the stream starts, every producer runs the bench's own
stream loop (podipc.bench.workloads.stream) until one deadline (the cell's seconds from
then), as fast as it can, with at most its share of the cell's messages, numbered from 0
in its own sequence. The server's count is the sum of the producers' counts; its CPU
seconds are theirs together.

The client's receiver is one fan-in consumer (producers=N: its stream ends after the last
producer's). It takes each message with `recv_from()` and checks each producer's
sequence on its own (lost, reordered and duplicated are the sums over the producers);
at the end the consumer's own `senders` must agree (N producers, each ended its stream,
with exactly the messages and bytes the client counted from it). The figure is the
aggregate msg/s from the first message to the last producer's end; fanin-unix-1 (and
fanin-tcp-1) is the reference the others are judged against
(`podipc bench --channels fanin-unix-1,fanin-unix-4 --sizes 64 --mode throughput --repeat 5`).

On a machine with fewer cores than N + 1, the N producers and the consumer share the
CPUs: the aggregate rate then also measures how the kernel shares them, and the cell's
`cpu` figures (client: the consumer; server: the N producers together) say how much.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import IO, Protocol, runtime_checkable

import podipc
from podipc.bench.helpers import HELPER_READY, HelperProcess
from podipc.bench.stats import SEQUENCE, SequenceChecker, cpu_seconds
from podipc.bench.subjects import (
    PEER_WAIT_SECONDS,
    CellPlace,
    ChannelReceiver,
    ChannelSender,
    Receiver,
    Sender,
    Subject,
)
from podipc.bench.workloads import Effort, first_message, stream
from podipc.consuming import Consumer
from podipc.errors import EndOfStream
from podipc.fanin import ENDED, ProducerSummary
from podipc.transport import transport_for

FANIN_PRODUCERS = (1, 2, 4)
FANIN_SCHEMES = ("unix", "tcp", "mq", "sysvmq", "zmq+ipc", "zmq+tcp")
QUEUE_SCHEMES = ("mq", "sysvmq")
ZMQ_SCHEMES = ("zmq+ipc", "zmq+tcp")


@runtime_checkable
class FanInChannel(Protocol):
    """What the bench uses of a fan-in consumer (the stream sockets', the kernel queues' or zmq's)."""

    def recv_from(self, timeout: float | None = None) -> tuple[str, bytes]:
        """The next message and its producer's name."""
        ...

    @property
    def senders(self) -> list[ProducerSummary]:
        """Every producer that attached, with its counts."""
        ...


PRODUCER_NAME_PREFIX = "bench-"
PRODUCER_HELPER = """
import sys
from podipc.bench.fanin import run_producer_helper
run_producer_helper(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.stdin, sys.stdout)
"""
"""The other producers of a fan-in cell: each runs run_producer_helper in its own process."""


def producer_name(index: int) -> str:
    """The name producer `index` of a fan-in cell connects with."""
    return f"{PRODUCER_NAME_PREFIX}{index}"


def seconds_until(deadline: float) -> float:
    """Seconds from now to `deadline` (time.monotonic()), 0 once it has passed."""
    return max(0.0, deadline - time.monotonic())


def run_producer_helper(url: str, name: str, wait: float, orders: IO[str], reports: IO[str]) -> None:
    """One producer process of a fan-in cell: open, say ready, stream when told, report what it sent.

    Reads one line "SIZE DEADLINE MOST" from `orders` (none: the cell was aborted, nothing is
    sent), runs the bench's stream loop until DEADLINE (time.monotonic(), shared by the
    processes of a host) with at most MOST messages, then writes "SENT CPU_SECONDS" to `reports`.
    """
    sender = ChannelSender(podipc.producer(url, name=name, wait=wait))
    reports.write(f"{HELPER_READY}\n")
    reports.flush()
    order = orders.readline().split()
    if not order:
        sender.abort()
        return
    size, deadline, most = int(order[0]), float(order[1]), int(order[2])
    sent, effort = stream(sender, size, seconds_until(deadline), most)
    reports.write(f"{sent} {effort.cpu}\n")
    reports.flush()


def _producer_process(url: str, name: str) -> HelperProcess:
    """A producer process of a fan-in cell, started by the server's sender (run_producer_helper)."""
    return HelperProcess(f"fan-in producer {name}", PRODUCER_HELPER, url, name, str(PEER_WAIT_SECONDS))


class FanInSender:
    """The server's end of a fan-in cell: producer "bench-0" here and N - 1 producer processes beside it."""

    def __init__(self, url: str, producers: int) -> None:
        self.producers = producers
        self.helpers: list[HelperProcess] = []
        self.own: ChannelSender | None = None
        try:
            for index in range(1, producers):
                self.helpers.append(_producer_process(url, producer_name(index)))
            self.own = ChannelSender(podipc.producer(url, name=producer_name(0), wait=PEER_WAIT_SECONDS))
            for helper in self.helpers:
                helper.wait_ready()
        except BaseException:
            self.abort()
            raise
        self.send = self.own.send

    def stream(self, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
        """Every producer streams until `seconds` from now (each at most its share of `max_messages`): sent, effort.

        One deadline for all: a producer process the scheduler runs late sends less, rather
        than stretching the cell.
        """
        assert self.own is not None
        share = max(1, max_messages // self.producers)
        wall_start = time.perf_counter()
        deadline = time.monotonic() + seconds
        for helper in self.helpers:
            helper.order(f"{size} {deadline!r} {share}")
        sent, effort = stream(self.own, size, seconds_until(deadline), share)
        cpu = effort.cpu
        for helper in self.helpers:
            fields = helper.report()
            if len(fields) != 2:
                raise RuntimeError(f"helper process {helper.name} reported {fields!r}, not 'SENT CPU_SECONDS'")
            sent += int(fields[0])
            cpu += float(fields[1])
        return sent, Effort(time.perf_counter() - wall_start, cpu)

    def close(self) -> None:
        """End this process's producer's stream (the producer processes end theirs in stream())."""
        if self.own is not None:
            self.own.close()

    def abort(self) -> None:
        """Abort this process's producer and kill the producer processes (their consumer sees them die)."""
        if self.own is not None:
            self.own.abort()
        for helper in self.helpers:
            helper.kill()


class FanInReceiver(ChannelReceiver):
    """The client's end of a fan-in cell: one fan-in consumer, its messages checked per producer (drain)."""

    def __init__(self, channel: Consumer, producers: int, size: int) -> None:
        super().__init__(channel, lossy=False, zero_copy=False)
        assert isinstance(channel, FanInChannel)
        self.fanin = channel
        self.producers = producers
        self.size = size

    def drain(self, checker: SequenceChecker) -> tuple[float, Effort]:
        """Receive until every producer ended, checking each one's sequence; seconds from first to last, effort.

        `checker` gets the sums over the producers; RuntimeError when the consumer's own
        account of its producers disagrees with what was received.
        """
        receive = self.fanin.recv_from
        checkers: dict[str, SequenceChecker] = {}
        first = first_message(receive, lossy=False)
        if first is None:
            return 0.0, Effort(0.0, 0.0)
        clock = time.perf_counter
        wall_start, cpu_start = clock(), cpu_seconds()
        unpack = SEQUENCE.unpack_from
        name, message = first
        add = checkers.setdefault(name, SequenceChecker()).add
        add(unpack(message)[0])
        current = name
        try:
            while True:
                name, message = receive()
                if name is not current:
                    current = name
                    add = checkers.setdefault(name, SequenceChecker()).add
                add(unpack(message)[0])
        except EndOfStream:
            last = clock()
        effort = Effort.since(wall_start, cpu_start)
        self.check_account(checkers)
        checker.merge(checkers.values())
        return last - wall_start, effort

    def check_account(self, checkers: Mapping[str, SequenceChecker]) -> None:
        """RuntimeError unless the consumer saw N producers end their streams, with the messages and bytes received."""
        senders = self.fanin.senders
        problems = (
            [f"{len(senders)} producers attached, not {self.producers}"] if len(senders) != self.producers else []
        )
        for sender in senders:
            received = checkers[sender.name].received if sender.name in checkers else 0
            if sender.ended != ENDED:
                problems.append(f"{sender.name} ended as {sender.ended!r} {sender.error}".rstrip())
            if (sender.messages, sender.bytes) != (received, received * self.size):
                problems.append(
                    f"{sender.name}: the consumer counted {sender.messages} messages, {sender.bytes} bytes; "
                    f"received {received} of {self.size} bytes"
                )
        if problems:
            raise RuntimeError("fan-in account: " + "; ".join(problems))


class FanIn(Subject):
    """podipc fan-in: N producer processes into one consumer, measured as the consumer's aggregate msg/s."""

    kind = "channel"
    modes = ("throughput",)

    def __init__(self, scheme: str, producers: int) -> None:
        self.scheme = scheme
        self.producers = producers
        self.name = f"fanin-{scheme}-{producers}"
        self.baseline = None if producers == 1 else f"fanin-{scheme}-1"

    def availability(self) -> str | None:
        """Fan-in over the stream sockets needs nothing beyond the standard library; a queue, its transport's."""
        if self.scheme in (*QUEUE_SCHEMES, *ZMQ_SCHEMES):
            return transport_for(self.scheme).problem()
        return None

    def size_problem(self, size: int) -> str | None:
        """Any size up to the default max_message_size (64 MiB) fits a stream; a queue's limit, less mq's tag."""
        if self.scheme not in QUEUE_SCHEMES:
            return None
        transport = transport_for(self.scheme)
        limit = int(transport.limit.host_default()) - (2 if self.scheme == "mq" else 0)
        return None if size <= limit else f"fanin over {self.scheme}:// carries at most {limit} bytes here"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """One abstract socket (unix), loopback port (tcp, zmq+tcp), queue (mq, sysvmq) or socket path (zmq+ipc) per link."""
        if self.scheme in ("tcp", "zmq+tcp"):
            return {key: f"{self.scheme}://127.0.0.1:{free_port('tcp')}" for key in ("a", "b")}
        if self.scheme in (*QUEUE_SCHEMES, "zmq+ipc"):
            return {key: self._queue_url(place, key, free_port) for key in ("a", "b")}
        return {key: f"unix://@{place.name(key)}" for key in ("a", "b")}

    def _queue_url(self, place: CellPlace, key: str, free_port: Callable[[str], int]) -> str:
        """A fresh queue (or zmq+ipc socket path) for link `key`."""
        transport = transport_for(self.scheme)
        return transport.fresh_url(self.scheme, place.name(key), lambda: place.path(key, ".ch"), free_port)

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Producer "bench-0" and N - 1 producer processes, each with its producer open (no I/O yet)."""
        return FanInSender(resources[key], self.producers)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """One fan-in consumer ending after N producers' streams."""
        channel = podipc.consumer(resources[key], pattern="fanin", producers=self.producers, wait=PEER_WAIT_SECONDS)
        return FanInReceiver(channel, self.producers, size)


def fanin_subjects() -> list[Subject]:
    """The fan-in subjects, in report order."""
    return [FanIn(scheme, count) for scheme in FANIN_SCHEMES for count in FANIN_PRODUCERS]
