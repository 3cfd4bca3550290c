"""Peer cells of the pattern benches: the same fan-in, broadcast and work queue done by pyzmq and iceoryx2.

Every cell here is measured in throughput cells only, with its processes shaped like the
podipc cell it is set against, so the ratio of the two figures is fair:

- `pyzmq-fanin-N` (N = 1, 2, 4), against `fanin-unix-N`: N producer processes, each a
  PUSH socket connecting to one PULL that binds an ipc:// endpoint. As in
  podipc.bench.fanin, the server's sender is producer 0 and starts N - 1 producer
  processes; all stream until one deadline, each with at most its share of the messages.
  PUSH/PULL has no sender name, so each producer numbers its messages from
  `index << PRODUCER_SHIFT`; the client's PULL checks each producer's sequence on its own
  and ends after N end frames. Figure: the consumer's aggregate msg/s from its first message
  to the last end frame. Nothing is dropped: PUSH blocks at its high-water mark.
- `pyzmq-broadcast-N`, against `broadcast-shm-N`: one XPUB (a PUB that sees subscriptions)
  binds, N SUB processes connect; the bench's receiver is one of them and N - 1 more drain
  beside it. Slow-joiner safe: the publisher waits until it has seen N subscriptions before
  its first message. Lossless, not counted drops: XPUB_NODROP makes a send block while any
  subscriber's queue is at SNDHWM (1000) instead of dropping for it, so the publisher runs at
  the slowest subscriber's pace, as shm:// broadcast does. The measured subscriber's sequence
  is checked; each other subscriber counts what it took and must have taken as many.
- `iceoryx2-broadcast-N`, against `broadcast-shm-N`: one iceoryx2 publish-subscribe service
  with N subscribers (podipc.bench.peers.shared_memory's iceoryx2 peer: safe overflow off,
  RetryUntilDelivered, so no loss); the publisher's first send waits for all N.
- `queue-mq-N`, `queue-sysvmq-N` (podipc's `pattern=queue`, podipc.work_queue), and
  `pyzmq-queue-N` (one PUSH binding, N PULL processes connecting): one producer, N consumer
  processes, each message to exactly one of them. The producer waits for N consumers
  before its first message (`consumers=N`; for pyzmq, N finished handshakes). Each consumer
  records the sequence number of every message it takes; at the end the union must be every
  number sent exactly once (lost and duplicated say otherwise). Figure: the aggregate msg/s
  of all consumers, from the first message any of them took to the last one's end, with the
  consumers' CPU seconds together. pyzmq's PUSH round-robins; a kernel queue goes to
  whichever consumer asks first.

Ask for them by name:
`podipc bench --channels fanin-unix-4,pyzmq-fanin-4 --sizes 64 --mode throughput`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Mapping
from typing import IO, Any

import podipc
from podipc.bench.helpers import HELPER_READY, HelperProcess, kill_all
from podipc.bench.peers.libraries import ZMQSender, close_pull
from podipc.bench.peers.shared_memory import IceoryxReceiver, IceoryxSender
from podipc.bench.peers.sockets import CLOSE_WAIT_SECONDS, missing_package
from podipc.bench.stats import SEQUENCE, SequenceChecker, cpu_seconds
from podipc.bench.subjects import (
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    ChannelReceiver,
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
)
from podipc.bench.workloads import CLOCK_CHECK_EVERY, Effort, drain, stream
from podipc.errors import EndOfStream

PATTERN_PEER_COUNTS = (1, 2, 4)
QUEUE_SCHEMES = ("mq", "sysvmq")
PRODUCER_SHIFT = 56
"""pyzmq fan-in: producer `index` numbers its messages from index << PRODUCER_SHIFT."""
NUMBER_MASK = (1 << PRODUCER_SHIFT) - 1
PUBLISHER_HWM = 1000
"""pyzmq broadcast and queue: messages queued per peer before a send blocks."""
HELPER = """
import sys
from podipc.bench.pattern_peers import run_helper
run_helper(sys.argv[1], sys.argv[2:], sys.stdin, sys.stdout)
"""
"""The other processes of a pattern peer cell: each runs run_helper in its own process."""
HELPER_EXIT_SECONDS = 30.0
"""How long a helper may take to report once its stream ended (a queue consumer writes its numbers)."""


def seconds_until(deadline: float) -> float:
    """Seconds from now to `deadline` (time.monotonic()), 0 once it has passed."""
    return max(0.0, deadline - time.monotonic())


# --- the loops ----------------------------------------------------------------------------


def stream_from(sender: Sender, size: int, seconds: float, max_messages: int, first: int) -> tuple[int, Effort]:
    """podipc.bench.workloads.stream with messages numbered from `first`: sent, effort (the same loop otherwise)."""
    buffer = bytearray(size)
    pack_into, send = SEQUENCE.pack_into, sender.send
    clock = time.perf_counter
    wall_start, cpu_start = clock(), cpu_seconds()
    pack_into(buffer, 0, first)
    send(buffer)
    sent = 1
    end = clock() + seconds
    while sent < max_messages:
        batch = min(CLOCK_CHECK_EVERY, max_messages - sent)
        for sequence in range(first + sent, first + sent + batch):
            pack_into(buffer, 0, sequence)
            send(buffer)
        sent += batch
        if clock() >= end:
            break
    sender.close()
    return sent, Effort.since(wall_start, cpu_start)


def count_stream(receive: Callable[[], Buffer]) -> tuple[int, float]:
    """Take messages until EndOfStream: how many, and the CPU seconds from the first."""
    received = 0
    try:
        receive()
        received, cpu_start = 1, cpu_seconds()
        while True:
            receive()
            received += 1
    except EndOfStream:
        pass
    return received, (cpu_seconds() - cpu_start) if received else 0.0


class Taken:
    """What one work-queue consumer took: every sequence number, its first message's and its end's time, CPU."""

    def __init__(self, numbers: array[int], first: float, last: float, cpu: float) -> None:
        self.numbers = numbers
        self.first = first
        self.last = last
        self.cpu = cpu

    @classmethod
    def record(cls, receive: Callable[[], Buffer]) -> Taken:
        """Take messages until EndOfStream, keeping their numbers (times are time.monotonic(), shared by a host)."""
        numbers: array[int] = array("Q")
        append, unpack, clock = numbers.append, SEQUENCE.unpack_from, time.monotonic
        try:
            message = receive()
        except EndOfStream:
            return cls(numbers, 0.0, 0.0, 0.0)
        first, cpu_start = clock(), cpu_seconds()
        try:
            while True:
                append(unpack(message)[0])
                message = receive()
        except EndOfStream:
            last = clock()
        return cls(numbers, first, last, cpu_seconds() - cpu_start)


def account_taken(taken: list[Taken], checker: SequenceChecker) -> tuple[float, Effort]:
    """Every number the consumers took, in order, into `checker` (twice: duplicated; never: lost at the end).

    Seconds from the first message any consumer took to the last consumer's end; the
    effort is that span and the consumers' CPU seconds together.
    """
    took = [each for each in taken if each.numbers]
    if not took:
        return 0.0, Effort(0.0, 0.0)
    add = checker.add
    for number in sorted(number for each in took for number in each.numbers):
        add(number)
    seconds = max(each.last for each in took) - min(each.first for each in took)
    return seconds, Effort(seconds, sum(each.cpu for each in took))


# --- the helper processes -----------------------------------------------------------------


def helper_process(role: str, *arguments: str) -> HelperProcess:
    """A helper process of a pattern peer cell: run_helper(role, arguments) in its own process."""
    return HelperProcess(f"{role} {' '.join(arguments)}", HELPER, role, *arguments, exit_seconds=HELPER_EXIT_SECONDS)


def run_helper(role: str, arguments: list[str], orders: IO[str], reports: IO[str]) -> None:
    """The body of a helper process: open its end, say ready, run its part, report on its last line."""
    if role == "zmq-producer":
        endpoint, index = arguments
        sender = ZMQSender(endpoint)
        reports.write(f"{HELPER_READY}\n")
        reports.flush()
        order = orders.readline().split()
        if not order:
            sender.abort()
            return
        size, deadline, most = int(order[0]), float(order[1]), int(order[2])
        sent, effort = stream_from(sender, size, seconds_until(deadline), most, int(index) << PRODUCER_SHIFT)
        reports.write(f"{sent} {effort.cpu}\n")
    elif role in ("zmq-subscriber", "iceoryx2-subscriber"):
        receiver = _open_subscriber(role, arguments)
        try:
            received, cpu = count_stream(receiver.recv)
        finally:
            receiver.close()
        reports.write(f"{received} {cpu}\n")
    elif role in ("zmq-consumer", "queue-consumer"):
        address, path = arguments
        receiver = _open_queue_consumer(role, address)
        try:
            taken = Taken.record(receiver.recv)
        finally:
            receiver.close()
        with open(path, "wb") as file:
            taken.numbers.tofile(file)
        reports.write(f"{len(taken.numbers)} {taken.first!r} {taken.last!r} {taken.cpu}\n")
    else:
        raise ValueError(f"unknown helper role {role!r}")
    reports.flush()


def _open_subscriber(role: str, arguments: list[str]) -> Receiver:
    if role == "zmq-subscriber":
        return zmq_subscriber(arguments[0])
    return IceoryxReceiver(arguments[0], int(arguments[1]))


def _open_queue_consumer(role: str, address: str) -> Receiver:
    if role == "zmq-consumer":
        return zmq_pull(address)
    return ChannelReceiver(podipc.consumer(address, wait=PEER_WAIT_SECONDS), lossy=False, zero_copy=False)


# --- what the bench's server and client call -----------------------------------------------


class PatternSender(ABC):
    """The server's end of a pattern peer cell: it runs the whole stream (podipc.bench.server calls stream())."""

    @abstractmethod
    def stream(self, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
        """Stream for `seconds`, at most `max_messages`; messages sent (by all producers), effort."""

    send: Callable[[Buffer], object]
    """Its producer's send (stream() is what the bench calls)."""

    @abstractmethod
    def close(self) -> None:
        """Free what is still open after stream()."""

    @abstractmethod
    def abort(self) -> None:
        """Free everything at once (after a failure)."""


class PatternReceiver(ABC):
    """The client's end of a pattern peer cell: it drains the whole stream (podipc.bench.runner calls drain())."""

    @abstractmethod
    def drain(self, checker: SequenceChecker) -> tuple[float, Effort]:
        """Receive until the stream ended, into `checker`; seconds from first message to last, effort."""

    def recv(self) -> Buffer:
        """Not used: drain() is."""
        raise TypeError("a pattern peer drains with drain()")

    def idle(self, seconds: float) -> None:
        """Not measured (throughput cells only)."""
        time.sleep(seconds)

    @abstractmethod
    def close(self) -> None:
        """Free what is still open (idempotent)."""


# --- pyzmq ---------------------------------------------------------------------------------


def _zmq_monitor(socket: Any, events: int, tag: str) -> Any:
    """A PAIR socket receiving `socket`'s monitor events of kinds `events`."""
    import zmq

    endpoint = f"inproc://podipc-bench-{tag}-{os.getpid()}-{id(socket)}"
    socket.monitor(endpoint, events)
    watch: Any = zmq.Context.instance().socket(zmq.PAIR)
    watch.connect(endpoint)
    return watch


def _count_events(watch: Any, count: int, seconds: float, kind: int) -> int:
    """Wait (at most `seconds`) for `count` monitor events of `kind` on `watch` (others are passed over); how many."""
    from zmq.utils.monitor import recv_monitor_message

    seen, deadline = 0, time.monotonic() + seconds
    while seen < count and watch.poll(max(1, int(seconds_until(deadline) * 1000))):
        if recv_monitor_message(watch)["event"] == kind:
            seen += 1
    return seen


def _close_watched(socket: Any, watch: Any) -> None:
    with contextlib.suppress(Exception):
        socket.disable_monitor()
    watch.close(linger=0)
    socket.close(linger=0)


class ZMQFanInSender(PatternSender):
    """pyzmq fan-in's producers: PUSH "0" here and N - 1 PUSH processes, each numbering from index << 56."""

    def __init__(self, endpoint: str, producers: int) -> None:
        self.producers = producers
        self.helpers: list[HelperProcess] = []
        self.own: ZMQSender | None = None
        try:
            self.helpers = [helper_process("zmq-producer", endpoint, str(index)) for index in range(1, producers)]
            self.own = ZMQSender(endpoint)
            for helper in self.helpers:
                helper.wait_ready()
        except BaseException:
            self.abort()
            raise
        self.send = self.own.send

    def stream(self, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
        """Every producer streams until one deadline (podipc.bench.fanin's FanInSender.stream, PUSH sockets)."""
        assert self.own is not None
        share = max(1, max_messages // self.producers)
        wall_start = time.perf_counter()
        deadline = time.monotonic() + seconds
        for helper in self.helpers:
            helper.order(f"{size} {deadline!r} {share}")
        sent, effort = stream_from(self.own, size, seconds_until(deadline), share, 0)
        cpu = effort.cpu
        for helper in self.helpers:
            fields = helper.report()
            sent += int(fields[0])
            cpu += float(fields[1])
        return sent, Effort(time.perf_counter() - wall_start, cpu)

    def close(self) -> None:
        """Nothing left: every producer ended its stream in stream()."""

    def abort(self) -> None:
        """Close this producer, kill the others."""
        if self.own is not None:
            self.own.abort()
        kill_all(self.helpers)


class ZMQFanInReceiver(PatternReceiver):
    """pyzmq fan-in's consumer: one PULL binding, each producer's sequence checked, done after N end frames."""

    def __init__(self, endpoint: str, producers: int) -> None:
        import zmq

        self.socket: Any = zmq.Context.instance().socket(zmq.PULL)
        self.socket.bind(endpoint)
        self.endpoint = endpoint
        self.producers = producers
        self.closed = False

    def drain(self, checker: SequenceChecker) -> tuple[float, Effort]:
        """Receive until N end frames; per-producer checks summed into `checker`; first to last seconds, effort."""
        receive = self.socket.recv
        checkers = [SequenceChecker() for _ in range(self.producers)]
        adds = [each.add for each in checkers]
        unpack, shift, mask = SEQUENCE.unpack_from, PRODUCER_SHIFT, NUMBER_MASK
        message = receive()
        clock = time.perf_counter
        wall_start, cpu_start = clock(), cpu_seconds()
        ends = 0
        while True:
            if message:
                number = unpack(message)[0]
                adds[number >> shift](number & mask)
            else:
                ends += 1
                if ends == self.producers:
                    break
            message = receive()
        last = clock()
        effort = Effort.since(wall_start, cpu_start)
        checker.merge(checkers)
        self.close()
        return last - wall_start, effort

    def close(self) -> None:
        """Close the PULL (the producers waiting for it to leave then close theirs)."""
        if not self.closed:
            self.closed = True
            close_pull(self.socket, self.endpoint)


class ZMQReader:
    """A SUB (subscribed to everything) or PULL socket connecting to its binding peer; an empty frame ends the stream."""

    def __init__(self, endpoint: str, socket_type: int) -> None:
        import zmq

        self.socket: Any = zmq.Context.instance().socket(socket_type)
        self.socket.setsockopt(zmq.RCVHWM, PUBLISHER_HWM)
        if socket_type == zmq.SUB:
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        receive: Callable[[], bytes] = self.socket.recv

        def recv() -> bytes:
            data = receive()
            if not data:
                raise EndOfStream("zmq: end frame")
            return data

        self.recv = recv

    def idle(self, seconds: float) -> None:
        """Not measured."""
        time.sleep(seconds)

    def close(self) -> None:
        """Close at once (end frames still queued for it are dropped)."""
        self.socket.close(linger=0)


def zmq_subscriber(endpoint: str) -> ZMQReader:
    """A broadcast subscriber of pyzmq (SUB)."""
    import zmq

    return ZMQReader(endpoint, zmq.SUB)


def zmq_pull(endpoint: str) -> ZMQReader:
    """A work-queue consumer of pyzmq (PULL)."""
    import zmq

    return ZMQReader(endpoint, zmq.PULL)


class ZMQPublisher(PatternSender):
    """pyzmq broadcast's publisher: XPUB binding, XPUB_NODROP (a full subscriber queue blocks the send)."""

    def __init__(self, endpoint: str, subscribers: int) -> None:
        import zmq

        self.subscribers = subscribers
        self.endpoint = endpoint
        self.socket: Any = zmq.Context.instance().socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, PUBLISHER_HWM)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.socket.setsockopt(zmq.SNDTIMEO, int(PEER_WAIT_SECONDS * 1000))
        self.leaves = _zmq_monitor(self.socket, zmq.EVENT_DISCONNECTED, "leave")
        self.disconnected = zmq.EVENT_DISCONNECTED
        self.socket.bind(endpoint)
        self.send = self.socket.send

    def stream(self, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
        """Wait until N subscriptions came in (no slow joiner misses message 0), then the bench's stream loop."""
        seen = 0
        while seen < self.subscribers:
            if not self.socket.poll(int(PEER_WAIT_SECONDS * 1000)):
                raise TimeoutError(f"pyzmq broadcast: {seen} of {self.subscribers} subscribers came")
            if self.socket.recv()[:1] == b"\x01":
                seen += 1
        return stream(self, size, seconds, max_messages)

    def close(self) -> None:
        """Send the end frame to all, wait (bounded) for the N subscribers to leave, close."""
        self.socket.send(b"")
        _count_events(self.leaves, self.subscribers, CLOSE_WAIT_SECONDS, self.disconnected)
        self.abort()

    def abort(self) -> None:
        """Close at once and remove the socket file."""
        _close_watched(self.socket, self.leaves)
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint[len("ipc://") :])


class SubscribersReceiver(PatternReceiver):
    """The measured subscriber of a broadcast peer, and the N - 1 subscriber processes draining beside it."""

    def __init__(self, measured: Receiver, helpers: list[HelperProcess]) -> None:
        self.measured = measured
        self.helpers = helpers
        self.closed = False

    def drain(self, checker: SequenceChecker) -> tuple[float, Effort]:
        """The bench's own drain on the measured subscriber; then each helper must have taken as many messages."""
        seconds, effort = drain(self.measured, checker, numbered=True, lossy=False)
        self.measured.close()
        self.closed = True
        problems = []
        for number, helper in enumerate(self.helpers, 1):
            received = int(helper.report()[0])
            if received != checker.received:
                problems.append(f"subscriber {number} took {received} messages, the measured one {checker.received}")
        if problems:
            raise RuntimeError("broadcast: " + "; ".join(problems))
        return seconds, effort

    def close(self) -> None:
        """Close the measured subscriber (when drain did not) and kill helpers still running."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.measured.close()
        for helper in self.helpers:
            if helper.process.poll() is None:
                helper.kill()


def open_subscribers(role: str, arguments: list[str], count: int, measured: Callable[[], Receiver]) -> Receiver:
    """Start `count` - 1 subscriber processes, then open the measured one."""
    helpers = [helper_process(role, *arguments) for _ in range(count - 1)]
    try:
        return SubscribersReceiver(measured(), helpers)
    except BaseException:
        kill_all(helpers)
        raise


class ZMQDistributor(PatternSender):
    """pyzmq work queue's producer: PUSH binding, round-robin over N PULL consumers; blocks at SNDHWM."""

    def __init__(self, endpoint: str, consumers: int) -> None:
        import zmq

        self.consumers = consumers
        self.endpoint = endpoint
        self.socket: Any = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, PUBLISHER_HWM)
        self.joined, self.disconnected = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED
        self.events = _zmq_monitor(self.socket, self.joined | self.disconnected, "queue")
        self.socket.bind(endpoint)
        self.send = self.socket.send

    def stream(self, size: int, seconds: float, max_messages: int) -> tuple[int, Effort]:
        """Wait for N consumers' handshakes (so round-robin spans all from message 0), then the stream loop."""
        joined = _count_events(self.events, self.consumers, PEER_WAIT_SECONDS, self.joined)
        if joined < self.consumers:
            raise TimeoutError(f"pyzmq work queue: {joined} of {self.consumers} consumers came")
        return stream(self, size, seconds, max_messages)

    def close(self) -> None:
        """End frames until all N consumers left (round-robin may give one consumer two; it leaves at its first)."""
        import zmq

        left, deadline = 0, time.monotonic() + CLOSE_WAIT_SECONDS
        while left < self.consumers and time.monotonic() < deadline:
            with contextlib.suppress(zmq.Again):
                self.socket.send(b"", zmq.NOBLOCK)
            left += _count_events(self.events, self.consumers - left, 0.001, self.disconnected)
        self.abort()

    def abort(self) -> None:
        """Close at once and remove the socket file."""
        _close_watched(self.socket, self.events)
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint[len("ipc://") :])


