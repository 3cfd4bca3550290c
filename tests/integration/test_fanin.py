"""Fan-in (pattern=fanin) across real processes: many named producers into one consumer on unix://, tcp://,
mq://, sysvmq://, zmq+ipc:// and zmq+tcp://.

Every producer's stream is checked on its own: order (each payload carries its producer's
index), count and SHA-256 against what the producer itself sent; a SIGKILLed producer is
reported for itself while the others complete; names are claimed once; the pair and fan-in
hellos refuse each other clearly; the endpoint contract (close from another thread, timeout=0)
holds; the CLI and the asyncio consumer do the same.
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
import threading
import time
from typing import Any

import pytest

import podipc
from podipc.address import parse_address
from tests.commands import PODIPC

from .harness import CONTEXT, url_for, wait_until

pytestmark = pytest.mark.timeout(120)

ZMQ_SCHEMES = ("zmq+ipc", "zmq+tcp")
FANIN_SCHEMES = ("unix", "unix-abstract", "tcp", "mq", "sysvmq", *ZMQ_SCHEMES)
QUEUE_SCHEMES = ("mq", "sysvmq")
SLOT_SCHEMES = (*QUEUE_SCHEMES, *ZMQ_SCHEMES)
"""The fan-ins whose producers claim presence slots (podipc.queue_fanin, podipc.transports.zmq.fanin)."""
INDEX = struct.Struct(">Q")
BODY = bytes(range(56))
"""With the index: 64-byte messages."""
CLOSE_WAKE_LIMIT_SECONDS = 0.1


def message(index: int) -> bytes:
    return INDEX.pack(index) + BODY


def produce(url: str, name: str, count: int, results: Any, pace: float = 0.0) -> None:
    """Send `count` messages as `name`, close (delivered), and report (name, count, sha256)."""
    digest = hashlib.sha256()
    with podipc.producer(url, name=name, wait=30) as channel:
        for index in range(count):
            payload = message(index)
            channel.send(payload)
            digest.update(payload)
            if pace:
                time.sleep(pace)
    results.put((name, count, digest.hexdigest()))


def receive_all(consumer: podipc.Consumer) -> dict[str, int]:
    """recv_from until the end of stream, checking each producer's order; messages per producer."""
    expected: dict[str, int] = {}
    while True:
        try:
            name, payload = consumer.recv_from(timeout=60)  # type: ignore[attr-defined]
        except podipc.EndOfStream:
            return expected
        index = INDEX.unpack_from(payload)[0]
        assert index == expected.get(name, 0), f"{name}: got message {index}, expected {expected.get(name, 0)}"
        assert payload[INDEX.size :] == BODY
        expected[name] = index + 1


def collect(results: Any, count: int) -> dict[str, tuple[int, str]]:
    return {name: (sent, digest) for name, sent, digest in (results.get(timeout=60) for _ in range(count))}


