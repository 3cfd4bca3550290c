"""What only sysvmq:// has: keys (numbers, or derived from names), queue_bytes and its limits,
mtypes as tags and the consumer's own wake-up messages, a receive buffer of msgmax, and the probe
queue of availability().

Everything sysvmq:// shares with mq:// is tested on both in test_queues.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sysv_ipc
from hypothesis import given
from hypothesis import strategies as st

import podipc
from podipc.address import parse_address, sysv_key_from_name
from podipc.errors import AddressError
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


@pytest.mark.parametrize("text", ["0123", "0o17", "0b101", "1_000", "-5", "00", "0x", "12a", "x1"])
def test_octal_and_python_only_number_forms_are_names(text: str) -> None:
    """No leading zero, no 0o/0b, no underscores: what a C peer reads as a number, podipc does too."""
    assert parse_address(f"sysvmq://{text}").key == sysv_key_from_name(text)


@pytest.mark.parametrize(
    ("text", "key"), [("1", 1), ("1234", 1234), ("0x4d2", 1234), ("0X4D2", 1234), ("2147483647", 2**31 - 1)]
)
def test_decimal_and_hex_keys_are_numbers(text: str, key: int) -> None:
    assert parse_address(f"sysvmq://{text}").key == key


def key_inputs() -> list[str]:
    """KEY texts for comparing readings: the awkward ones, then random ones from a digit-heavy alphabet."""
    fixed = ["0", "1", "01", "0123", "0x", "0x0", "0x1", "0X7fffffff", "0x80000000", "2147483647", "2147483648"]
    fixed += ["99999999999999999999999", "0x10000000000000000", "0o17", "1_000", "-5", "+5", "1e3", "name", "a.b-c"]
    chance = random.Random(11)
    alphabet = "0123456789abcdefxXABCDEF._-+"
    fixed += ["".join(chance.choice(alphabet) for _ in range(chance.randint(1, 12))) for _ in range(3000)]
    return fixed


def agrees_with_podipc(text: str, c_reading: str) -> bool:
    """Whether podipc reads sysvmq://TEXT as the doc's C function said: `number N`, `name` (hashed), or `error`."""
    try:
        key = parse_address(f"sysvmq://{text}").key
    except AddressError as error:
        if c_reading == "name":
            return "must be 1+ characters" in str(error)  # not a valid name: the C peer must refuse it too
        return c_reading == "error" and "out of range" in str(error)
    if c_reading == "name":
        return key == sysv_key_from_name(text)
    return c_reading == f"number {key}"


def test_the_c_reading_of_keys_in_the_wire_doc_agrees_with_podipc(tmp_path: Path) -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("needs a C compiler (apt-get install gcc; scripts/setup.sh installs it)")
    text = SYSV_MQ.wire_doc.read_text()
    found = re.search(r"<!-- key-c -->\s*```c\n(.*?)```", text, re.DOTALL)
    assert found, "docs/wire/sysvmq.md lost its key-c block"
    driver = """
#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        long key = 0;
        int kind = sysvmq_numeric_key(argv[i], &key);
        if (kind == 1) printf("number %ld\\n", key);
        else if (kind == 0) printf("name\\n");
        else printf("error\\n");
    }
    return 0;
}
"""
    source = tmp_path / "key.c"
    source.write_text(found.group(1) + driver)
    program = tmp_path / "key"
    subprocess.run([compiler, "-std=c99", "-Wall", "-Werror", "-o", str(program), str(source)], check=True)
    inputs = key_inputs()
    readings = subprocess.run([str(program), *inputs], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(readings) == len(inputs)
    differ = [
        (key, reading) for key, reading in zip(inputs, readings, strict=True) if not agrees_with_podipc(key, reading)
    ]
    assert not differ, differ[:10]


def test_the_python_reading_of_keys_in_the_wire_doc_agrees_with_podipc() -> None:
    text = SYSV_MQ.wire_doc.read_text()
    found = re.search(r"<!-- key-python -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "docs/wire/sysvmq.md lost its key-python block"
    scope: dict[str, object] = {}
    exec(found.group(1), scope)
    sysvmq_key = scope["sysvmq_key"]
    for key_text in key_inputs():
        try:
            expected: int | None = parse_address(f"sysvmq://{key_text}").key
        except AddressError:
            expected = None
        try:
            got: int | None = sysvmq_key(key_text)  # type: ignore[operator]
        except ValueError:
            got = None
        assert got == expected, key_text


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
