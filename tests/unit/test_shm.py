"""shm:// across real processes: order, wrap-around, zero-copy, liveness, recovery, garbage, cleanup, idle CPU."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import mmap
import multiprocessing
import os
import re
import resource
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address
from podipc.clean import find_leftovers
from podipc.errors import ChannelUnavailable, EndOfStream, MessageTooLarge, PeerGone, ProtocolError, Timeout
from podipc.presence import Presence
from podipc.transports import shm
from podipc.transports.shm import fence, segment
from podipc.transports.shm.layout import (
    HEADER_SIZE,
    KIND_DATA,
    KIND_END,
    KIND_PACK,
    KIND_WRAP,
    PACK_HEADER,
    RECORD_HEADER,
    Record,
    decode_header,
    decode_record,
    encode_header,
    record_size,
)

pytestmark = pytest.mark.timeout(60)
FORK = multiprocessing.get_context("fork")
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire" / "shm.md"
SMALL_RING = {"capacity": 4096, "max_message_size": 1500}


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh ring name; afterwards nothing of it may be left in /dev/shm (then it is cleaned anyway)."""
    ring = f"podipc-test-shm-{uuid.uuid4().hex[:10]}"
    yield ring
    left = leftovers(ring)
    for path in left:
        os.unlink(path)
    assert not left, f"left in /dev/shm: {left}"


def leftovers(ring: str) -> list[str]:
    return sorted(path for path in glob.glob("/dev/shm/*") + glob.glob("/dev/shm/.*") if ring in path)


def url(ring: str) -> str:
    return f"shm:///{ring}"


def messages(count: int, largest: int, seed: int = 1) -> list[bytes]:
    """Mixed sizes 0..largest, always including 0 and largest."""
    import random

    rng = random.Random(seed)
    sizes = [0, largest, 1, 7, 8, 9] + [rng.randint(0, largest) for _ in range(count - 6)]
    return [rng.randbytes(size) for size in sizes]


def produce(ring: str, payloads: list[bytes], options: dict[str, Any]) -> None:
    with podipc.producer(url(ring), **options) as channel:
        for payload in payloads:
            channel.send(payload)


def consume_digest(ring: str, options: dict[str, Any], result: Any) -> None:
    digest, count = hashlib.sha256(), 0
    with podipc.consumer(url(ring), **options) as channel:
        for message in channel:
            digest.update(len(message).to_bytes(8, "little") + message)
            count += 1
    result.put((count, digest.hexdigest()))


def expected_digest(payloads: list[bytes]) -> str:
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(len(payload).to_bytes(8, "little") + payload)
    return digest.hexdigest()


def close_in_background(producer: podipc.Producer) -> threading.Thread:
    """Close a producer in a thread: its close waits for this process's consumer to take the end of stream."""
    closer = threading.Thread(target=producer.close, args=(10,))
    closer.start()
    return closer


def start(target: Any, *args: Any) -> Any:
    process = FORK.Process(target=target, args=args, daemon=True)
    process.start()
    return process


# --- streams ----------------------------------------------------------------


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_order_and_boundaries_kept_across_wrap_around_in_either_start_order(name: str, consumer_first: bool) -> None:
    payloads = messages(3000, SMALL_RING["max_message_size"])
    result = FORK.Queue()
    if consumer_first:
        consumer = start(consume_digest, name, SMALL_RING, result)
        time.sleep(0.2)
        produce(name, payloads, SMALL_RING)
    else:
        producer = start(produce, name, payloads, SMALL_RING)
        time.sleep(0.3)
        consumer = start(consume_digest, name, SMALL_RING, result)
    assert result.get(timeout=30) == (len(payloads), expected_digest(payloads))
    consumer.join(10)
    if not consumer_first:
        producer.join(10)
        assert producer.exitcode == 0


def test_max_size_and_empty_messages_arrive_whole_and_larger_is_refused(name: str) -> None:
    options = {"capacity": 65536, "max_message_size": 32768}
    result = FORK.Queue()
    consumer = start(consume_digest, name, options, result)
    payloads = [b"", os.urandom(32768), b"", b"x", os.urandom(32768)]
    with podipc.producer(url(name), **options) as channel:
        with pytest.raises(MessageTooLarge, match="32769 bytes"):
            channel.send(bytes(32769))
        for payload in payloads:
            channel.send(payload)
        with pytest.raises(MessageTooLarge):
            channel.send(memoryview(bytes(32769)))
    assert result.get(timeout=20) == (len(payloads), expected_digest(payloads))
    consumer.join(10)


def test_producer_adopts_the_max_message_size_of_the_consumers_ring(name: str) -> None:
    with podipc.consumer(url(name), capacity=8192, max_message_size=100) as consumer:
        producer = podipc.producer(url(name))
        producer.send(b"a")
        assert producer.max_message_size == 100
        with pytest.raises(MessageTooLarge, match="101 bytes"):
            producer.send(bytes(101))
        closer = close_in_background(producer)
        assert consumer.recv(5) == b"a"
        with pytest.raises(EndOfStream):
            consumer.recv(5)
        closer.join()