@pytest.mark.parametrize("scheme", FANIN_SCHEMES)
def test_four_producers_each_deliver_their_whole_stream_in_order(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    count = 25_000  # 4 x 25 000 = 10^5 messages
    names = [f"app-{number}" for number in range(4)]
    with podipc.consumer(url, pattern="fanin", producers=4, wait=30) as consumer:
        processes = [CONTEXT.Process(target=produce, args=(url, name, count, results)) for name in names]
        for process in processes:
            process.start()
        started = time.monotonic()
        received = receive_all(consumer)
        seconds = time.monotonic() - started
        sent = collect(results, 4)
        senders = {sender.name: sender for sender in consumer.senders}
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    print(f"\nfanin {scheme:14} 4 producers x {count} x 64 B in {seconds:.2f} s ({4 * count / seconds:,.0f} msg/s)")
    assert received == dict.fromkeys(names, count)
    assert sorted(senders) == sorted(names)
    for name in names:
        assert (senders[name].messages, senders[name].sha256) == sent[name]
        assert senders[name].bytes == count * 64
        assert senders[name].ended == "end of stream"
    assert consumer.ended


def endless(url: str, name: str, sent: Any) -> None:
    """Send a message every millisecond until killed."""
    with podipc.producer(url, name=name, wait=30) as channel:
        index = 0
        while True:
            channel.send(message(index))
            index += 1
            sent.value = index
            time.sleep(0.001)


@pytest.mark.parametrize("scheme", ["unix", "tcp", *SLOT_SCHEMES])
def test_a_killed_producer_is_reported_alone_and_the_others_complete(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    sent = CONTEXT.Value("q", 0)
    victim = CONTEXT.Process(target=endless, args=(url, "victim", sent))
    others = [CONTEXT.Process(target=produce, args=(url, f"app-{n}", 5000, results, 0.0001)) for n in range(3)]
    with podipc.consumer(url, pattern="fanin", producers=4, wait=30) as consumer:
        victim.start()
        for process in others:
            process.start()
        seen: dict[str, int] = {}  # a queue holds a few messages only: receive while the victim sends
        while seen.get("victim", 0) < 20:
            name, _ = consumer.recv_from(timeout=30)
            seen[name] = seen.get(name, 0) + 1
        os.kill(victim.pid or 0, signal.SIGKILL)
        victim.join(10)
        # the dead producer freed its name and its place: a restarted one completes the fourth stream
        restarted = CONTEXT.Process(target=produce, args=(url, "victim", 100, results))
        restarted.start()
        with pytest.raises(podipc.EndOfStream):
            while True:
                consumer.recv(timeout=60)
        sent_by = collect(results, 4)
        senders = consumer.senders
    for process in [*others, restarted]:
        process.join(30)
        assert process.exitcode == 0
    died = [sender for sender in senders if sender.ended == "died"]
    assert [sender.name for sender in died] == ["victim"]
    assert "PeerGone" in died[0].error
    assert 20 <= died[0].messages <= sent.value + 1  # killed between a send and its count: one more arrived
    completed = {sender.name: sender for sender in senders if sender.ended == "end of stream"}
    assert sorted(completed) == ["app-0", "app-1", "app-2", "victim"]
    for name, (count, digest) in sent_by.items():
        assert (completed[name].messages, completed[name].sha256) == (count, digest)


def produce_one(url: str, name: str, payload: bytes) -> None:
    """Send one message as `name` ('': a pair producer) and close."""
    with podipc.producer(url, name=name, wait=10) as producer:
        producer.send(payload)


def test_a_second_live_producer_with_the_same_name_is_refused_until_the_first_ends() -> None:
    url = url_for("unix")
    with podipc.consumer(url, pattern="fanin", wait=10) as consumer:
        first = podipc.producer(url, name="app", wait=10)
        first.send(b"one")
        assert consumer.recv_from(timeout=10) == ("app", b"one")  # type: ignore[attr-defined]
        with podipc.producer(url, name="app", wait=10) as second:
            with pytest.raises(podipc.NameTaken, match="another live producer is named 'app'"):
                second.send(b"two")
            second.abort()
        closer = threading.Thread(target=first.close)  # close() waits for the consumer to take the end
        closer.start()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)
        closer.join()
        third = threading.Thread(target=produce_one, args=(url, "app", b"three"))
        third.start()
        assert consumer.recv_from(timeout=10) == ("app", b"three")  # type: ignore[attr-defined]
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)
        third.join()
        assert [(s.name, s.messages, s.ended) for s in consumer.senders] == [
            ("app", 1, "end of stream"),
            ("app", 1, "end of stream"),
        ]


def test_producers_beyond_the_limit_are_refused() -> None:
    url = url_for("tcp")
    with podipc.consumer(url, pattern="fanin", producers=1, wait=10) as consumer:
        first = podipc.producer(url, name="a", wait=10)
        first.send(b"x")
        with podipc.producer(url, name="b", wait=10) as second:
            with pytest.raises(podipc.ChannelUnavailable, match="takes no more producers"):
                second.send(b"y")
            second.abort()
        closer = threading.Thread(target=first.close)
        closer.start()
        assert list(consumer) == [b"x"]
        closer.join()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_a_fanin_producer_at_a_pair_consumer_is_told_so(scheme: str) -> None:
    url = url_for(scheme)
    with podipc.consumer(url, wait=10) as consumer:
        with podipc.producer(url, name="app", wait=10) as producer:
            with pytest.raises(podipc.ProtocolError, match=r"takes one producer \(pattern=pair\)"):
                producer.send(b"x")
            producer.abort()
        pair = threading.Thread(target=produce_one, args=(url, "", b"pair"))  # the pair consumer still takes one
        pair.start()
        assert list(consumer) == [b"pair"]
        pair.join()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_a_pair_producer_at_a_fanin_consumer_is_told_so(scheme: str) -> None:
    url = url_for(scheme)
    with podipc.consumer(url, pattern="fanin", wait=1) as consumer:
        with podipc.producer(url, wait=10) as producer:
            with pytest.raises(podipc.ProtocolError, match=r"gathers many producers \(pattern=fanin\)"):
                producer.send(b"x")
            producer.abort()
        with pytest.raises(podipc.PeerTimeout, match="other pattern"):
            consumer.recv(timeout=5)


