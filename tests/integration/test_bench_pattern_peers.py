"""The bench's pattern peer cells (podipc.bench.pattern_peers): pyzmq and iceoryx2 fan-in and broadcast, work queues.

Each cell runs for real (`podipc bench --quick`, every process of it started), and must
report a rate with every message accounted for; the checks that make a cell fail are
proved on their own.
"""

from __future__ import annotations

import os
import threading
from array import array
from pathlib import Path
from typing import Any

import pytest

from podipc.bench.cells import free_port
from podipc.bench.pattern_peers import (
    PRODUCER_SHIFT,
    PyZMQFanIn,
    SubscribersReceiver,
    Taken,
    ZMQFanInReceiver,
    ZMQFanInSender,
    account_taken,
)
from podipc.bench.stats import SequenceChecker
from podipc.bench.subjects import CellPlace
from podipc.errors import EndOfStream
from tests.integration.test_bench import assert_sane, judged, run_bench

SIZE = 64
SHARE = 100


def throughput_cells(channels: list[str], sizes: str = "64") -> dict[tuple[str, int], dict[str, Any]]:
    """Run the bench's quick throughput cells of `channels`; their records by (subject, size)."""
    report = run_bench("--quick", "--channels", ",".join(channels), "--sizes", sizes, "--mode", "throughput")
    return {(record["subject"], record["size"]): record for record in report["results"]}


def assert_every_message_counted(record: dict[str, Any]) -> None:
    """An ok cell with a rate, that received every message sent once, in each sequence's order."""
    assert record["status"] == "ok", record["reason"]
    assert_sane(record)
    flow = record["throughput"]
    assert flow["received"] == flow["sent"] > 0, record
    assert (flow["lost"], flow["reordered"], flow["duplicated"]) == (0, 0, 0), record
    assert flow["messages_per_second"] > 0, record


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "family",
    [
        ["pyzmq-fanin-1", "pyzmq-fanin-2", "pyzmq-fanin-4"],
        ["pyzmq-broadcast-1", "pyzmq-broadcast-2", "pyzmq-broadcast-4"],
        ["iceoryx2-broadcast-1", "iceoryx2-broadcast-2", "iceoryx2-broadcast-4"],
        ["queue-mq-1", "queue-mq-2", "queue-mq-4"],
        ["queue-sysvmq-1", "queue-sysvmq-2", "queue-sysvmq-4"],
        ["pyzmq-queue-1", "pyzmq-queue-2", "pyzmq-queue-4"],
    ],
    ids=lambda family: family[0].rsplit("-", 1)[0],
)
def test_each_pattern_peer_cell_reports_a_rate_with_nothing_lost(family: list[str]) -> None:
    cells = throughput_cells(family)
    for name in family:
        assert_every_message_counted(cells[(name, SIZE)])
        assert len([key for key in cells if key[0] == name]) == 1, "throughput cells only"


@pytest.mark.timeout(240)
def test_broadcast_peers_carry_one_mebibyte_messages_to_four_subscribers_beside_shm_broadcast() -> None:
    channels = ["broadcast-shm-4", "pyzmq-broadcast-4", "iceoryx2-broadcast-4"]
    report = run_bench("--quick", "--channels", ",".join(channels), "--sizes", "1MiB", "--mode", "throughput")
    cells = {(record["subject"], record["size"]): record for record in report["results"]}
    for name in channels:
        assert_every_message_counted(cells[(name, 1 << 20)])
    targets = {entry["id"]: entry for entry in judged(report)}
    for target_id in ("broadcast-shm-4-vs-iceoryx2-broadcast-4", "broadcast-shm-4-vs-pyzmq-broadcast-4"):
        assert targets[target_id]["ratio"] is not None and targets[target_id]["ratio"] > 0, targets[target_id]


@pytest.mark.timeout(240)
def test_fanin_and_work_queue_are_reported_against_their_pyzmq_peers() -> None:
    channels = ["fanin-unix-4", "pyzmq-fanin-4", "queue-mq-4", "pyzmq-queue-4"]
    report = run_bench("--quick", "--channels", ",".join(channels), "--sizes", "64", "--mode", "throughput")
    targets = {entry["id"]: entry for entry in judged(report)}
    for target_id in ("fanin-unix-4-vs-pyzmq-fanin-4", "queue-mq-4-vs-pyzmq-queue-4"):
        assert targets[target_id]["ratio"] is not None and targets[target_id]["ratio"] > 0, targets[target_id]