def test_recv_view_is_read_only_into_the_ring_and_released_by_the_next_receive(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        producer = podipc.producer(url(name), **SMALL_RING)
        producer.send(b"first")
        producer.send(b"")
        producer.send(b"third message")
        closer = close_in_background(producer)
        view = consumer.recv_view(5)
        assert bytes(view) == b"first" and view.readonly
        with pytest.raises(TypeError):
            view[0] = 0  # type: ignore[index]
        assert consumer.recv(5) == b""
        with pytest.raises(ValueError, match="released"):
            bytes(view)
        second = consumer.recv_view(5)
        assert second.tobytes() == b"third message"
        with pytest.raises(EndOfStream):
            consumer.recv_view(5)
        with pytest.raises(ValueError, match="released"):
            bytes(second)
        closer.join()


def test_recv_view_frees_room_for_the_producer_only_when_released(name: str) -> None:
    options = {"capacity": 4096, "max_message_size": 2000}
    with podipc.consumer(url(name), **options) as consumer:
        producer = podipc.producer(url(name), **options)
        producer.send(bytes(2000))
        producer.send(bytes(2000))
        held = consumer.recv_view(5)
        with pytest.raises(Timeout):
            producer.send(b"y" * 2000, timeout=0.3)  # both slots still taken: one queued, one held
        assert len(held) == 2000
        consumer.recv_view(5)  # releases the first
        producer.send(b"y" * 2000, timeout=5)
        assert consumer.recv(5) == b"y" * 2000
        closer = close_in_background(producer)
        with pytest.raises(EndOfStream):
            consumer.recv(5)
        closer.join()


def test_loan_and_commit_send_in_place_with_a_shorter_length(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        producer = podipc.producer(url(name), **SMALL_RING)
        assert isinstance(producer, shm.ShmProducer)
        with pytest.raises(ValueError, match="0 bytes or more"):
            producer.loan(-1)
        for round_number in range(20):  # goes around the 4 KiB ring several times
            buffer = producer.loan(1000, timeout=5)
            buffer[:5] = b"hello"
            buffer[5:7] = round_number.to_bytes(2, "big")
            producer.commit(7)
            assert consumer.recv(5) == b"hello" + round_number.to_bytes(2, "big")
        closer = close_in_background(producer)
        with pytest.raises(EndOfStream):
            consumer.recv(5)
        closer.join()


# --- liveness ---------------------------------------------------------------


def produce_then_hang(ring: str, count: int, options: dict[str, Any]) -> None:
    channel = podipc.producer(url(ring), **options)
    for index in range(count):
        channel.send(index.to_bytes(4, "big"))
    time.sleep(60)


def consume_then_hang(ring: str, count: int, options: dict[str, Any]) -> None:
    channel = podipc.consumer(url(ring), **options)
    for _ in range(count):
        channel.recv()
    time.sleep(60)


def test_killed_producer_is_peer_gone_within_2_seconds_for_a_waiting_consumer(name: str) -> None:
    producer = start(produce_then_hang, name, 3, SMALL_RING)
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        assert [consumer.recv(10) for _ in range(3)] == [index.to_bytes(4, "big") for index in range(3)]
        os.kill(producer.pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(PeerGone, match="producer"):
            consumer.recv(10)
        assert time.monotonic() - began < 2.0
    producer.join(5)


def test_killed_consumer_is_peer_gone_within_2_seconds_for_a_producer_on_a_full_ring(name: str) -> None:
    consumer = start(consume_then_hang, name, 1, SMALL_RING)
    with podipc.producer(url(name), **SMALL_RING) as producer:
        producer.send(b"taken", timeout=10)
        with pytest.raises(Timeout):
            while True:  # fill the ring
                producer.send(bytes(1000), timeout=0.5)
        os.kill(consumer.pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(PeerGone, match="consumer"):
            producer.send(bytes(1000), timeout=10)
        assert time.monotonic() - began < 2.0
        producer.abort()
    consumer.join(5)
    assert leftovers(name)  # the dead consumer's segment stays until the next consumer recovers it
    with podipc.consumer(url(name), **SMALL_RING):
        pass


def test_stale_segment_of_a_killed_run_is_recovered_on_open(name: str) -> None:
    consumer = start(consume_then_hang, name, 0, SMALL_RING)
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.join(5)
    stale = leftovers(name)
    assert f"/dev/shm/{name}" in stale and f"/dev/shm/sem.{name}.data" in stale
    recorded = {(leftover.kind, leftover.name) for leftover in find_leftovers()}
    assert {("posix_shm", f"/{name}"), ("posix_sem", f"/{name}.data"), ("posix_sem", f"/{name}.space")} <= recorded
    result = FORK.Queue()
    fresh = start(consume_digest, name, SMALL_RING, result)
    payloads = messages(50, 1000)
    produce(name, payloads, SMALL_RING)
    assert result.get(timeout=20) == (50, expected_digest(payloads))
    fresh.join(5)


def test_a_second_consumer_is_refused_while_the_first_lives(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING):
        with pytest.raises(ChannelUnavailable, match="one consumer"):
            podipc.consumer(url(name), **SMALL_RING)
        assert os.path.exists(f"/dev/shm/sem.{name}.data")  # the refused one removed nothing


def test_consumer_that_closes_early_makes_a_blocked_producer_peer_gone(name: str) -> None:
    consumer = podipc.consumer(url(name), **SMALL_RING)
    with podipc.producer(url(name), **SMALL_RING) as producer:
        with pytest.raises(Timeout):
            while True:
                producer.send(bytes(1000), timeout=0.3)
        consumer.close()
        with pytest.raises(PeerGone, match="consumer"):
            producer.send(bytes(1000), timeout=5)
        producer.abort()


def test_recv_times_out_while_the_producer_is_quiet(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        producer = podipc.producer(url(name), **SMALL_RING)
        producer.send(b"one")
        assert consumer.recv(5) == b"one"
        began = time.monotonic()
        with pytest.raises(Timeout):
            consumer.recv(0.3)
        assert 0.25 < time.monotonic() - began < 2.0
        producer.abort()


# --- garbage ----------------------------------------------------------------


def test_corrupt_header_is_a_protocol_error_for_the_producer(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING):
        with open(f"/dev/shm/{name}", "r+b") as segment:
            segment.write(b"GARBAGE!")
        with podipc.producer(url(name), **SMALL_RING) as producer:
            with pytest.raises(ProtocolError, match="magic"):
                producer.send(b"x", timeout=5)
            producer.abort()


def write_raw(ring: str, offset: int, data: bytes) -> None:
    with open(f"/dev/shm/{ring}", "r+b") as segment:
        segment.seek(offset)
        segment.write(data)


@pytest.mark.parametrize(
    ("record", "write_index", "message"),
    [
        (RECORD_HEADER.pack(1 << 30, KIND_DATA), 8 + 1024, "max message size"),
        (RECORD_HEADER.pack(1400, KIND_DATA), 16, "beyond the write index"),
        (RECORD_HEADER.pack(0, 7), 8, "unknown kind"),
        (RECORD_HEADER.pack(0, KIND_DATA), 5000, "out of range"),
    ],
    ids=["length-beyond-limit", "length-beyond-write-index", "unknown-kind", "index-beyond-capacity"],
)
def test_garbage_record_is_a_protocol_error_for_the_consumer(
    name: str, record: bytes, write_index: int, message: str
) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        write_raw(name, HEADER_SIZE, record)
        write_raw(name, 64, write_index.to_bytes(8, "little"))
        with pytest.raises(ProtocolError, match=message):
            consumer.recv(2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=400), st.integers(min_value=0, max_value=1 << 20))
def test_header_decoder_fuzzed_raises_only_protocol_error(data: bytes, segment_bytes: int) -> None:
    try:
        header = decode_header(data, segment_bytes)
    except ProtocolError:
        return
    assert HEADER_SIZE + header.capacity <= segment_bytes
    assert header.read_index <= header.write_index <= header.read_index + header.capacity


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=4096),
    st.integers(min_value=0, max_value=1 << 64 - 1),
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=0, max_value=5000),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, (1 << 32) - 1), st.integers(0, 4)), max_size=4),
)
def test_record_decoder_fuzzed_stays_inside_the_ring(
    ring: bytes, base: int, read_offset: int, used: int, planted: list[tuple[int, int, int]]
) -> None:
    capacity, max_message_size = 4096, 2048
    segment = bytearray(encode_header(capacity, max_message_size) + ring.ljust(capacity, b"\0"))
    for position, length, kind in planted:
        RECORD_HEADER.pack_into(segment, HEADER_SIZE + position // 8 * 8, length, kind)
    read_index = (base + read_offset) // 8 * 8
    write_index = read_index + used // 8 * 8 if used % 3 else read_index + used
    try:
        record = decode_record(segment, capacity, max_message_size, read_index, write_index)
    except ProtocolError:
        return
    assert isinstance(record, Record)
    assert HEADER_SIZE <= record.payload_offset <= record.payload_offset + record.length <= HEADER_SIZE + capacity
    assert read_index < record.next_read_index <= write_index
    assert record.kind in (KIND_DATA, KIND_WRAP, KIND_END)
    if record.kind == KIND_DATA:
        assert record.next_read_index - read_index == record_size(record.length) <= capacity


# --- memory ordering ----------------------------------------------------------


def test_threads_fencing_at_once_never_release_each_others_lock() -> None:
    """A producer closing in one thread while its consumer sleeps in another both fence."""
    errors: list[BaseException] = []

    def fence_often() -> None:
        try:
            for _ in range(20000):
                fence.full_fence()
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between the fence's release and its acquire
    try:
        threads = [threading.Thread(target=fence_often) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)


# --- objects, modes, availability --------------------------------------------


def test_objects_have_the_mode_and_vanish_after_a_clean_stream(name: str) -> None:
    for mode in (0o600, 0o660):
        with podipc.consumer(url(name), mode=mode, **SMALL_RING) as consumer:
            producer = podipc.producer(url(name), mode=mode, **SMALL_RING)
            producer.send(b"x")
            created = leftovers(name)
            assert f"/dev/shm/{name}" in created
            assert f"/dev/shm/sem.{name}.data" in created and f"/dev/shm/sem.{name}.space" in created
            assert len([path for path in created if "presence" in path]) == 2
            for path in created:
                assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
            closer = close_in_background(producer)
            assert consumer.recv(5) == b"x"
            with pytest.raises(EndOfStream):
                consumer.recv(5)
            closer.join()
            assert leftovers(name) == []


def test_unavailable_dev_shm_says_how_to_mount_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert shm.availability() is None
    assert shm.host_max_message_size() == shm.DEFAULT_CAPACITY // 2
    monkeypatch.setattr(segment, "SHM_DIRECTORY", str(tmp_path / "missing"))
    assert "emptyDir with medium: Memory at /dev/shm and a sizeLimit" in (shm.availability() or "")
    with pytest.raises(ChannelUnavailable, match="sizeLimit"):
        podipc.consumer("shm:///podipc-test-shm-missing")


def test_ring_larger_than_free_dev_shm_is_refused_with_the_fix() -> None:
    too_big = (shm.free_bytes() // 8 + 1) * 8
    with pytest.raises(ChannelUnavailable, match="sizeLimit"):
        podipc.consumer("shm:///podipc-test-shm-too-big", capacity=too_big)
    assert leftovers("podipc-test-shm-too-big") == []


# --- idle CPU ---------------------------------------------------------------


IDLE_SECONDS = 4
IDLE_WAKEUPS_PER_SECOND = 40
"""An idle side sleeps: its bounded waits (at most 0.25 s apart, docs/wire/shm.md) and the peer monitor's
probes (0.2 s) wake it about 10-16 times a second; a side that polls or spins wakes hundreds of times."""
IDLE_CPU_MOST = 0.10
"""Catches a busy loop (a whole core) without timing the machine: this VM charges ~1.7 ms of CPU to every
wake-up (an asyncio loop waking 16 times a second, doing nothing, shows 2.8 %). The idle CPU targets
(shm <= 2 %, aio <= 1 % of a core) are judged by the bench, side by side (benchmarks/targets.py)."""


def idle_usage(began: float, usage: resource.struct_rusage) -> tuple[float, int, float]:
    """(CPU seconds, voluntary context switches, seconds) since `began`/`usage`, of this whole process."""
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return cpu, after.ru_nvcsw - usage.ru_nvcsw, time.monotonic() - began


def consume_idle(ring: str, ready: Any, result: Any) -> None:
    with podipc.consumer(url(ring), **SMALL_RING) as channel:
        ready.set()
        assert channel.recv(10) == b"wake"
        began, usage = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        with contextlib.suppress(Timeout):
            channel.recv(IDLE_SECONDS)  # idle: the producer is alive and quiet
        result.put(idle_usage(began, usage))


def sleeps_while_idle(cpu: float, wakeups: int, seconds: float, what: str) -> None:
    """Assert an idle side waited the whole time asleep: few wake-ups a second, far from a busy core."""
    print(f"{what}: {cpu / seconds:.2%} of a core, {wakeups / seconds:.1f} wake-ups/s over {seconds:.1f} s")
    assert seconds >= IDLE_SECONDS - 0.1  # it really waited the whole timeout
    assert wakeups / seconds <= IDLE_WAKEUPS_PER_SECOND, f"{what} wakes {wakeups / seconds:.0f} times a second"
    assert cpu / seconds < IDLE_CPU_MOST, f"{what} uses {cpu / seconds:.1%} of a core"


def test_an_idle_consumer_sleeps_instead_of_polling(name: str) -> None:
    ready, result = FORK.Event(), FORK.Queue()
    consumer = start(consume_idle, name, ready, result)
    with podipc.producer(url(name), **SMALL_RING) as producer:
        assert ready.wait(10)
        producer.send(b"wake", timeout=5)  # attach, so the consumer blocks on a live producer
        sleeps_while_idle(*result.get(timeout=20), "idle consumer")
        producer.abort()
    consumer.join(10)


# --- a plain script peer ----------------------------------------------------


def plain_script(role: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"<!-- plain-{role} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"docs/wire/shm.md lost its plain {role} block"
    return match.group(1)


def test_plain_script_producer_from_the_docs_talks_to_podipc(name: str, tmp_path: Path) -> None:
    script = tmp_path / "plain_producer.py"
    script.write_text(plain_script("producer"))
    count = 400
    with podipc.consumer(url(name), capacity=4096, max_message_size=2048) as consumer:
        peer = subprocess.Popen([sys.executable, str(script), name, str(count)])
        received = list(consumer)
        assert peer.wait(20) == 0
    assert received == [f"message {index}".encode() * (index % 7) for index in range(count)]


def test_plain_script_consumer_from_the_docs_takes_a_podipc_stream(name: str, tmp_path: Path) -> None:
    script = tmp_path / "plain_consumer.py"
    script.write_text(plain_script("consumer"))
    payloads = messages(500, 32768, seed=5)
    with open(tmp_path / "received", "wb") as sink:
        peer = subprocess.Popen([sys.executable, str(script), name], stdout=sink)
        with podipc.producer(url(name)) as producer:
            for payload in payloads:
                producer.send(payload, timeout=10)
        assert peer.wait(20) == 0
    output = (tmp_path / "received").read_bytes()
    received, offset = [], 0
    while offset < len(output):
        length = int.from_bytes(output[offset : offset + 4], "big")
        received.append(output[offset + 4 : offset + 4 + length])
        offset += 4 + length
    assert received == payloads


# --- limits (issue 10: found by a peer written from the docs) ------------------------------------


def test_a_message_of_exactly_the_rings_max_size_fits_and_a_larger_one_names_the_ring(name: str) -> None:
    with podipc.consumer(url(name), capacity=4096, max_message_size=2001) as consumer:
        producer = podipc.producer(url(name))  # its own default limit is larger: the ring's counts
        producer.send(b"x" * 2001, timeout=5)
        assert consumer.recv(5) == b"x" * 2001
        with pytest.raises(MessageTooLarge) as refused:
            producer.send(b"x" * 2002, timeout=5)
        assert f"the max message size of the ring shm:///{name} (set by its consumer) 2001" in str(refused.value)
        assert "default" not in str(refused.value)
        assert producer.try_send(b"y" * 2001)
        with pytest.raises(MessageTooLarge):
            producer.try_send(b"y" * 2002)
        assert consumer.recv(5) == b"y" * 2001
        producer.abort()


def test_a_producer_takes_messages_larger_than_its_own_default_when_the_ring_allows_them(name: str) -> None:
    with podipc.consumer(url(name), capacity=65536, max_message_size=65000) as consumer:
        producer = podipc.producer(url(name), capacity=4096)  # alone it would refuse above 2048
        message = os.urandom(60000)
        producer.send(message, timeout=5)
        assert consumer.recv(5) == message
        producer.abort()


def test_record_lengths_are_capped_below_4_gib_with_a_clear_error() -> None:
    assert shm.default_max_message_size(8 << 30) == (1 << 32) - 8
    with pytest.raises(podipc.AddressError, match=r"4 GiB - 1 \(a record's u32 length\)"):
        podipc.consumer("shm:///podipc-test-shm-huge", capacity="8GiB", max_message_size=1 << 32)
    header = bytearray(encode_header(4096, 2048))
    header[24:32] = ((1 << 32) + 8).to_bytes(8, "little")
    header[16:24] = (1 << 33).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="u32"):
        decode_header(bytes(header), HEADER_SIZE + (1 << 33))


def test_forged_headers_are_protocol_errors_not_crashes() -> None:
    near_the_end = bytearray(encode_header(4096, 2048))
    for word in (64, 128):  # write and read index both 2**64 - 8
        near_the_end[word : word + 8] = ((1 << 64) - 8).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="2\\*\\*63"):
        decode_header(bytes(near_the_end), HEADER_SIZE + 4096)
    with pytest.raises(ProtocolError, match="not a multiple of 8"):
        decode_header(encode_header(4096, 2048), HEADER_SIZE + 4096 + 3)


# --- trust: what is at the ring's paths ------------------------------------------------------------


def test_a_file_at_the_rings_path_that_is_not_a_ring_is_refused_and_left_alone(name: str) -> None:
    path = f"/dev/shm/{name}"
    with open(path, "wb") as mine:
        mine.write(b"my own notes, not a ring")
    try:
        with pytest.raises(ChannelUnavailable, match="is not a podipc ring"):
            podipc.consumer(url(name), **SMALL_RING)
        with open(path, "rb") as kept:
            assert kept.read() == b"my own notes, not a ring"
        assert leftovers(name) == [path]
    finally:
        os.unlink(path)


@pytest.mark.parametrize("what", ["a regular file", "a symlink"])
def test_something_else_at_the_wake_up_fifos_path_is_refused(name: str, what: str) -> None:
    path = segment.fifo_paths(parse_address(url(name)).token)[0]
    if what == "a symlink":
        os.symlink("/etc/passwd", path)
    else:
        with open(path, "wb"):
            pass
    try:
        with pytest.raises(ChannelUnavailable, match="not a FIFO"):
            podipc.consumer(url(name), **SMALL_RING)
        assert os.path.lexists(path)
    finally:
        os.unlink(path)


# --- waking: FIFOs, plain peers, readiness ---------------------------------------------------------


def test_a_peer_that_only_posts_the_semaphore_still_wakes_a_blocked_recv(name: str) -> None:
    """A plain peer may ignore the FIFO (value 2 in the waiting word) and post /NAME.data: bounded waits catch it."""
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        ring = shm.ShmConsumer  # the layout, written by hand as a minimal plain producer would
        assert isinstance(consumer, ring)
        with open(f"/dev/shm/{name}", "r+b") as file:
            mapped = mmap.mmap(file.fileno(), HEADER_SIZE + 4096)
        words = memoryview(mapped).cast("Q")
        semaphore = posix_ipc.Semaphore(f"/{name}.data")
        presence = Presence(parse_address(url(name)).token, "producer")  # alive, as a plain producer's lock says
        words[9] |= 1  # attached

        def plain_send_later() -> None:
            time.sleep(0.6)  # the consumer's waits have grown long by now
            RECORD_HEADER.pack_into(mapped, HEADER_SIZE, 5, KIND_DATA)
            mapped[HEADER_SIZE + 8 : HEADER_SIZE + 13] = b"plain"
            words[8] = 16
            if words[10]:
                words[10] = 0
                semaphore.release()  # not what the waiting word asked for (2: the FIFO)

        sender = threading.Thread(target=plain_send_later)
        sender.start()
        began = time.monotonic()
        assert consumer.recv(10) == b"plain"
        assert time.monotonic() - began < 0.6 + 0.5  # at most one bounded wait (0.25 s) late
        sender.join()
        semaphore.close()
        words.release()
        mapped.close()
        presence.close()


def test_a_full_ring_makes_the_producer_wait_on_a_descriptor_that_fires_when_room_frees(name: str) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        producer = podipc.producer(url(name), **SMALL_RING)
        sent = 0
        while producer.try_send(bytes(1000)):
            sent += 1
        assert sent == 4  # a 4 KiB ring holds four 1008-byte records
        assert podipc.wait([producer], timeout=0.2) == []
        assert not producer.poll(0.1)
        selector = selectors.DefaultSelector()
        selector.register(producer.fileno(), selectors.EVENT_READ)
        assert selector.select(0.1) == []
        assert consumer.recv(5) == bytes(1000)
        assert selector.select(5)
        assert podipc.wait([producer], timeout=5) == [producer]
        assert producer.try_send(bytes(1000))
        selector.close()
        producer.abort()


def test_asyncio_on_shm_uses_the_fifo_and_no_helper_thread(name: str) -> None:
    import asyncio

    import podipc.aio

    async def main() -> list[bytes]:
        async with podipc.aio.consumer(url(name), **SMALL_RING) as inbox:
            assert inbox._worker is None
            producer = start(produce, name, [b"a", b"bb", bytes(1500)] * 50, SMALL_RING)
            received = [message async for message in inbox]
            producer.join(10)
            assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("podipc-aio")]
            return received

    assert asyncio.run(main()) == [b"a", b"bb", bytes(1500)] * 50