class ConsumersReceiver(PatternReceiver):
    """A work queue's consumers: the measured one here and N - 1 consumer processes, every number checked once."""

    def __init__(self, role: str, address: str, consumers: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="podipc-bench-queue-")
        self.helpers: list[HelperProcess] = []
        self.closed = False
        try:
            self.helpers = [
                helper_process(role, address, os.path.join(self.directory, f"{index}.numbers"))
                for index in range(1, consumers)
            ]
            self.measured = _open_queue_consumer(role, address)
        except BaseException:
            self.close()
            raise

    def drain(self, checker: SequenceChecker) -> tuple[float, Effort]:
        """Record what each consumer took; the union, sorted, into `checker`; first to last seconds, all their CPU."""
        taken = [Taken.record(self.measured.recv)]
        self.measured.close()
        self.closed = True
        for index, helper in enumerate(self.helpers, 1):
            fields = helper.report()
            numbers: array[int] = array("Q")
            with open(os.path.join(self.directory, f"{index}.numbers"), "rb") as file:
                numbers.frombytes(file.read())
            if len(numbers) != int(fields[0]):
                raise RuntimeError(f"work-queue consumer {index} reported {fields[0]} messages, wrote {len(numbers)}")
            taken.append(Taken(numbers, float(fields[1]), float(fields[2]), float(fields[3])))
        self._remove_directory()
        return account_taken(taken, checker)

    def close(self) -> None:
        """Close the measured consumer (when drain did not), kill helpers still running, remove their numbers."""
        if not self.closed:
            self.closed = True
            measured = getattr(self, "measured", None)
            if measured is not None:
                with contextlib.suppress(Exception):
                    measured.close()
        for helper in self.helpers:
            if helper.process.poll() is None:
                helper.kill()
        self._remove_directory()

    def _remove_directory(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# --- the subjects -------------------------------------------------------------------------


class _PyZMQPattern(Subject):
    """A pyzmq pattern peer over ipc:// (a socket file in the bench directory)."""

    kind = "library"
    modes = ("throughput",)
    shared_places = frozenset({"directory"})

    def __init__(self, name: str, count: int, baseline: str | None) -> None:
        self.name = name
        self.count = count
        self.baseline = baseline

    def availability(self) -> str | None:
        """pyzmq installed."""
        return missing_package("zmq", "zmq")

    def size_problem(self, size: int) -> str | None:
        """Any size fits."""
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """An ipc:// endpoint per link."""
        return {key: f"ipc://{place.path(key, '.zmqpattern')}" for key in ("a", "b")}


class PyZMQFanIn(_PyZMQPattern):
    """pyzmq fan-in: N PUSH producer processes into one PULL, the consumer's aggregate msg/s (vs fanin-unix-N)."""

    def __init__(self, producers: int) -> None:
        super().__init__(f"pyzmq-fanin-{producers}", producers, None if producers == 1 else "pyzmq-fanin-1")

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """PUSH "0" here and N - 1 PUSH processes, each connected (no I/O yet)."""
        return ZMQFanInSender(resources[key], self.count)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """One PULL, bound."""
        return ZMQFanInReceiver(resources[key], self.count)


class PyZMQBroadcast(_PyZMQPattern):
    """pyzmq broadcast: XPUB to N SUB processes, one subscriber's msg/s (vs broadcast-shm-N), lossless."""

    def __init__(self, subscribers: int) -> None:
        super().__init__(f"pyzmq-broadcast-{subscribers}", subscribers, "pyzmq-ipc")

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """The XPUB, bound; it waits for N subscriptions when the stream starts."""
        return ZMQPublisher(resources[key], self.count)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """N - 1 SUB processes and the measured SUB, all connecting."""
        endpoint = resources[key]
        return open_subscribers("zmq-subscriber", [endpoint], self.count, lambda: zmq_subscriber(endpoint))


class PyZMQQueue(_PyZMQPattern):
    """pyzmq work queue: PUSH to N PULL processes, aggregate msg/s (vs queue-mq-N), each message taken once."""

    def __init__(self, consumers: int) -> None:
        super().__init__(f"pyzmq-queue-{consumers}", consumers, "pyzmq-ipc")

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """The PUSH, bound; it waits for N consumers when the stream starts."""
        return ZMQDistributor(resources[key], self.count)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """N - 1 PULL processes and the measured PULL, all connecting."""
        return ConsumersReceiver("zmq-consumer", resources[key], self.count)


class Iceoryx2Broadcast(Subject):
    """iceoryx2 publish-subscribe to N subscriber processes, one subscriber's msg/s (vs broadcast-shm-N)."""

    kind = "library"
    modes = ("throughput",)
    zero_copy_receive = True
    shared_places = frozenset({"dev_shm", "iceoryx2"})

    def __init__(self, subscribers: int) -> None:
        self.name = f"iceoryx2-broadcast-{subscribers}"
        self.subscribers = subscribers
        self.baseline = "iceoryx2"

    def availability(self) -> str | None:
        """iceoryx2 installed."""
        return missing_package("iceoryx2")

    def size_problem(self, size: int) -> str | None:
        """Any size fits."""
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A service name per link."""
        return {key: place.name(key) + "-ioxb" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """The publisher; its first send waits for N subscribers."""
        return IceoryxSender(resources[key], size, self.subscribers)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """N - 1 subscriber processes and the measured subscriber."""
        name, count = resources[key], self.subscribers
        return open_subscribers("iceoryx2-subscriber", [name, str(count)], count, lambda: IceoryxReceiver(name, count))


class WorkQueue(ChannelSubject):
    """podipc's work queue (pattern=queue) over mq:// or sysvmq://: one producer, N consumer processes."""

    modes = ("throughput",)

    def __init__(self, scheme: str, consumers: int) -> None:
        super().__init__(scheme, f"pattern=queue&consumers={consumers}", baseline=scheme)
        self.name = f"queue-{scheme}-{consumers}"
        self.consumers = consumers

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """N - 1 consumer processes and the measured consumer, each claiming its slot."""
        return ConsumersReceiver("queue-consumer", resources[key], self.consumers)


def pattern_peer_subjects() -> list[Subject]:
    """The pattern peers, in report order (measured when named in --channels)."""
    return [
        *(PyZMQFanIn(count) for count in PATTERN_PEER_COUNTS),
        *(PyZMQBroadcast(count) for count in PATTERN_PEER_COUNTS),
        *(Iceoryx2Broadcast(count) for count in PATTERN_PEER_COUNTS),
        *(WorkQueue(scheme, count) for scheme in QUEUE_SCHEMES for count in PATTERN_PEER_COUNTS),
        *(PyZMQQueue(count) for count in PATTERN_PEER_COUNTS),
    ]
