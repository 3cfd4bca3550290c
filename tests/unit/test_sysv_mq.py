"""sysvmq:// across real processes: order and boundaries, limits, liveness, stale queues, raw peers, the wire format."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sysv_ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address, sysv_key_from_name
from podipc.presence import presence_path
from podipc.transports import sysv_mq
from podipc.transports.sysv_mq import DATA, END, GARBAGE, WAKE, SysVMQConsumer, classify

pytestmark = pytest.mark.timeout(60)

FORK = multiprocessing.get_context("fork")
KERNEL_MAX = sysv_mq.host_max_message_size()
KERNEL_QUEUE_BYTES = sysv_mq.host_queue_bytes()
REPO = Path(__file__).resolve().parents[2]
WIRE_DOC = REPO / "docs" / "wire" / "sysvmq.md"


def leftovers(url: str) -> list[str]:
    """What a channel left behind: its queue and presence files."""
    address = parse_address(url)
    found = glob.glob(presence_path(address.token, "*"))
    try:
        sysv_ipc.MessageQueue(address.key)
        found.append(f"queue key {address.key:#x}")
    except sysv_ipc.ExistentialError:
        pass
    return found


def scrub(url: str) -> None:
    """Remove whatever a (killed) test run left: the queue and both presence files."""
    address = parse_address(url)
    with contextlib.suppress(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(address.key).remove()
    for path in glob.glob(presence_path(address.token, "*")):
        os.unlink(path)


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh channel URL; the test fails if the channel leaves anything behind."""
    name = f"sysvmq://podipc-test-sysv-{uuid.uuid4().hex[:12]}"
    yield name
    left = leftovers(name)
    scrub(name)
    assert not left, f"left behind: {left}"


def raw_queue(url: str) -> sysv_ipc.MessageQueue:
    """The channel's queue, opened with plain sysv_ipc."""
    return sysv_ipc.MessageQueue(parse_address(url).key, 0, 0, KERNEL_MAX)


def produce(url: str, messages: list[bytes], delay: float) -> None:
    """Child process: wait `delay`, send every message, close cleanly; exit 0 on success."""
    time.sleep(delay)
    try:
        with podipc.producer(url, wait=20) as producer:
            for message in messages:
                producer.send(message)
    except BaseException as exc:
        print(f"producer failed: {exc!r}", file=sys.stderr)
        os._exit(1)
    os._exit(0)


def produce_then_hang(url: str, messages: list[bytes]) -> None:
    """Child process: send, then hang without closing (to be killed)."""
    producer = podipc.producer(url, wait=20)
    for message in messages:
        producer.send(message)
    signal.pause()
    producer.close()


def consume_then_hang(url: str, ready: multiprocessing.synchronize.Event) -> None:
    """Child process: open a consumer with a 64-byte queue, never receive, hang (to be killed)."""
    consumer = podipc.consumer(url, queue_bytes=64, max_message_size=64)
    ready.set()
    signal.pause()
    consumer.close()


def sample_messages() -> list[bytes]:
    return [b"", b"a", b"", bytes(range(256)), b"\0" * KERNEL_MAX, b"z" * 100, b""] + [
        os.urandom(i * 37 % KERNEL_MAX) for i in range(60)
    ]


def test_a_name_maps_to_the_documented_key() -> None:
    address = parse_address("sysvmq://podipc-test-sysv-key")
    digest = hashlib.sha256(b"podipc-test-sysv-key").digest()
    assert address.key == sysv_key_from_name("podipc-test-sysv-key") == int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    assert parse_address("sysvmq://0x4d2").key == 1234


@pytest.mark.parametrize("consumer_first", [True, False], ids=["consumer-first", "producer-first"])
def test_messages_arrive_whole_and_in_order_across_processes(url: str, consumer_first: bool) -> None:
    messages = sample_messages()
    child = FORK.Process(target=produce, args=(url, messages, 0.3 if consumer_first else 0.0))
    child.start()
    if not consumer_first:
        time.sleep(0.3)
    with podipc.consumer(url) as consumer:
        received = list(consumer)
        assert consumer.skipped == 0
    child.join(10)
    assert child.exitcode == 0
    assert received == messages


def test_a_numeric_key_works_too() -> None:
    key = 0x7E500000 + os.getpid() % 0xFFFF
    url = f"sysvmq://{key}"
    try:
        with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
            producer.send(b"by number")
            assert consumer.recv(timeout=1) == b"by number"
            assert sysv_ipc.MessageQueue(key).current_messages == 0
            producer.abort()
        assert leftovers(url) == []
    finally:
        scrub(url)


