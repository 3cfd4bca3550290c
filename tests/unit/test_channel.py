"""Options, deadlines and the shared Producer/Consumer behaviour, on an in-memory test channel."""

from __future__ import annotations

import collections
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import pytest

import podipc
from podipc.address import parse_address
from podipc.consuming import Consumer
from podipc.errors import AddressError, ChannelClosed, EndOfStream, MessageTooLarge
from podipc.options import Option, deadline_after, earliest, parse_mode, parse_size, remaining, resolve_options
from podipc.producing import Producer


class MemoryChannel:
    """A queue both sides share, for exercising the base classes without a transport."""

    def __init__(self) -> None:
        self.items: collections.deque[bytes | None] = collections.deque()
        self.aborted = False


class MemoryProducer(Producer):
    options = (Option("max_message_size", parse_size, 16, "largest message"),)

    def __init__(self, address: Any, settings: Mapping[str, Any], channel: MemoryChannel) -> None:
        super().__init__(address, settings)
        self.channel = channel
        self.max_message_size = settings["max_message_size"]
        self.max_message_source = "the test limit"

    def _send(self, view: memoryview, deadline: float | None) -> None:
        self.channel.items.append(bytes(view))

    def _close(self, deadline: float | None) -> None:
        self.channel.items.append(None)

    def _abort(self) -> None:
        self.channel.aborted = True


class MemoryConsumer(Consumer):
    def __init__(self, address: Any, settings: Mapping[str, Any], channel: MemoryChannel) -> None:
        super().__init__(address, settings)
        self.channel = channel
        self.max_message_size = 16
        self.closed_count = 0

    def _recv(self, deadline: float | None) -> bytes:
        item = self.channel.items.popleft()
        if item is None:
            raise EndOfStream("end")
        return item

    def _close(self) -> None:
        self.closed_count += 1


def make_pair() -> tuple[MemoryProducer, MemoryConsumer, MemoryChannel]:
    address = parse_address("tcp://127.0.0.1:9")
    channel = MemoryChannel()
    producer = MemoryProducer(address, resolve_options(address, MemoryProducer.options, {}), channel)
    consumer = MemoryConsumer(address, resolve_options(address, (), {}), channel)
    return producer, consumer, channel


def test_messages_pass_in_order_and_iteration_stops_at_end_of_stream() -> None:
    producer, consumer, _ = make_pair()
    for message in (b"a", b"", b"ccc", bytearray(b"dd"), memoryview(b"eeee")):
        producer.send(message)
    producer.close()
    assert list(consumer) == [b"a", b"", b"ccc", b"dd", b"eeee"]
    with pytest.raises(EndOfStream):
        consumer.recv()
    consumer.close()


def test_too_large_message_is_refused_before_sending_and_names_the_limit() -> None:
    producer, _, channel = make_pair()
    with pytest.raises(MessageTooLarge, match="17 bytes > the test limit 16") as caught:
        producer.send(b"x" * 17)
    assert caught.value.limit == 16 and caught.value.size == 17
    assert not channel.items
    producer.abort()


def test_multibyte_memoryview_is_sent_as_its_bytes() -> None:
    import array

    producer, consumer, _ = make_pair()
    producer.send(memoryview(array.array("H", [1, 2])))
    producer.close()
    assert consumer.recv() == array.array("H", [1, 2]).tobytes()
    consumer.close()


def test_close_is_idempotent_and_use_after_close_raises() -> None:
    producer, consumer, channel = make_pair()
    producer.close()
    producer.close()
    assert list(channel.items) == [None]
    with pytest.raises(ChannelClosed):
        producer.send(b"x")
    consumer.close()
    consumer.close()
    assert consumer.closed_count == 1
    with pytest.raises(ChannelClosed):
        consumer.recv()


def test_leaving_a_with_block_by_exception_aborts_without_end_of_stream() -> None:
    producer, _, channel = make_pair()
    with pytest.raises(RuntimeError), producer:
        producer.send(b"a")
        raise RuntimeError("boom")
    assert channel.aborted
    assert list(channel.items) == [b"a"]


def test_unclosed_producer_warns() -> None:
    producer, _, channel = make_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        producer.__del__()
    assert any(issubclass(item.category, ResourceWarning) for item in caught)
    assert channel.aborted