@pytest.mark.parametrize("scheme", ["unix", *SLOT_SCHEMES])
@pytest.mark.parametrize("attached", [False, True], ids=["no-producer", "idle-producer"])
def test_close_from_another_thread_wakes_a_blocked_recv_within_100_ms(scheme: str, attached: bool) -> None:
    url = url_for(scheme)
    consumer = podipc.consumer(url, pattern="fanin", wait=30)
    producer = podipc.producer(url, name="idle", wait=10)
    if attached:
        producer.send(b"first")
        assert consumer.recv(timeout=10) == b"first"
    closed_at: list[float] = []

    def close_soon() -> None:
        time.sleep(0.3)
        closed_at.append(time.monotonic())
        consumer.close()

    closer = threading.Thread(target=close_soon)
    closer.start()
    try:
        with pytest.raises(podipc.ChannelClosed):
            consumer.recv()
        woken_after = time.monotonic() - closed_at[0]
    finally:
        closer.join()
        producer.abort()
    assert woken_after < CLOSE_WAKE_LIMIT_SECONDS, f"woken {woken_after * 1000:.0f} ms after close()"


def test_timeout_zero_tries_once_now() -> None:
    url = url_for("tcp")
    with podipc.consumer(url, pattern="fanin", wait=10) as consumer:
        started = time.monotonic()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0)
        assert consumer.try_recv() is None
        assert time.monotonic() - started < 0.05
        producer = podipc.producer(url, name="a", wait=10)
        try:
            producer.send(b"now")
            assert wait_until(lambda: consumer.poll(0.05), 10)
            assert consumer.recv(timeout=0) == b"now"
            assert consumer.last_sender == "a"  # type: ignore[attr-defined]
        finally:
            producer.abort()


def test_other_channels_refuse_fanin_and_say_which_have_it() -> None:
    with pytest.raises(podipc.AddressError, match=r"it runs over .*unix://.*mq://"):
        podipc.consumer(url_for("shm"), pattern="fanin")
    with pytest.raises(podipc.AddressError, match="name=app is fan-in"):
        podipc.producer(url_for("file"), name="app")


@pytest.mark.parametrize("scheme", ["unix-abstract", *SLOT_SCHEMES])
def test_the_asyncio_consumer_takes_fanin_with_recv_from(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    processes = [CONTEXT.Process(target=produce, args=(url, name, 2000, results)) for name in ("a", "b")]

    async def consume() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with podipc.aio.consumer(url, pattern="fanin", producers=2, wait=30) as inbox:
            for process in processes:
                process.start()
            while True:
                try:
                    name, payload = await inbox.recv_from(timeout=60)
                except podipc.EndOfStream:
                    break
                assert INDEX.unpack_from(payload)[0] == counts.get(name, 0)
                counts[name] = counts.get(name, 0) + 1
            assert {s.name: s.sha256 for s in inbox.endpoint.senders} == {  # type: ignore[union-attr]
                name: digest for name, (_, digest) in collect(results, 2).items()
            }
        return counts

    assert asyncio.run(consume()) == {"a": 2000, "b": 2000}
    for process in processes:
        process.join(30)
        assert process.exitcode == 0


def test_a_plain_socket_producer_speaking_the_documented_wire_and_one_sending_garbage() -> None:
    name = f"podipc-fanin-plain-{os.getpid()}"
    url = f"unix://@{name}"
    with podipc.consumer(url, pattern="fanin", wait=10) as consumer:  # producers=0: until closed
        plain, garbage = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
        for sock, who in ((plain, b"plain"), (garbage, b"noisy")):
            sock.connect("\0" + name)
            sock.sendall(b"PODIPC\x00\x02" + struct.pack(">H", len(who)) + who)
            assert sock.recv(8) == b"PODIPC\x00\x02"
        garbage.sendall(struct.pack(">I", 0xFFFFFFF0) + b"not a frame")
        plain.sendall(struct.pack(">I", 5) + b"hello" + struct.pack(">I", 0xFFFFFFFF))
        assert consumer.recv(timeout=10) == b"hello"
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)  # takes the end of stream (acknowledged) and the garbage
        assert plain.recv(1) == b"\x06"
        by_name = {sender.name: sender for sender in consumer.senders}
        assert by_name["plain"].ended == "end of stream" and by_name["plain"].messages == 1
        assert by_name["noisy"].ended == "died" and "ProtocolError" in by_name["noisy"].error
        plain.close()
        garbage.close()