def test_a_message_over_msgmax_is_refused_naming_the_limit_and_fix(url: str) -> None:
    with podipc.producer(url, wait=0.1) as producer:
        assert producer.max_message_size == KERNEL_MAX
        with pytest.raises(podipc.MessageTooLarge) as caught:
            producer.send(b"x" * (KERNEL_MAX + 808))
        producer.abort()
    text = str(caught.value)
    assert f"{KERNEL_MAX + 808} bytes > /proc/sys/kernel/msgmax {KERNEL_MAX}" in text
    assert "securityContext.sysctls" in text and "shm://" in text


def test_options_above_the_kernel_limits_are_unavailable_with_the_fix(url: str) -> None:
    with pytest.raises(podipc.ChannelUnavailable, match=r"/proc/sys/kernel/msgmax.*securityContext\.sysctls"):
        podipc.consumer(url, max_message_size=KERNEL_MAX + 1)
    with pytest.raises(podipc.ChannelUnavailable, match=r"/proc/sys/kernel/msgmnb"):
        podipc.consumer(url, queue_bytes=KERNEL_QUEUE_BYTES + 1)
    with pytest.raises(podipc.ChannelUnavailable, match=r"does not fit the queue capacity"):
        podipc.producer(url, queue_bytes=100, max_message_size=200)


def test_a_producer_adopts_the_smaller_limit_of_the_queue_the_consumer_made(url: str) -> None:
    with podipc.consumer(url, queue_bytes=100, max_message_size=100) as consumer, podipc.producer(url) as producer:
        producer.send(b"s" * 100)
        with pytest.raises(podipc.MessageTooLarge, match="capacity"):
            producer.send(b"L" * 101)
        assert producer.max_message_size == 100
        assert consumer.recv(timeout=1) == b"s" * 100
        producer.abort()


