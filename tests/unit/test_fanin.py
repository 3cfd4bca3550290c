"""Fan-in's pieces without processes: the hello on the wire, names, options and which transports have it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

import podipc
from podipc.errors import AddressError
from podipc.fanin import FanInConsumer, _Claims, _hello_length, _name_of
from podipc.framing import BUSY, FANIN_HELLO, HELLO, NAME_TAKEN, WRONG_PATTERN, check_producer_name, fanin_hello
from podipc.queue_fanin import QueueFanInConsumer, QueueFanInProducer
from podipc.stream_producer import default_producer_name
from podipc.transport import fanin_schemes, transport_for, transports


def test_the_pair_hello_is_byte_identical_and_the_answers_differ_from_it() -> None:
    assert HELLO == b"PODIPC\x00\x01"
    assert FANIN_HELLO == b"PODIPC\x00\x02"
    assert len({HELLO, FANIN_HELLO, BUSY, NAME_TAKEN, WRONG_PATTERN}) == 5
    assert all(len(answer) == len(HELLO) for answer in (FANIN_HELLO, BUSY, NAME_TAKEN, WRONG_PATTERN))


def test_a_fanin_hello_carries_its_name_after_its_length() -> None:
    hello = fanin_hello("app-é")
    assert hello == b"PODIPC\x00\x02\x00\x06app-\xc3\xa9"
    assert _hello_length(hello[:3]) == 8
    assert _hello_length(hello[:9]) == 10
    assert _hello_length(hello[:10]) == len(hello)
    assert _name_of(hello) == "app-é"


@pytest.mark.parametrize(
    "received",
    [
        HELLO,
        b"GET / HTTP/1.1",
        FANIN_HELLO + b"\x00\x00",
        FANIN_HELLO + b"\x00\x02\xff\xfe",
        FANIN_HELLO + b"\x00\x05ab",
    ],
)
def test_anything_but_a_whole_fanin_hello_has_no_name(received: bytes) -> None:
    assert _name_of(received) is None


def test_names_are_checked_for_length_and_control_characters() -> None:
    assert check_producer_name("app-1") == "app-1"
    with pytest.raises(ValueError, match="control"):
        check_producer_name("a\nb")
    with pytest.raises(ValueError, match="255 bytes"):
        check_producer_name("x" * 256)


def test_the_default_name_is_hostname_pid_and_a_random_part() -> None:
    first, second = default_producer_name(), default_producer_name()
    assert first.startswith(f"{socket.gethostname()}-") and first != second


def connection() -> socket.socket:
    """One end of a live socket pair (the other end is kept open, so this one has not hung up)."""
    ours, theirs = socket.socketpair()
    KEPT.append((ours, theirs))
    return ours


KEPT: list[tuple[socket.socket, socket.socket]] = []


def test_a_name_is_claimed_once_among_many_threads_and_freed_when_its_producer_ends() -> None:
    claims = _Claims(limit=0)
    answers: list[bytes] = []
    holders = [connection() for _ in range(16)]
    threads = [threading.Thread(target=lambda c=c: answers.append(claims.claim("app", c))) for c in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers).count(FANIN_HELLO) == 1 and answers.count(NAME_TAKEN) == 15
    for holder in holders:
        claims.release("app", holder, cleanly=False)  # only the holder's release frees the name
    assert claims.claim("app", connection()) == FANIN_HELLO


def test_the_name_of_a_holder_whose_connection_hung_up_goes_to_the_next_producer() -> None:
    """A producer killed a moment ago: the consumer has not read its end yet, but nothing more can come."""
    claims = _Claims(limit=0)
    holder, peer = socket.socketpair()
    assert claims.claim("victim", holder) == FANIN_HELLO
    assert claims.claim("victim", connection()) == NAME_TAKEN  # alive: refused
    peer.close()  # the kernel closes a killed process's sockets
    restarted = connection()
    assert claims.claim("victim", restarted) == FANIN_HELLO
    claims.release("victim", holder, cleanly=False)  # the dead one's record ends later: the name stays taken
    assert claims.claim("victim", connection()) == NAME_TAKEN
    holder.close()


def test_the_limit_counts_live_and_cleanly_ended_producers_but_not_dead_ones() -> None:
    claims = _Claims(limit=2)
    a, b = connection(), connection()
    assert claims.claim("a", a) == FANIN_HELLO and claims.claim("b", b) == FANIN_HELLO
    assert claims.claim("c", connection()) == BUSY
    claims.release("a", a, cleanly=False)  # died: its place is free
    assert claims.claim("c", connection()) == FANIN_HELLO
    claims.release("b", b, cleanly=True)
    assert claims.claim("d", connection()) == BUSY
    assert claims.ended_cleanly == 1


def test_the_stream_queue_and_zmq_transports_declare_fanin() -> None:
    with_fanin = {transport.name for transport in transports() if transport.fanin_consumer}
    assert with_fanin == {"unix", "tcp", "posix_mq", "sysv_mq", "zmq"}
    assert fanin_schemes() == ("tcp://", "unix://", "mq://", "sysvmq://", "zmq+tcp://", "zmq+ipc://")
    for name in ("unix", "tcp"):
        transport = transport_for(name)
        assert {"pattern", "producers", "name"} <= {option.name for option in transport.options}
        assert issubclass(transport.fanin_consumer_class(), FanInConsumer)
    for scheme in ("mq", "sysvmq"):
        transport = transport_for(scheme)
        assert {"pattern", "producers", "name"} <= {option.name for option in transport.options}
        assert issubclass(transport.fanin_consumer_class(), QueueFanInConsumer)
        assert issubclass(transport.fanin_producer_class(), QueueFanInProducer)
    zmq = transport_for("zmq+ipc")
    assert {"pattern", "producers", "name"} <= {option.name for option in zmq.options}
    assert zmq.fanin_consumer_class().__name__ == "ZMQFanInConsumer"


def test_a_transport_without_fanin_refuses_it_naming_those_with_it() -> None:
    with pytest.raises(AddressError, match=r"runs over tcp://, unix://, mq://, sysvmq://"):
        podipc.consumer("shm:///podipc-unit-fanin?pattern=fanin")
    with pytest.raises(AddressError, match="producers=2 is fan-in"):
        podipc.consumer("shm:///podipc-unit-fanin", producers=2)
    with pytest.raises(AddressError, match="not supported by shm://"):
        transport_for("shm").fanin_consumer_class()


def test_producers_with_pattern_pair_contradict_each_other() -> None:
    with pytest.raises(AddressError, match="needs pattern=fanin"):
        podipc.consumer("unix://@podipc-unit-fanin", pattern="pair", producers=2)


def test_pattern_pair_is_accepted_everywhere(tmp_path: Path) -> None:
    with podipc.consumer("unix://@podipc-unit-pair?pattern=pair", wait=1) as consumer:
        assert not isinstance(consumer, FanInConsumer)
    with podipc.consumer(f"file://{tmp_path}?pattern=pair", wait=1) as consumer:
        assert consumer.address.scheme == "file"