@pytest.mark.parametrize("scheme", ZMQ_SCHEMES)
def test_zmq_peers_posing_as_a_producer_or_sending_garbage_are_skipped_and_the_producer_completes(
    scheme: str,
) -> None:
    """A raw DEALER whose routing id names a live producer's slot with a wrong claim, or names none, or
    sends multipart garbage, is skipped and counted; it neither attaches nor disturbs the real producer."""
    import zmq

    url = url_for(scheme)
    endpoint = url.replace(f"{scheme}://", "ipc://" if scheme == "zmq+ipc" else "tcp://")
    context = zmq.Context()
    peers = []
    with podipc.consumer(url, pattern="fanin", producers=1, wait=10) as consumer:
        producer = podipc.producer(url, name="real", wait=10)
        producer.send(b"first")
        assert consumer.recv_from(timeout=10) == ("real", b"first")  # type: ignore[attr-defined]
        real_id = f"{producer.slot}.".encode()  # type: ignore[attr-defined]
        for identity, frames in (
            (real_id + b"0123456789abcdef", [b"podipc", b"sos"]),  # the slot of a live producer, a wrong claim
            (b"2.0123456789abcdef", [b"podipc", b"sos"]),  # a slot nobody holds
            (b"junk", [b"a", b"b", b"c"]),
        ):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.ROUTING_ID, identity)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(endpoint)
            peer.send_multipart(frames)
            peer.send(b"posing")
            peers.append(peer)
        assert wait_until(lambda: consumer.try_recv() is None and consumer.skipped == 6, 10)
        producer.send(b"second")
        assert consumer.recv_from(timeout=10) == ("real", b"second")  # type: ignore[attr-defined]
        closer = threading.Thread(target=producer.close)
        closer.start()
        with pytest.raises(podipc.EndOfStream):
            consumer.recv(timeout=10)
        closer.join(10)
        assert consumer.skipped == 6
        assert [(s.name, s.messages, s.ended) for s in consumer.senders] == [("real", 2, "end of stream")]
    for peer in peers:
        peer.close()
    context.term()