@pytest.mark.timeout(90)
def test_pyzmq_fanin_4_runs_4_producer_processes_and_checks_each_ones_sequence(tmp_path: Path) -> None:
    subject = PyZMQFanIn(4)
    resources = subject.resources(CellPlace(f"t{os.getpid()}", 0, str(tmp_path)), free_port)
    receiver = subject.open_receiver(resources, "a", SIZE)
    sender = subject.open_sender(resources, "a", SIZE)
    assert isinstance(receiver, ZMQFanInReceiver) and isinstance(sender, ZMQFanInSender)
    pids = {helper.process.pid for helper in sender.helpers}
    assert len(pids) == 3 and os.getpid() not in pids, "producer 0 here, three more in processes of their own"
    streamed: dict[str, Any] = {}
    streaming = threading.Thread(
        target=lambda: streamed.update(result=sender.stream(SIZE, 30.0, 4 * SHARE)), daemon=True
    )
    streaming.start()
    checker = SequenceChecker()
    try:
        seconds, _ = receiver.drain(checker)
    finally:
        receiver.close()
    streaming.join(30)
    sent, _ = streamed["result"]
    assert [helper.process.returncode for helper in sender.helpers] == [0, 0, 0]
    assert sent == checker.received == 4 * SHARE and seconds > 0
    assert (checker.lost(sent), checker.reordered, checker.duplicated) == (0, 0, 0)
    assert checker.expected == 4 * SHARE, "each producer's numbers counted from 0, not from its tag"


def test_the_fanin_consumer_counts_a_gap_in_one_producers_sequence_as_lost() -> None:
    import zmq

    endpoint = f"inproc://podipc-test-fanin-gap-{os.getpid()}"
    receiver = ZMQFanInReceiver(endpoint, 2)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    try:
        for tag, numbers in ((0, [0, 1, 2]), (1, [0, 2, 3])):
            for number in numbers:
                push.send((tag << PRODUCER_SHIFT | number).to_bytes(8, "little") + bytes(SIZE - 8))
        push.send(b"")
        push.send(b"")
        checker = SequenceChecker()
        receiver.drain(checker)
    finally:
        receiver.close()
        push.close(linger=0)
    assert checker.received == 6
    assert checker.lost(sent=7) == 1, "producer 1's message 1"


class _Stream:
    """A receiver of `count` numbered messages, then EndOfStream."""

    def __init__(self, count: int) -> None:
        self.messages = iter(number.to_bytes(8, "little") for number in range(count))

    def recv(self) -> bytes:
        for message in self.messages:
            return message
        raise EndOfStream("done")

    def idle(self, seconds: float) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


class _Subscriber:
    """A helper subscriber that reports having taken `count` messages."""

    def __init__(self, count: int) -> None:
        self.count = count

    def report(self) -> list[str]:
        return [str(self.count), "0.0"]


def test_a_broadcast_cell_fails_when_another_subscriber_took_fewer_messages_than_the_measured_one() -> None:
    whole = SubscribersReceiver(_Stream(5), [_Subscriber(5), _Subscriber(5)])  # type: ignore[list-item]
    checker = SequenceChecker()
    whole.drain(checker)
    assert checker.received == 5
    short = SubscribersReceiver(_Stream(5), [_Subscriber(5), _Subscriber(4)])  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="subscriber 2 took 4 messages, the measured one 5"):
        short.drain(SequenceChecker())


def test_a_work_queue_message_taken_twice_is_duplicated_and_one_never_taken_is_lost() -> None:
    def taken(*numbers: int, first: float = 1.0, last: float = 2.0) -> Taken:
        return Taken(array("Q", numbers), first, last, 0.5)

    checker = SequenceChecker()
    seconds, effort = account_taken([taken(0, 2, 4), taken(1, 3, 5, first=0.5, last=3.0), taken()], checker)
    assert (checker.received, checker.lost(sent=6), checker.duplicated, checker.reordered) == (6, 0, 0, 0)
    assert seconds == 2.5 and effort.cpu == 1.0, "first take of any consumer to the last one's end; CPU of all"
    checker = SequenceChecker()
    account_taken([taken(0, 2, 4), taken(1, 2, 5)], checker)
    assert (checker.received, checker.lost(sent=6), checker.duplicated) == (6, 1, 1), "3 never taken, 2 twice"
