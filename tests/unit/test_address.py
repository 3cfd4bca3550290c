"""Parsing channel URLs: every scheme, and a clear AddressError for every malformed one."""

from __future__ import annotations

import re

import pytest

from podipc.address import Address, parse_address, sysv_key_from_name
from podipc.errors import AddressError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:7000", {"scheme": "tcp", "host": "127.0.0.1", "port": 7000}),
        ("udp://localhost:7001", {"scheme": "udp", "host": "localhost", "port": 7001}),
        ("tcp://[::1]:7000", {"scheme": "tcp", "host": "::1", "port": 7000}),
        ("zmq+tcp://127.0.0.1:7002", {"scheme": "zmq+tcp", "host": "127.0.0.1", "port": 7002}),
        ("unix:///shared/podipc.sock", {"scheme": "unix", "path": "/shared/podipc.sock", "abstract": False}),
        ("unix://@podipc", {"scheme": "unix", "name": "podipc", "abstract": True}),
        ("zmq+ipc:///shared/zmq.sock", {"scheme": "zmq+ipc", "path": "/shared/zmq.sock"}),
        ("mq:///podipc", {"scheme": "mq", "name": "podipc"}),
        ("shm:///ring-1", {"scheme": "shm", "name": "ring-1"}),
        ("file:///shared/spool", {"scheme": "file", "path": "/shared/spool"}),
        ("sysvmq://1234", {"scheme": "sysvmq", "key": 1234}),
        ("sysvmq://0x4d2", {"scheme": "sysvmq", "key": 1234}),
        ("MQ:///podipc", {"scheme": "mq", "name": "podipc"}),
    ],
)
def test_valid_urls_parse_to_their_parts(url: str, expected: dict[str, object]) -> None:
    address = parse_address(url)
    for field, value in expected.items():
        assert getattr(address, field) == value


def test_sysv_name_derives_a_stable_nonzero_key() -> None:
    address = parse_address("sysvmq://podipc")
    assert address.key == sysv_key_from_name("podipc")
    assert 0 < address.key <= 0x7FFFFFFF
    assert parse_address("sysvmq://podipc").key == address.key


def test_query_options_are_kept_as_text() -> None:
    address = parse_address("mq:///podipc?depth=4&mode=0660")
    assert address.options == {"depth": "4", "mode": "0660"}
    assert address.location == "mq:///podipc"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:7000", "not a channel URL"),
        ("tpc://127.0.0.1:7000", "did you mean 'tcp'"),
        ("tcp://127.0.0.1", "expected HOST:PORT"),
        ("tcp://127.0.0.1:0", "port '0'"),
        ("tcp://127.0.0.1:70000", "port '70000'"),
        ("tcp://example.com:80", "not an IP address"),
        ("udp://127.0.0.1:port", "port 'port'"),
        ("unix://relative.sock", "absolute path"),
        ("unix:///" + "x" * 120, "at most 107 bytes"),
        ("mq://podipc", "three slashes"),
        ("mq:///", "name ''"),
        ("mq:///a/b", "must be 1+ characters"),
        ("shm:///" + "x" * 300, "characters; at most"),
        ("sysvmq://", "expected sysvmq://KEY"),
        ("sysvmq://0", "out of range"),
        ("sysvmq://0x0", "out of range"),
        ("sysvmq://2147483648", "out of range"),
        ("sysvmq://0x80000000", "out of range"),
        ("sysvmq://+5", "must be 1+ characters"),
        ("mq:///q?depth=1&depth=2", "given twice"),
        ("mq:///q?depth", "malformed query"),
    ],
)
def test_malformed_urls_raise_address_error_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)):
        parse_address(url)


def test_token_is_filesystem_safe_and_distinguishes_channels() -> None:
    first = parse_address("tcp://127.0.0.1:7000").token
    second = parse_address("tcp://127.0.0.1:7001").token
    assert first != second
    assert "/" not in first and ":" not in first
    assert parse_address("tcp://127.0.0.1:7000?wait=1").token == first


def test_address_is_a_value() -> None:
    assert parse_address("mq:///a") == Address(url="mq:///a", scheme="mq", name="a")