def idle_async_consumer(ring: str, ready: Any, result: Any) -> None:
    import asyncio

    import podipc.aio

    async def main() -> tuple[float, int, float]:
        async with podipc.aio.consumer(url(ring), **SMALL_RING) as inbox:
            ready.set()
            assert await inbox.recv(10) == b"wake"
            began, usage = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
            with contextlib.suppress(Timeout):
                await inbox.recv(IDLE_SECONDS)
            return idle_usage(began, usage)

    result.put(asyncio.run(main()))


def test_an_idle_async_consumer_sleeps_instead_of_polling(name: str) -> None:
    ready, result = FORK.Event(), FORK.Queue()
    consumer = start(idle_async_consumer, name, ready, result)
    with podipc.producer(url(name), **SMALL_RING) as producer:
        assert ready.wait(10)
        producer.send(b"wake", timeout=5)
        sleeps_while_idle(*result.get(timeout=20), "idle async consumer")
        producer.abort()
    consumer.join(10)


# --- shutdown from anywhere (issue 11) --------------------------------------------------------------


def test_two_hundred_closes_and_aborts_of_a_producer_blocked_on_a_full_ring_never_crash(name: str) -> None:
    consumer = podipc.consumer(url(name), **SMALL_RING)
    for round_number in range(200):
        producer = podipc.producer(url(name), **SMALL_RING, wait=10)
        while producer.try_send(bytes(1000)):
            pass
        errors: list[BaseException] = []

        def blocked_send(producer: podipc.Producer = producer, errors: list[BaseException] = errors) -> None:
            try:
                producer.send(bytes(1000))
            except BaseException as error:
                errors.append(error)

        sender = threading.Thread(target=blocked_send)
        sender.start()
        time.sleep(0.001 * (round_number % 4))
        producer.abort()
        sender.join(5)
        assert not sender.is_alive() and len(errors) == 1 and isinstance(errors[0], podipc.ChannelClosed), errors
        consumer.close()  # the aborted stream is over; the next round starts a new one
        consumer = podipc.consumer(url(name), **SMALL_RING)
    consumer.close()


