"""What only mq:// has: the depth option and its limit, the pod's default message size, priorities
as tags, and the probe queue of availability().

Everything mq:// shares with sysvmq:// is tested on both in test_queues.py.
"""

from __future__ import annotations

import glob

import posix_ipc
import pytest
from hypothesis import given
from hypothesis import strategies as st

import podipc
from podipc.queue import DATA, END, GARBAGE
from podipc.transports import posix_mq
from podipc.transports.posix_mq import classify
from tests.unit.queues import POSIX_MQ

pytestmark = pytest.mark.timeout(60)

KERNEL_MAX = posix_mq.host_max_message_size()
KERNEL_DEPTH = posix_mq.host_max_depth()

url = POSIX_MQ.url_fixture()


def test_9000_bytes_are_too_large_for_the_pod_default_of_8192(url: str) -> None:
    if KERNEL_MAX != 8192:
        pytest.skip("this host's msgsize_max is not the pod default")
    with podipc.producer(url, wait=0.1) as producer:
        with pytest.raises(podipc.MessageTooLarge, match=r"9000 bytes > /proc/sys/fs/mqueue/msgsize_max 8192"):
            producer.send(b"x" * 9000)
        producer.abort()


def test_a_depth_above_msg_max_is_unavailable_with_the_fix(url: str) -> None:
    with pytest.raises(podipc.ChannelUnavailable, match=r"/proc/sys/fs/mqueue/msg_max"):
        podipc.consumer(url, depth=KERNEL_DEPTH + 1)


def test_availability_removes_its_probe_queue() -> None:
    assert posix_mq.availability() is None
    assert not glob.glob("/dev/mqueue/podipc-probe-*")


@given(priority=st.integers(min_value=0, max_value=posix_ipc.QUEUE_PRIORITY_MAX), data=st.binary(max_size=64))
def test_classify_only_priority_1_is_data_and_only_an_empty_priority_0_ends(priority: int, data: bytes) -> None:
    kind = classify(priority, data)
    assert (kind is DATA) == (priority == 1)
    assert (kind is END) == (priority == 0 and data == b"")
    assert kind in (DATA, END, GARBAGE)