@pytest.mark.parametrize("scheme", ["tcp", *SLOT_SCHEMES])
def test_threads_sharing_a_fanin_consumer_get_every_message_once(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    count = 10_000
    processes = [CONTEXT.Process(target=produce, args=(url, name, count, results)) for name in ("a", "b", "c")]
    taken: list[list[tuple[str, int]]] = [[], []]

    def take(into: list[tuple[str, int]]) -> None:
        while True:
            try:
                name, payload = consumer.recv_from(timeout=60)  # type: ignore[attr-defined]
            except podipc.EndOfStream:
                return
            into.append((name, INDEX.unpack_from(payload)[0]))

    with podipc.consumer(url, pattern="fanin", producers=3, wait=30) as consumer:
        for process in processes:
            process.start()
        threads = [threading.Thread(target=take, args=(into,)) for into in taken]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        collect(results, 3)
    for process in processes:
        process.join(30)
    every = sorted(taken[0] + taken[1])
    assert every == sorted((name, index) for name in ("a", "b", "c") for index in range(count))
    for into in taken:  # each thread sees each producer's messages in that producer's order
        for name in ("a", "b", "c"):
            indexes = [index for sender, index in into if sender == name]
            assert indexes == sorted(indexes)


@pytest.mark.parametrize("scheme", SLOT_SCHEMES)
def test_a_queue_refuses_a_second_live_producer_with_the_same_name_until_the_first_leaves(scheme: str) -> None:
    url = url_for(scheme)
    with podipc.consumer(url, pattern="fanin", wait=10) as consumer:
        first = podipc.producer(url, name="app", wait=10)
        first.send(b"one")
        assert consumer.recv_from(timeout=10) == ("app", b"one")  # type: ignore[attr-defined]
        with pytest.raises(podipc.NameTaken, match="another live producer is named 'app'"):
            podipc.producer(url, name="app", wait=10)
        closer = threading.Thread(target=first.close)  # close() waits for the consumer to acknowledge the end
        closer.start()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)
        closer.join(10)
        assert not closer.is_alive()
        third = threading.Thread(target=produce_one, args=(url, "app", b"three"))
        third.start()
        assert consumer.recv_from(timeout=10) == ("app", b"three")  # type: ignore[attr-defined]
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.5)
        third.join(10)
        assert [(s.name, s.messages, s.ended) for s in consumer.senders] == [
            ("app", 1, "end of stream"),
            ("app", 1, "end of stream"),
        ]


@pytest.mark.parametrize("scheme", SLOT_SCHEMES)
def test_a_queue_tells_pair_and_fanin_sides_apart(scheme: str) -> None:
    url = url_for(scheme)
    with podipc.consumer(url, wait=10) as consumer:
        with podipc.producer(url, name="app", wait=10) as producer:
            with pytest.raises(podipc.ChannelUnavailable, match=r"takes one producer \(pattern=pair\)"):
                producer.send(b"x")
            producer.abort()
        pair = threading.Thread(target=produce_one, args=(url, "", b"pair"))
        pair.start()
        assert list(consumer) == [b"pair"]
        pair.join(10)
    url = url_for(scheme)
    with podipc.consumer(url, pattern="fanin", wait=10) as consumer:
        with podipc.producer(url, wait=10) as producer:
            with pytest.raises(podipc.ChannelUnavailable, match=r"gathers many producers \(pattern=fanin\)"):
                producer.send(b"x")
            producer.abort()
        with pytest.raises(podipc.Timeout):
            consumer.recv(timeout=0.2)


@pytest.mark.parametrize("scheme", ["unix", *SLOT_SCHEMES])
def test_cli_consume_with_producers_2_reports_each_producer_as_it_sent(scheme: str) -> None:
    url = url_for(scheme)
    consumer = subprocess.Popen([*PODIPC, "consume", url, "--producers", "2"], stdout=subprocess.PIPE, text=True)
    try:
        producers = [
            subprocess.Popen(
                [*PODIPC, "produce", url, "--name", name, "--count", str(count), "--size", "100", "--random"],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PODIPC_SEED": str(count)},
            )
            for name, count in (("app-a", 3000), ("app-b", 2000))
        ]
        summaries = {}
        for name, process in zip(("app-a", "app-b"), producers, strict=True):
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            summaries[name] = json.loads(out.strip().splitlines()[-1])
        out, _ = consumer.communicate(timeout=60)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate()
    assert consumer.returncode == 0
    line = json.loads(out.strip().splitlines()[-1])
    assert line["messages"] == 5000
    reported = {entry["name"]: entry for entry in line["producers"]}
    assert sorted(reported) == ["app-a", "app-b"]
    for name, summary in summaries.items():
        entry = reported[name]
        assert (entry["messages"], entry["bytes"], entry["sha256"]) == (
            summary["messages"],
            summary["bytes"],
            summary["sha256"],
        )
        assert entry["ended"] == "end of stream"