def test_two_hundred_executor_receives_cancelled_then_closed_never_crash(name: str) -> None:
    """The pattern of issue 11: run_in_executor(None, inbox.recv, 0.25), cancel the task, close the consumer."""
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for round_number in range(200):
            inbox = podipc.consumer(url(name), **SMALL_RING, wait=10)
            task = asyncio.ensure_future(loop.run_in_executor(None, inbox.recv, 0.25))
            await asyncio.sleep(0.001 * (round_number % 5))
            task.cancel()
            inbox.close()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def crash_probe(role: str, ring: str, events: Any, results: Any) -> None:
    """One side of a truncated ring: report what it raised (a SIGBUS would kill the process instead)."""
    try:
        if role == "consumer":
            with podipc.consumer(url(ring), **SMALL_RING) as consumer:
                events["ready"].set()
                assert consumer.recv(10) == b"first"
                consumer.recv(20)  # waiting, idle, when the ring is truncated
        else:
            with podipc.producer(url(ring), **SMALL_RING) as producer:
                producer.send(b"first", timeout=10)
                events["sent"].set()
                events["truncated"].wait(20)
                time.sleep(1.0)  # the peer monitor looks every 0.2 s
                producer.send(b"after the truncation")
        results.put((role, "no error"))
    except podipc.PodIPCError as error:
        results.put((role, f"{type(error).__name__}: {error}"))


