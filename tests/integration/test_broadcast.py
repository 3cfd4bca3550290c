"""pattern=broadcast across real processes: one producer, N subscribers, every message to each.

The behaviour tests run over every channel with broadcast (SCHEMES: shm://'s ring and the
stream sockets unix://, tcp://, podipc.stream_broadcast); what only one of them has is
tested for it alone. Payloads carry their index (8 bytes, big-endian) so a subscriber
checks order and counts the gaps it saw; with slow=drop those gaps must equal the loss it
reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

import podipc
import podipc.address
from podipc.clean import find_leftovers
from podipc.stream_broadcast import StreamBroadcastProducer, StreamBroadcastSubscriber
from podipc.transport import object_kinds
from podipc.transports.shm.broadcast import BroadcastProducer, BroadcastSubscriber
from tests.integration.harness import CONTEXT

INDEX = struct.Struct(">Q")
SIZES = (8, 64, 300, 1500, 4096, 24, 9000)
FILLER = bytes(range(256)) * 40


def payload(index: int) -> bytes:
    """Message `index`: its index, then filler of a size that cycles through SIZES."""
    size = SIZES[index % len(SIZES)]
    return INDEX.pack(index) + FILLER[index % 256 : index % 256 + size - INDEX.size]


SCHEMES = ("shm", "unix", "tcp")
STREAMS = ("unix", "tcp")
RING_ONLY = ("capacity",)
"""Options only shm://'s ring has (the stream sockets' buffers are the kernel's)."""


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def plain_url(scheme: str, name: str) -> str:
    """The channel's URL for `scheme` without options."""
    if scheme == "shm":
        return f"shm:///podipc-bcast-{os.getpid()}-{name}"
    if scheme == "unix":
        return f"unix://{tempfile.gettempdir()}/podipc-bcast-{os.getpid()}-{name}.sock"
    return f"tcp://127.0.0.1:{free_port()}"


def url(name: str, scheme: str = "shm", **options: object) -> str:
    """A broadcast URL on `scheme` (wait=20 unless given); ring-only options are left out of the stream sockets'."""
    chosen = {"pattern": "broadcast", "wait": 20, **options}
    if scheme != "shm":
        chosen = {key: value for key, value in chosen.items() if key not in RING_ONLY}
    query = "&".join(f"{key}={value}" for key, value in chosen.items())
    return f"{plain_url(scheme, name)}?{query}"


def subscribe(address: str, results: Any, in_place: bool = True) -> None:
    """A subscriber process: take every message, check the order, report count, sha256, gaps and loss."""
    digest = hashlib.sha256()
    count = gaps = 0
    expected = 0
    in_order = True
    with podipc.consumer(address) as inbox:
        receive = inbox.recv_view if in_place else inbox.recv
        try:
            while True:
                message = receive(30)
                (index,) = INDEX.unpack_from(message)
                if index < expected:
                    in_order = False
                gaps += index - expected
                expected = index + 1
                digest.update(message)
                count += 1
        except podipc.EndOfStream:
            pass
        results.put(
            {
                "pid": os.getpid(),
                "count": count,
                "sha256": digest.hexdigest(),
                "gaps": gaps,
                "next": expected,
                "lost": inbox.lost,
                "in_order": in_order,
            }
        )