def send_then_die(url: str, name: str, count: int) -> None:
    """Send `count` messages as `name`, then die by SIGKILL without closing."""
    producer = podipc.producer(url, name=name, wait=10)
    for index in range(count):
        producer.send(message(index))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_a_producer_dead_before_the_consumer_read_it_is_reported_after_what_it_sent(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    with podipc.consumer(url, pattern="fanin", producers=1, wait=30) as consumer:
        early = CONTEXT.Process(target=send_then_die, args=(url, "early", 3))
        early.start()
        early.join(30)
        assert early.exitcode == -signal.SIGKILL
        late = CONTEXT.Process(target=produce, args=(url, "late", 2, results))  # may take the dead one's slot
        late.start()
        received = receive_all(consumer)
        late.join(30)
        senders = {sender.name: sender for sender in consumer.senders}
    assert late.exitcode == 0
    assert received == {"early": 3, "late": 2}
    assert (senders["early"].messages, senders["early"].ended) == (3, "died")
    assert "PeerGone" in senders["early"].error
    assert (senders["late"].messages, senders["late"].sha256, senders["late"].ended) == (
        2,
        collect(results, 1)["late"][1],
        "end of stream",
    )


def put_raw(url: str, messages: list[tuple[int, bytes]]) -> None:
    """Put (tag, body) messages into a fan-in queue as a plain script would (mq: priority 2, the tag before)."""
    address = parse_address(url)
    if address.scheme == "mq":
        import posix_ipc

        queue = posix_ipc.MessageQueue("/" + address.name, 0)
        for tag, body in messages:
            queue.send(struct.pack(">H", tag) + body, priority=2)
        queue.send(b"no tag at all", priority=1)
        queue.close()
    else:
        import sysv_ipc

        queue = sysv_ipc.MessageQueue(address.key)
        for tag, body in messages:
            queue.send(body, True, tag)


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_queue_messages_of_no_attached_producer_are_skipped_and_the_producers_complete(scheme: str) -> None:
    url = url_for(scheme)
    results = CONTEXT.Queue()
    with podipc.consumer(url, pattern="fanin", producers=1, wait=30) as consumer:
        # data and an end of stream for slot 9, which never started; a start for slot 200 (no such slot)
        put_raw(url, [((9 << 4) | 1, b"forged"), ((9 << 4) | 2, b""), ((200 << 4) | 4, b"0123 ghost")])
        process = CONTEXT.Process(target=produce, args=(url, "real", 100, results))
        process.start()
        received = receive_all(consumer)
        process.join(30)
        senders = consumer.senders
        skipped = consumer.skipped
    assert process.exitcode == 0
    assert received == {"real": 100}
    assert [(sender.name, sender.messages, sender.ended) for sender in senders] == [("real", 100, "end of stream")]
    assert senders[0].sha256 == collect(results, 1)["real"][1]
    assert skipped == (4 if scheme == "mq" else 3)


@pytest.mark.parametrize("scheme", QUEUE_SCHEMES)
def test_close_from_another_thread_wakes_a_producer_blocked_on_a_full_queue_and_still_ends_its_stream(
    scheme: str,
) -> None:
    url = url_for(scheme)
    with podipc.consumer(url, pattern="fanin", producers=1, wait=30) as consumer:
        producer = podipc.producer(url, name="filler", wait=10)
        sent = [0]
        failure: list[BaseException] = []
        woke_at: list[float] = []

        def send_forever() -> None:
            try:
                while True:
                    producer.send(message(sent[0]))
                    sent[0] += 1
            except BaseException as error:
                failure.append(error)
                woke_at.append(time.monotonic())

        sender = threading.Thread(target=send_forever, daemon=True)
        sender.start()
        previous = -1
        while previous != sent[0]:  # the count stops moving once a send blocks on the full queue
            previous = sent[0]
            time.sleep(0.3)
        closed_at = time.monotonic()
        closer = threading.Thread(target=producer.close)  # waits for the consumer to acknowledge the end
        closer.start()
        sender.join(10)
        assert isinstance(failure[0], podipc.ChannelClosed)
        assert woke_at[0] - closed_at < CLOSE_WAKE_LIMIT_SECONDS
        assert receive_all(consumer) == {"filler": sent[0]}
        closer.join(10)
        assert not closer.is_alive()
        assert [(s.name, s.messages, s.ended) for s in consumer.senders] == [("filler", sent[0], "end of stream")]