def test_a_truncated_ring_is_a_protocol_error_for_a_waiting_consumer_and_an_idle_producer(name: str) -> None:
    events = {key: FORK.Event() for key in ("ready", "sent", "truncated")}
    results = FORK.Queue()
    consumer = start(crash_probe, "consumer", name, events, results)
    assert events["ready"].wait(10)
    producer = start(crash_probe, "producer", name, events, results)
    assert events["sent"].wait(10)
    time.sleep(0.5)
    os.truncate(f"/dev/shm/{name}", 0)
    events["truncated"].set()
    outcomes = dict(results.get(timeout=20) for _ in range(2))
    consumer.join(10)
    producer.join(10)
    assert (consumer.exitcode, producer.exitcode) == (0, 0)  # -7 would be SIGBUS
    for role in ("consumer", "producer"):
        assert outcomes[role].startswith("ProtocolError") and "truncated" in outcomes[role], outcomes


def test_a_handler_calling_sys_exit_gets_through_a_blocked_recv_at_once(name: str) -> None:
    script = f"""
import signal, sys, time, podipc
consumer = podipc.consumer("shm:///{name}", capacity=4096, max_message_size=1500)
signal.signal(signal.SIGALRM, lambda *_: sys.exit(3))
signal.setitimer(signal.ITIMER_REAL, 0.3)
began = time.monotonic()
try:
    consumer.recv()
finally:
    print(round(time.monotonic() - began, 3), flush=True)
    consumer.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3, done.stderr
    assert float(done.stdout) < 0.6


# --- batches: send_many writes runs of records, recv_many takes runs (one index store each) ---------------


def test_batches_through_a_small_ring_wrap_and_fill_it_and_keep_every_message_in_order(name: str) -> None:
    """A 4 KiB ring: batches of mixed sizes wrap it many times and fill it mid-batch; recv_many takes runs."""
    import random

    chooser = random.Random(13)
    batches = [
        [
            index.to_bytes(4, "little") + bytes([batch % 256]) * chooser.randrange(0, 900)
            for index in range(chooser.randrange(1, 40))
        ]
        for batch in range(300)
    ]
    link = f"{url(name)}?capacity=4096"
    received: list[bytes] = []
    with podipc.consumer(link, wait=10) as inbox:

        def produce() -> None:
            with podipc.producer(link, wait=10) as out:
                for batch in batches:
                    assert out.send_many(batch, timeout=10) == len(batch)

        producer = threading.Thread(target=produce)
        producer.start()
        with pytest.raises(EndOfStream):
            while True:
                taken = inbox.recv_many(chooser.choice([1, 3, 17, 256]), timeout=10)
                assert taken
                received += taken
        producer.join(10)
    assert received == [message for batch in batches for message in batch]


# --- pack records: send_many of equal-sized messages ---------------------------


def uniform_batches(count: int, size: int, seed: int) -> list[list[bytes]]:
    """`count` batches of numbered messages, each batch of one size (`size`, or a random one when -1)."""
    import random

    chooser = random.Random(seed)
    batches = []
    number = 0
    for _ in range(count):
        length = chooser.randrange(0, 700) if size < 0 else size
        batch = []
        for _ in range(chooser.randrange(2, 80)):
            batch.append((number.to_bytes(4, "little") * (length // 4 + 1))[:length])
            number += 1
        batches.append(batch)
    return batches


@pytest.mark.parametrize("size", [64, 0, -1], ids=["64-bytes", "empty", "one-size-per-batch"])
def test_batches_of_equal_sized_messages_go_in_packs_and_every_way_of_receiving_takes_them_in_order(
    name: str, size: int
) -> None:
    """A 4 KiB ring: packs wrap and fill it; recv, recv_view, try_recv and recv_many of any count take them whole."""
    import random

    batches = uniform_batches(300, size, seed=size + 7)
    link = f"{url(name)}?capacity=4096"
    received: list[bytes] = []
    chooser = random.Random(3)
    with podipc.consumer(link, wait=10) as inbox:
        segment_path = f"/dev/shm/{name}"

        def produce() -> None:
            with podipc.producer(link, wait=10) as out:
                for batch in batches:
                    assert out.send_many(batch, timeout=10) == len(batch)

        producer = threading.Thread(target=produce)
        producer.start()
        kinds_seen: set[int] = set()
        with pytest.raises(EndOfStream):
            while True:
                raw = b""
                with contextlib.suppress(FileNotFoundError), open(segment_path, "rb") as segment:
                    raw = segment.read()  # what kind of record waits at the read index (gone after the end)
                read_index = int.from_bytes(raw[128:136], "little")
                if raw and read_index < int.from_bytes(raw[64:72], "little"):
                    kinds_seen.add(int.from_bytes(raw[HEADER_SIZE + read_index % 4096 + 4 :][:4], "little"))
                way = chooser.choice(["recv", "view", "try", "many"])
                if way == "recv":
                    received.append(inbox.recv(timeout=10))
                elif way == "view":
                    received.append(bytes(inbox.recv_view(timeout=10)))
                elif way == "try":
                    message = inbox.try_recv()
                    if message is not None:
                        received.append(message)
                else:
                    received += inbox.recv_many(chooser.choice([1, 3, 17, 256]), timeout=10)
        producer.join(10)
    assert received == [message for batch in batches for message in batch]
    assert KIND_PACK in kinds_seen


def test_a_ring_whose_reader_takes_no_packs_gets_data_records_only(name: str) -> None:
    """A plain reader (features word 0, as docs/wire/shm.md's script leaves it) never meets a pack record."""
    with podipc.consumer(url(name), **SMALL_RING) as inbox:
        write_raw(name, 32, bytes(8))  # the features word: this reader takes no packs

        def produce() -> None:
            with podipc.producer(url(name), **SMALL_RING) as out:
                assert out.send_many([b"abcd"] * 5, timeout=5) == 5

        producer = threading.Thread(target=produce)
        producer.start()
        received: list[bytes] = []
        while len(received) < 5:
            received += inbox.recv_many(10, timeout=5)
        assert received == [b"abcd"] * 5
        with open(f"/dev/shm/{name}", "rb") as segment:  # the records stay in the ring after they were taken
            raw = segment.read()
        with pytest.raises(EndOfStream):
            inbox.recv(5)
        producer.join(5)
    kinds = [int.from_bytes(raw[HEADER_SIZE + 16 * index + 4 :][:4], "little") for index in range(5)]
    assert kinds == [KIND_DATA] * 5


@pytest.mark.parametrize(
    ("record", "write_index", "message"),
    [
        (RECORD_HEADER.pack(8 + 3 * 4, KIND_PACK) + PACK_HEADER.pack(0, 4), 32, "do not make"),
        (RECORD_HEADER.pack(8 + 2 * 4, KIND_PACK) + PACK_HEADER.pack(3, 4), 24, "do not make"),
        (RECORD_HEADER.pack(8 + 2 * 2000, KIND_PACK) + PACK_HEADER.pack(2, 2000), 4016, "runs past|do not make"),
        (RECORD_HEADER.pack(8 + 2 * 4, KIND_PACK) + PACK_HEADER.pack(2, 4), 16, "write index"),
        (RECORD_HEADER.pack(4, KIND_PACK), 16, "shorter than its header"),
    ],
    ids=["no-messages", "count-disagrees", "beyond-max-message-size", "beyond-write-index", "no-pack-header"],
)
def test_a_forged_pack_record_is_a_protocol_error_for_the_consumer(
    name: str, record: bytes, write_index: int, message: str
) -> None:
    with podipc.consumer(url(name), **SMALL_RING) as consumer:
        write_raw(name, HEADER_SIZE, record)
        write_raw(name, 64, write_index.to_bytes(8, "little"))
        with pytest.raises(ProtocolError, match=message):
            consumer.recv(2)