def test_options_merge_defaults_query_and_keywords() -> None:
    address = parse_address("tcp://127.0.0.1:9?max_message_size=1KiB&wait=2.5")
    settings = resolve_options(address, MemoryProducer.options, {"mode": "0660"})
    assert settings == {"max_message_size": 1024, "wait": 2.5, "mode": 0o660}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_mesage_size": "1"}, "did you mean 'max_message_size'"),
        ({"wait": "soon"}, "wait='soon'"),
        ({"wait": "-1"}, ">= 0"),
        ({"mode": "0666"}, "world-writable"),
        ({"mode": "0400"}, "owner needs read and write"),
        ({"mode": "rw"}, "mode='rw'"),
        ({"max_message_size": "12XB"}, "size in bytes"),
    ],
)
def test_bad_options_raise_address_error(options: dict[str, object], message: str) -> None:
    address = parse_address("tcp://127.0.0.1:9")
    with pytest.raises(AddressError, match=message):
        resolve_options(address, MemoryProducer.options, options)


def test_sizes_accept_binary_suffixes() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("1MiB") == 1048576
    assert parse_size("8m") == 8 * 1048576
    assert parse_size(12) == 12
    assert parse_mode("660") == 0o660


def test_deadlines() -> None:
    assert deadline_after(None) is None
    assert remaining(None) is None
    deadline = deadline_after(0.5)
    assert deadline is not None and 0 < (remaining(deadline) or 0) <= 0.5
    assert remaining(time.monotonic() - 1) == 0.0
    assert earliest(None, 3.0) == 3.0 and earliest(2.0, 3.0) == 2.0 and earliest(None, None) is None
    with pytest.raises(ValueError):
        deadline_after(-1)


def test_unknown_scheme_suggests_the_closest() -> None:
    with pytest.raises(AddressError, match="did you mean 'udp'"):
        podipc.producer("upd://127.0.0.1:7000")


@pytest.mark.parametrize("forever", [None, "inf", "Infinity", "forever", "none", math.inf])
def test_wait_none_or_inf_means_forever(forever: object) -> None:
    address = parse_address("tcp://127.0.0.1:9")
    assert resolve_options(address, (), {"wait": forever})["wait"] == math.inf


def test_a_transport_not_yet_on_the_contract_refuses_wait_forever_with_one_line() -> None:
    address = parse_address("tcp://127.0.0.1:9")
    settings = resolve_options(address, MemoryProducer.options, {"wait": None})
    with pytest.raises(AddressError, match=r"wait=forever is not supported by tcp:// yet"):
        MemoryProducer(address, settings, MemoryChannel())


class ReenteringConsumer(MemoryConsumer):
    """A consumer whose receive runs `during` on the same thread, as a signal handler would."""

    during: Any = None

    def _recv(self, deadline: float | None) -> bytes:
        if self.during is not None:
            during, self.during = self.during, None
            during()
        return super()._recv(deadline)


def make_reentering() -> tuple[MemoryProducer, ReenteringConsumer]:
    address = parse_address("tcp://127.0.0.1:9")
    channel = MemoryChannel()
    producer = MemoryProducer(address, resolve_options(address, MemoryProducer.options, {}), channel)
    consumer = ReenteringConsumer(address, resolve_options(address, (), {}), channel)
    return producer, consumer


def test_close_from_a_handler_inside_a_call_frees_only_when_the_call_leaves() -> None:
    producer, consumer = make_reentering()
    producer.send(b"taken")
    seen: list[int] = []

    def handler() -> None:
        consumer.close()
        seen.append(consumer.closed_count)

    consumer.during = handler
    assert consumer.recv() == b"taken"  # the message it had already begun to take
    assert seen == [0]  # not freed while the call was inside
    assert consumer.closed_count == 1  # freed as it left
    with pytest.raises(ChannelClosed):
        consumer.recv()
    producer.abort()


def test_a_call_begun_from_a_handler_inside_a_call_is_refused_clearly() -> None:
    producer, consumer = make_reentering()
    producer.send(b"one")
    producer.send(b"two")
    errors: list[BaseException] = []

    def handler() -> None:
        try:
            consumer.recv()
        except RuntimeError as error:
            errors.append(error)

    consumer.during = handler
    assert consumer.recv() == b"one"
    assert "only close() and abort() may be called there" in str(errors[0])
    assert consumer.recv() == b"two"
    consumer.close()
    producer.abort()


def test_a_forked_child_is_told_to_open_again_and_its_close_touches_nothing() -> None:
    producer, consumer, _ = make_pair()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            producer.send(b"from the child")
            message = b"sent"
        except ChannelClosed as error:
            message = str(error).encode()
        producer.close()
        consumer.close()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert f"opened in process {os.getpid()} before fork(); open it again in the child" in answer
    producer.send(b"parent")
    producer.close()
    assert list(consumer) == [b"parent"]
    consumer.close()