def test_full_queue_send_timeout_raises_timeout_and_loses_nothing(url: str) -> None:
    consumer = podipc.consumer(url, queue_bytes=16, max_message_size=8)
    producer = podipc.producer(url, max_message_size=8)
    producer.send(b"one-----")
    producer.send(b"two-----")
    started = time.monotonic()
    with pytest.raises(podipc.Timeout):
        producer.send(b"three---", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 1.5
    assert consumer.recv(timeout=1) == b"one-----"
    producer.send(b"three---", timeout=1)
    closing = threading.Thread(target=producer.close)
    closing.start()
    assert list(consumer) == [b"two-----", b"three---"]
    closing.join(5)
    assert producer.closed and not closing.is_alive()
    consumer.close()


def test_a_blocked_recv_times_out_on_time_while_the_producer_lives(url: str) -> None:
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        producer.send(b"first")
        assert consumer.recv(timeout=1) == b"first"
        for timeout in (0.0, 0.3):
            started = time.monotonic()
            with pytest.raises(podipc.Timeout) as caught:
                consumer.recv(timeout=timeout)
            assert not isinstance(caught.value, podipc.PeerTimeout)
            assert timeout <= time.monotonic() - started < timeout + 0.5
        producer.send(b"after the timeouts")
        assert consumer.recv() == b"after the timeouts"
        producer.abort()


def test_sigkilled_producer_makes_the_blocked_consumer_raise_peer_gone_within_2s(url: str) -> None:
    child = FORK.Process(target=produce_then_hang, args=(url, [b"hello"]))
    child.start()
    try:
        with podipc.consumer(url) as consumer:
            assert consumer.recv(timeout=10) == b"hello"
            os.kill(child.pid or 0, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(podipc.PeerGone):
                consumer.recv()
            assert time.monotonic() - killed < 2.0
    finally:
        child.kill()
        child.join()
    # the survivor removed the queue and the dead side's presence file: nothing is left (see the fixture)


def test_sigkilled_consumer_makes_the_blocked_producer_raise_peer_gone_within_2s(url: str) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=consume_then_hang, args=(url, ready))
    child.start()
    try:
        assert ready.wait(10)
        producer = podipc.producer(url)
        producer.send(b"x" * 64)  # fills the 64-byte queue
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(child.pid or 0, signal.SIGKILL)

        threading.Timer(0.3, kill).start()
        with pytest.raises(podipc.PeerGone):
            producer.send(b"blocks in msgsnd until the consumer is gone")
        assert time.monotonic() - killed_at[0] < 2.0
        producer.abort()
    finally:
        child.kill()
        child.join()
    # the survivor removed the queue and the dead side's presence file: nothing is left (see the fixture)


def test_a_consumer_replaced_by_a_new_one_makes_the_blocked_producer_raise_peer_gone(url: str) -> None:
    first_ready, second_ready = FORK.Event(), FORK.Event()
    first = FORK.Process(target=consume_then_hang, args=(url, first_ready))
    first.start()
    second = FORK.Process(target=consume_then_hang, args=(url, second_ready))
    try:
        assert first_ready.wait(10)
        producer = podipc.producer(url)
        producer.send(b"x" * 64)
        replaced_at: list[float] = []

        def replace() -> None:
            replaced_at.append(time.monotonic())
            os.kill(first.pid or 0, signal.SIGKILL)
            first.join()
            second.start()  # recovers the dead consumer's queue and takes its place at once
            second_ready.wait(10)

        threading.Timer(0.3, replace).start()
        with pytest.raises(podipc.PeerGone):
            producer.send(b"blocked on the dead consumer's queue")
        assert time.monotonic() - replaced_at[0] < 2.0
        producer.abort()
        assert second_ready.wait(10)
    finally:
        for child in (first, second):
            if child.pid is not None:
                child.kill()
                child.join()
        scrub(url)


def test_a_stale_queue_left_by_a_sigkilled_run_is_recovered(url: str) -> None:
    ready = FORK.Event()
    child = FORK.Process(target=consume_then_hang, args=(url, ready))
    child.start()
    assert ready.wait(10)
    raw_queue(url).send(b"stale", True, 1)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    fresh = FORK.Process(target=produce, args=(url, [b"fresh"], 0.2))
    fresh.start()
    with podipc.consumer(url) as consumer:
        assert isinstance(consumer, SysVMQConsumer) and consumer.recovered
        assert list(consumer) == [b"fresh"]
    fresh.join(10)
    assert fresh.exitcode == 0


def test_a_second_consumer_is_refused_and_leaves_the_live_queue_alone(url: str) -> None:
    with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
        producer.send(b"kept")
        with pytest.raises(podipc.ChannelUnavailable, match="another consumer"):
            podipc.consumer(url)
        assert consumer.recv(timeout=1) == b"kept"
        producer.abort()


def test_consumer_without_producer_raises_peer_timeout_after_wait(url: str) -> None:
    with podipc.consumer(url, wait=0.4) as consumer:
        started = time.monotonic()
        with pytest.raises(podipc.PeerTimeout):
            consumer.recv()
        assert 0.35 <= time.monotonic() - started < 1.5


def test_a_recv_timeout_before_any_producer_appeared_is_a_peer_timeout(url: str) -> None:
    with podipc.consumer(url) as consumer:
        started = time.monotonic()
        with pytest.raises(podipc.PeerTimeout):
            consumer.recv(timeout=0.2)
        assert time.monotonic() - started < 1.0


def test_a_producer_abort_ends_in_peer_gone_after_its_messages_and_leaves_nothing(url: str) -> None:
    consumer = podipc.consumer(url)
    producer = podipc.producer(url)
    producer.send(b"one")
    producer.send(b"two")
    producer.abort()  # before the consumer ever looked: it must still learn the producer came and went
    assert consumer.recv(timeout=5) == b"one"
    assert consumer.recv(timeout=5) == b"two"
    started = time.monotonic()
    with pytest.raises(podipc.PeerGone):
        consumer.recv(timeout=5)
    assert time.monotonic() - started < 2.0
    consumer.close()


def test_a_consumer_closing_mid_stream_makes_the_producer_raise_peer_gone(url: str) -> None:
    consumer = podipc.consumer(url, queue_bytes=64, max_message_size=64)
    producer = podipc.producer(url)
    producer.send(b"taken")
    assert consumer.recv(timeout=1) == b"taken"
    consumer.close()
    started = time.monotonic()
    with pytest.raises(podipc.PeerGone):
        for _ in range(3):
            producer.send(b"x" * 64)
    assert time.monotonic() - started < 2.0
    producer.abort()


def test_producer_without_consumer_raises_peer_timeout_after_wait(url: str) -> None:
    producer = podipc.producer(url, wait=0.3)
    with pytest.raises(podipc.PeerTimeout):
        producer.send(b"nobody")
    producer.abort()


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_the_queue_is_created_with_the_mode_option(url: str, mode: int) -> None:
    old_umask = os.umask(0o077)
    try:
        consumer = podipc.consumer(url) if mode == 0o600 else podipc.consumer(url, mode=f"{mode:o}")
    finally:
        os.umask(old_umask)
    try:
        assert raw_queue(url).mode & 0o777 == mode
    finally:
        consumer.close()


def test_garbage_from_a_raw_peer_is_skipped_and_counted(url: str) -> None:
    with podipc.consumer(url) as consumer:
        raw = raw_queue(url)
        raw.send(b"first", True, 1)
        raw.send(b"wrong mtype", True, 7)
        raw.send(b"not an end marker", True, 2)
        raw.send(b"", True, 3)  # a wake-up: skipped, not counted
        raw.send(b"not a wake-up", True, 3)
        raw.send(b"", True, 1)
        raw.send(b"second", True, 1)
        raw.send(b"", True, 2)
        assert list(consumer) == [b"first", b"", b"second"]
        assert consumer.skipped == 3


def test_a_message_larger_than_the_consumer_option_is_still_taken_out(url: str) -> None:
    with podipc.consumer(url, max_message_size=100) as consumer:
        raw = raw_queue(url)
        raw.send(b"y" * KERNEL_MAX, True, 1)
        raw.send(b"", True, 2)
        assert list(consumer) == [b"y" * KERNEL_MAX]


def plain_script(marker: str) -> str:
    """The code block after `<!-- marker -->` in docs/wire/sysvmq.md."""
    text = WIRE_DOC.read_text()
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, f"no {marker} script in {WIRE_DOC}"
    return found.group(1)


def test_the_plain_producer_from_the_docs_feeds_podipc_consume(url: str) -> None:
    name = parse_address(url).name
    lines = b"".join(f"line {i} {'x' * (i * 53 % 300)}\n".encode() for i in range(200))
    consumer = subprocess.Popen(["podipc", "consume", url, "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    subprocess.run([sys.executable, "-c", plain_script("plain-producer"), name], input=lines, check=True, timeout=30)
    output, errors = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, errors
    assert output == lines
    assert json.loads(errors)["messages"] == 200


def test_podipc_produce_feeds_the_plain_consumer_from_the_docs(url: str, tmp_path: Path) -> None:
    name = parse_address(url).name
    received = tmp_path / "received"
    with received.open("wb") as output:
        plain = subprocess.Popen([sys.executable, "-c", plain_script("plain-consumer"), name], stdout=output)
        produced = subprocess.run(
            ["podipc", "produce", url, "--count", "300", "--random", "--size", str(KERNEL_MAX)],
            capture_output=True,
            check=True,
            timeout=30,
        )
        assert plain.wait(timeout=30) == 0
    summary = json.loads(produced.stdout)
    data = received.read_bytes()
    assert hashlib.sha256(data).hexdigest() == summary["sha256"]
    assert len(data) == summary["bytes"]


def test_cli_streams_random_messages_with_matching_digests(url: str) -> None:
    consumer = subprocess.Popen(["podipc", "consume", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    produced = subprocess.run(
        ["podipc", "produce", url, "--count", "1000", "--random", "--size", str(KERNEL_MAX)],
        capture_output=True,
        check=True,
        timeout=30,
    )
    output, errors = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, errors
    sent, got = json.loads(produced.stdout), json.loads(output)
    assert sent["messages"] == got["messages"] == 1000
    assert sent["sha256"] == got["sha256"]


def test_availability_and_host_limit_come_from_this_host() -> None:
    before = subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout.count("\n")
    assert sysv_mq.availability() is None
    with open("/proc/sys/kernel/msgmax") as limit:
        assert sysv_mq.host_max_message_size() == int(limit.read())
    after = subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout.count("\n")
    assert after <= before or after - before < 3  # the probe queue is removed (others may come and go)


@given(mtype=st.integers(min_value=1, max_value=2**31 - 1), data=st.binary(max_size=64))
def test_classify_only_mtype_1_is_data_and_only_an_empty_mtype_2_ends(mtype: int, data: bytes) -> None:
    kind = classify(mtype, data)
    assert (kind is DATA) == (mtype == 1)
    assert (kind is END) == (mtype == 2 and data == b"")
    assert (kind is WAKE) == (mtype == 3 and data == b"")
    assert kind in (DATA, END, WAKE, GARBAGE)


queue_message = st.tuples(st.integers(min_value=1, max_value=12), st.binary(max_size=200))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=st.lists(queue_message, max_size=8))
def test_any_raw_message_mix_yields_exactly_the_mtype_1_messages_before_the_first_end(
    url: str, sent: list[tuple[int, bytes]]
) -> None:
    with podipc.consumer(url) as consumer:
        raw = raw_queue(url)
        for mtype, data in sent:
            raw.send(data, True, mtype)
        raw.send(b"", True, 2)
        received = []
        with contextlib.suppress(podipc.EndOfStream):
            while True:
                received.append(consumer.recv(timeout=2))
        ends = [i for i, (mtype, data) in enumerate(sent) if mtype == 2 and not data]
        before_end = sent[: ends[0]] if ends else sent
        assert received == [data for mtype, data in before_end if mtype == 1]
        assert consumer.skipped == sum(1 for mtype, data in before_end if classify(mtype, data) is GARBAGE)
