"""What only sysvmq:// has: keys (numbers, or derived from names), queue_bytes and its limits,
mtypes as tags and the consumer's own wake-up messages, a receive buffer of msgmax, and the probe
queue of availability().

Everything sysvmq:// shares with mq:// is tested on both in test_queues.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
import sysv_ipc
from hypothesis import given
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address, sysv_key_from_name
from podipc.queue import DATA, END, GARBAGE
from podipc.transports import sysv_mq
from podipc.transports.sysv_mq import WAKE, classify
from tests.unit.queues import SYSV_MQ

pytestmark = pytest.mark.timeout(60)

KERNEL_MAX = sysv_mq.host_max_message_size()
KERNEL_QUEUE_BYTES = sysv_mq.host_queue_bytes()

url = SYSV_MQ.url_fixture()


def test_a_name_maps_to_the_documented_key() -> None:
    address = parse_address("sysvmq://podipc-test-sysv-key")
    digest = hashlib.sha256(b"podipc-test-sysv-key").digest()
    assert address.key == sysv_key_from_name("podipc-test-sysv-key") == int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    assert parse_address("sysvmq://0x4d2").key == 1234


def test_a_numeric_key_works_too() -> None:
    key = 0x7E500000 + os.getpid() % 0xFFFF
    url = f"sysvmq://{key}"
    try:
        with podipc.consumer(url) as consumer, podipc.producer(url) as producer:
            producer.send(b"by number")
            assert consumer.recv(timeout=1) == b"by number"
            assert sysv_ipc.MessageQueue(key).current_messages == 0
            producer.abort()
        assert SYSV_MQ.leftovers(url) == []
    finally:
        SYSV_MQ.scrub(url)


def test_queue_bytes_above_msgmnb_or_below_the_message_size_are_unavailable_with_the_fix(url: str) -> None:
    with pytest.raises(podipc.ChannelUnavailable, match=r"/proc/sys/kernel/msgmnb"):
        podipc.consumer(url, queue_bytes=KERNEL_QUEUE_BYTES + 1)
    with pytest.raises(podipc.ChannelUnavailable, match=r"does not fit the queue capacity"):
        podipc.producer(url, queue_bytes=100, max_message_size=200)


def test_the_consumers_own_wake_ups_are_skipped_and_not_counted(url: str) -> None:
    with podipc.consumer(url) as consumer:
        SYSV_MQ.raw_send(url, b"first", 1)
        SYSV_MQ.raw_send(url, b"", 3)  # a wake-up: skipped, not counted
        SYSV_MQ.raw_send(url, b"not a wake-up", 3)
        SYSV_MQ.raw_send(url, b"second", 1)
        SYSV_MQ.raw_send(url, b"", 2)
        assert list(consumer) == [b"first", b"second"]
        assert consumer.skipped == 1


def test_a_message_larger_than_the_consumer_option_is_still_taken_out(url: str) -> None:
    with podipc.consumer(url, max_message_size=100) as consumer:
        SYSV_MQ.raw_send(url, b"y" * KERNEL_MAX, 1)
        SYSV_MQ.raw_send(url, b"", 2)
        assert list(consumer) == [b"y" * KERNEL_MAX]


def test_availability_removes_its_probe_queue() -> None:
    before = subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout.count("\n")
    assert sysv_mq.availability() is None
    after = subprocess.run(["ipcs", "-q"], capture_output=True, text=True).stdout.count("\n")
    assert after <= before or after - before < 3  # the probe queue is removed (others may come and go)


@given(mtype=st.integers(min_value=1, max_value=2**31 - 1), data=st.binary(max_size=64))
def test_classify_only_mtype_1_is_data_and_only_an_empty_mtype_2_ends(mtype: int, data: bytes) -> None:
    kind = classify(mtype, data)
    assert (kind is DATA) == (mtype == 1)
    assert (kind is END) == (mtype == 2 and data == b"")
    assert (kind is WAKE) == (mtype == 3 and data == b"")
    assert kind in (DATA, END, WAKE, GARBAGE)