def start_subscribers(address: str, count: int) -> tuple[list[Any], Any]:
    results = CONTEXT.Queue()
    processes = [CONTEXT.Process(target=subscribe, args=(address, results), daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    return processes, results


def collect(processes: list[Any], results: Any, count: int) -> list[dict[str, Any]]:
    reports = [results.get(timeout=60) for _ in range(count)]
    for process in processes:
        process.join(10)
    return reports


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("subscribers", [2, 4])
def test_every_subscriber_gets_every_message_in_order_with_the_producers_digest(
    reap: list[Any], scheme: str, subscribers: int
) -> None:
    address = url("every", scheme, subscribers=subscribers, capacity="1MiB")
    processes, results = start_subscribers(address, subscribers)
    reap.extend(processes)
    digest = hashlib.sha256()
    total = 50_000
    with podipc.producer(address) as out:
        assert isinstance(out, BroadcastProducer if scheme == "shm" else StreamBroadcastProducer)
        for index in range(total):
            message = payload(index)
            out.send(message)
            digest.update(message)
    reports = collect(processes, results, subscribers)
    for report in reports:
        assert report == {**report, "count": total, "sha256": digest.hexdigest(), "gaps": 0, "lost": 0, "next": total}
        assert report["in_order"]
    delivered = sorted(report.delivered for report in out.subscriber_reports())
    assert delivered == [total] * subscribers
    assert {report.state for report in out.subscriber_reports()} == {"ended"}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slow_wait_a_stopped_subscriber_blocks_the_writer_and_loses_nothing(reap: list[Any], scheme: str) -> None:
    address = url("wait", scheme, subscribers=2, capacity="64KiB")
    processes, results = start_subscribers(address, 2)
    reap.extend(processes)
    digest = hashlib.sha256()
    # 64 KiB hold far fewer than 1000 messages of ~2 KiB on average; socket buffers hold a few MiB
    limit = 1000 if scheme == "shm" else 100_000
    with podipc.producer(address) as out:
        out.send(payload(0))
        digest.update(payload(0))
        os.kill(processes[1].pid, signal.SIGSTOP)
        index = 1
        with pytest.raises(podipc.Timeout):
            while index < limit:
                out.send(payload(index), timeout=0.5)
                digest.update(payload(index))
                index += 1
        assert index < limit
        os.kill(processes[1].pid, signal.SIGCONT)
        total = index + 2000  # the stream sockets' buffers hold a few thousand messages before the Timeout
        for later in range(index, total):
            out.send(payload(later), timeout=10)
            digest.update(payload(later))
    for report in collect(processes, results, 2):
        assert (report["count"], report["sha256"], report["lost"], report["gaps"]) == (total, digest.hexdigest(), 0, 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slow_drop_a_stopped_subscriber_counts_its_loss_exactly_and_the_writer_goes_on(
    reap: list[Any], scheme: str
) -> None:
    address = url("drop", scheme, subscribers=2, capacity="64KiB", slow="drop")
    processes, results = start_subscribers(address, 2)
    reap.extend(processes)
    total = 5000 if scheme == "shm" else 20_000  # a stream holds its socket buffers and a 1 MiB outbox
    with podipc.producer(address) as out:
        out.send(payload(0))
        time.sleep(0.2)  # both took message 0 and wait for the next
        os.kill(processes[1].pid, signal.SIGSTOP)
        began = time.monotonic()
        for index in range(1, total):
            out.send(payload(index), timeout=1)  # never waits for the stopped one
            if index % 50 == 0:
                time.sleep(0.001)  # the running subscriber keeps up
        assert time.monotonic() - began < 20
        os.kill(processes[1].pid, signal.SIGCONT)
    reports = {report["pid"]: report for report in collect(processes, results, 2)}
    for report in reports.values():
        assert report["in_order"]
        # every message missed is counted, none twice: shm:// resumes at the ring's tail (gaps), a stream
        # drops the newest messages while the subscriber's outbox is full (gaps, and at the end)
        assert report["lost"] == report["gaps"] + total - report["next"]
        assert report["count"] + report["lost"] == total
    stopped = reports[processes[1].pid]
    assert stopped["lost"] > total // 2  # the ring (or the buffers) hold a few hundred of them; the rest was dropped
    if scheme in STREAMS:  # the producer's own count agrees with each subscriber's
        producer_side = {report.slot: report for report in out.subscriber_reports()}
        assert len(producer_side) == 2
        for report in producer_side.values():
            assert report.state == "ended"
            assert report.delivered + report.lost == total
        assert sorted(report.lost for report in producer_side.values()) == sorted(r["lost"] for r in reports.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_killed_subscriber_does_not_stop_the_others(reap: list[Any], scheme: str) -> None:
    address = url("kill", scheme, subscribers=3, capacity="64KiB")
    processes, results = start_subscribers(address, 3)
    reap.extend(processes)
    digest = hashlib.sha256()
    total = 20_000
    with podipc.producer(address) as out:
        for index in range(total):
            if index == 100:
                processes[2].kill()
            out.send(payload(index), timeout=10)
            digest.update(payload(index))
    processes[2].join(5)
    reports = collect(processes[:2], results, 2)
    for report in reports:
        assert (report["count"], report["sha256"]) == (total, digest.hexdigest())
    states = sorted(report.state for report in out.subscriber_reports())
    assert states == ["ended", "ended", "gone"]


def test_a_pair_consumer_and_a_broadcast_subscriber_refuse_each_other() -> None:
    name = f"shm:///podipc-bcast-{os.getpid()}-mismatch"
    with podipc.consumer(f"{name}?wait=2"):
        with pytest.raises(podipc.ProtocolError, match="pair ring"):
            podipc.consumer(f"{name}?pattern=broadcast&wait=2")  # the ring is there: it joins (and refuses) at open
        with pytest.raises(podipc.ProtocolError, match="live pair ring"):
            podipc.producer(f"{name}?pattern=broadcast&wait=2")
    out = podipc.producer(f"{name}?pattern=broadcast&wait=2")
    try:
        with pytest.raises(podipc.ProtocolError, match="broadcast ring"):
            podipc.consumer(f"{name}?wait=2")
    finally:
        out.abort()  # no subscriber ever came: nothing to end


def test_broadcast_options_elsewhere_name_the_channels_that_take_them() -> None:
    with pytest.raises(podipc.AddressError, match=r"runs over tcp://, unix://, shm://"):
        podipc.consumer("mq:///podipc-bcast-x?pattern=broadcast")
    with pytest.raises(podipc.AddressError, match="pattern=broadcast only"):
        podipc.consumer(f"shm:///podipc-bcast-{os.getpid()}-opt?slow=drop")
    for scheme in STREAMS:
        with pytest.raises(podipc.AddressError, match="pattern=broadcast only"):
            podipc.producer(f"{plain_url(scheme, 'opt')}?subscribers=2")
        with pytest.raises(podipc.AddressError, match="at most 4294967293 bytes"):
            podipc.producer(f"{plain_url(scheme, 'opt')}?pattern=broadcast&max_message_size=4294967294")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_close_from_another_thread_wakes_a_blocked_recv_with_channel_closed(scheme: str) -> None:
    address = url("close", scheme, subscribers=1)
    with podipc.producer(address) as out:
        inbox = podipc.consumer(address)
        assert isinstance(inbox, BroadcastSubscriber if scheme == "shm" else StreamBroadcastSubscriber)
        with pytest.raises(podipc.Timeout):
            inbox.recv(timeout=0)
        out.send(b"first")
        assert inbox.recv(timeout=5) == b"first"
        woken: list[float] = []

        def close_soon() -> None:
            time.sleep(0.3)
            woken.append(time.monotonic())
            inbox.close()

        closer = threading.Thread(target=close_soon)
        closer.start()
        with pytest.raises(podipc.ChannelClosed):
            inbox.recv_view()
        assert time.monotonic() - woken[0] < 0.1
        closer.join()
        out.send(b"after", timeout=5)  # its slot left: the producer goes on


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_asyncio_subscriber_takes_every_message(scheme: str) -> None:
    address = url("aio", scheme, subscribers=1)

    async def consume() -> list[bytes]:
        async with podipc.aio.consumer(address) as inbox:
            return [message async for message in inbox]

    def produce() -> None:
        with podipc.producer(address) as out:
            for index in range(2000):
                out.send(payload(index))

    producer = threading.Thread(target=produce)
    producer.start()
    messages = asyncio.run(consume())
    producer.join(10)
    assert messages == [payload(index) for index in range(2000)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_cli_broadcasts_to_two_subscribers_whose_summaries_agree_with_the_producers(scheme: str) -> None:
    plain = f"{plain_url(scheme, 'cli')}?wait=20"
    command = [sys.executable, "-m", "podipc"]
    as_url = f"{plain}&pattern=broadcast&subscribers=2"
    subscribers = [
        subprocess.Popen([*command, "consume", as_url], stdout=subprocess.PIPE, text=True),
        subprocess.Popen([*command, "consume", plain, "--subscribers", "2"], stdout=subprocess.PIPE, text=True),
    ]
    produced = subprocess.run(
        [*command, "produce", plain, "--subscribers", "2", "--count", "5000", "--random", "--size", "2000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    producer = json.loads(produced.stdout.strip().splitlines()[-1])
    slots = []
    for process in subscribers:
        out, _ = process.communicate(timeout=30)
        summary = json.loads(out.strip().splitlines()[-1])
        assert process.returncode == 0
        assert (summary["messages"], summary["sha256"], summary["lost"]) == (5000, producer["sha256"], 0)
        slots.append(summary["slot"])
    assert sorted(slots) == [0, 1]
    assert sorted(entry["delivered"] for entry in producer["subscribers"]) == [5000, 5000]


def produce_then_die(address: str, count: int) -> None:
    out = podipc.producer(address)
    for index in range(count):
        out.send(payload(index))
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_producer_leaves_its_subscribers_every_message_then_peer_gone(reap: list[Any]) -> None:
    address = url("producer-dies", subscribers=1)
    process = CONTEXT.Process(target=produce_then_die, args=(address, 50), daemon=True)
    reap.append(process)
    with podipc.consumer(address) as inbox:
        process.start()
        taken = [inbox.recv(timeout=10) for _ in range(50)]
        with pytest.raises(podipc.PeerGone):
            inbox.recv(timeout=10)
    assert taken == [payload(index) for index in range(50)]
    process.join(5)
    token = podipc.address.parse_address(address).token
    left = {(leftover.kind, leftover.name) for leftover in find_leftovers() if token in leftover.recorded_in}
    name = podipc.address.parse_address(address).name
    assert {("posix_shm", f"/{name}"), ("wake_fifo", f"/dev/shm/podipc.wake.{token}.space")} <= {
        item for item in left
    }, "podipc clean knows what a killed broadcast producer left"
    kinds = object_kinds()
    for kind, object_name in left:
        kinds[kind].remove(object_name)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_dead_subscribers_slot_is_taken_over_and_the_newcomer_joins_at_the_current_message(
    reap: list[Any], scheme: str
) -> None:
    address = url("takeover", scheme, subscribers=1, capacity="64KiB")
    processes, _ = start_subscribers(address, 1)
    reap.extend(processes)
    with podipc.producer(address) as out:
        out.send(payload(0))
        processes[0].kill()
        processes[0].join(5)
        with pytest.raises(podipc.PeerGone, match="every subscriber"):
            for index in range(1, 10_000):  # fills the ring, then finds the only subscriber gone
                out.send(payload(index), timeout=5)
        with podipc.consumer(address) as newcomer:
            assert newcomer.slot == 0  # type: ignore[attr-defined]
            out.send(b"welcome", timeout=5)
            assert newcomer.recv(timeout=5) == b"welcome"
            closer = threading.Thread(target=out.close, kwargs={"timeout": 5})
            closer.start()  # close() returns once the newcomer took the end
            with pytest.raises(podipc.EndOfStream):
                newcomer.recv(timeout=5)
            closer.join(5)
            assert out.closed
    assert [report.state for report in out.subscriber_reports()] == ["ended"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_producer_waits_for_every_subscriber_before_its_first_message(scheme: str) -> None:
    address = url("missing", scheme, subscribers=2, wait=0.5)
    out = podipc.producer(address)
    try:
        with podipc.consumer(address) as inbox:
            with pytest.raises(podipc.Timeout):
                out.send(b"x", timeout=0)
            with pytest.raises(podipc.PeerTimeout):
                out.send(b"x")
            with pytest.raises(podipc.Timeout):
                inbox.recv(timeout=0)
    finally:
        out.abort()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_blocked_subscribers_and_a_blocked_producer_use_almost_no_cpu(reap: list[Any], scheme: str) -> None:
    address = url("idle", scheme, subscribers=2, capacity="64KiB")
    processes, results = start_subscribers(address, 2)
    reap.extend(processes)
    with podipc.producer(address) as out:
        out.send(payload(0))
        os.kill(processes[1].pid, signal.SIGSTOP)  # the producer will block on it once the ring is full
        before = [cpu_seconds(process.pid) for process in processes[:1]]
        own_before = time.process_time()
        with pytest.raises(podipc.Timeout):
            for index in range(1, 100_000):
                out.send(payload(index), timeout=1.5)
        time.sleep(0.5)
        used = [cpu_seconds(process.pid) - spent for process, spent in zip(processes[:1], before, strict=True)]
        own = time.process_time() - own_before
        os.kill(processes[1].pid, signal.SIGCONT)
    collect(processes, results, 2)
    assert used[0] < 0.3, used  # the running subscriber waits on its FIFO, not spinning
    assert own < 0.5, own  # the producer too, while the stopped one holds it back


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_asyncio_producer_reaches_every_subscriber(reap: list[Any], scheme: str) -> None:
    address = url("aio-producer", scheme, subscribers=2, capacity="64KiB")
    processes, results = start_subscribers(address, 2)
    reap.extend(processes)
    digest = hashlib.sha256()

    async def produce() -> None:
        async with podipc.aio.producer(address) as out:
            for index in range(3000):
                await out.send(payload(index))
                digest.update(payload(index))

    asyncio.run(produce())
    for report in collect(processes, results, 2):
        assert (report["count"], report["sha256"]) == (3000, digest.hexdigest())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_close_from_a_signal_handler_wakes_a_blocked_recv(scheme: str) -> None:
    address = url("signal", scheme, subscribers=1)
    with podipc.producer(address) as out:
        inbox = podipc.consumer(address)
        out.send(b"first")
        assert inbox.recv(timeout=5) == b"first"
        previous = signal.signal(signal.SIGALRM, lambda number, frame: inbox.close())
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            began = time.monotonic()
            with pytest.raises(podipc.ChannelClosed):
                inbox.recv()
            assert time.monotonic() - began < 0.5
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_subscriber_beyond_the_slots_or_with_another_count_is_refused(scheme: str) -> None:
    address = url("full", scheme, subscribers=1)
    with podipc.producer(address), podipc.consumer(address) as first:
        assert first.slot == 0  # type: ignore[attr-defined]
        with pytest.raises(podipc.ChannelUnavailable, match=r"all (1 )?subscriber slots"):
            podipc.consumer(address)
        with pytest.raises(podipc.AddressError, match="made 1 subscriber slots"):
            podipc.consumer(address.replace("subscribers=1", "subscribers=3"))
        first.close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slow_drop_under_full_speed_every_subscriber_accounts_for_every_message(reap: list[Any], scheme: str) -> None:
    # a small ring and a producer that never waits: the subscribers are overrun again and again, mid-copy
    # too; whatever each missed must be counted exactly once, and what it took must be whole and in order
    address = url("drop-race", scheme, subscribers=4, capacity="32KiB", slow="drop")
    processes, results = start_subscribers(address, 4)
    reap.extend(processes)
    total = 50_000
    with podipc.producer(address) as out:
        for index in range(total):
            out.send(payload(index))
    for report in collect(processes, results, 4):
        assert report["in_order"]
        assert report["lost"] == report["gaps"] + total - report["next"]
        assert report["count"] + report["lost"] == total
