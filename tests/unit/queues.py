"""The two kernel queues as the tests see them: one QueueKit for mq:// and one for sysvmq://.

tests/unit/test_queues.py runs the behaviour both queues share over both kits (a fixture
parametrized by queue, as anyio parametrizes its backends); test_posix_mq.py and
test_sysv_mq.py use their own kit for what is special to one queue. A kit knows how to
reach its queue without podipc (the raw library, as a plain peer would), what a test
needs to fill it, and what its errors name.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import multiprocessing
import multiprocessing.synchronize
import os
import re
import signal
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import posix_ipc
import pytest
import sysv_ipc

import podipc
from podipc.address import parse_address
from podipc.presence import presence_path
from podipc.queue import QueueConsumer
from podipc.transports.posix_mq import PosixMQConsumer
from podipc.transports.sysv_mq import SysVMQConsumer

FORK = multiprocessing.get_context("fork")
WIRE_DOCS = Path(__file__).resolve().parents[2] / "docs" / "wire"


class QueueKit(ABC):
    """One kernel queue transport, with raw access to its queue for the tests."""

    scheme: ClassVar[str]
    consumer_class: ClassVar[type[QueueConsumer]]
    limit_source: ClassVar[str]
    """Where max_message_size comes from by default, as MessageTooLarge names it."""
    data_mark: ClassVar[int]
    """The tag (priority, mtype) of a data message on the wire."""
    end_mark: ClassVar[int]
    """The tag of the end marker (an empty message)."""
    garbage_mark: ClassVar[int] = 7
    """A tag that is neither data nor the end marker."""
    raw_marks: ClassVar[range]
    """Tags a raw peer may use, for the property tests."""
    adopted_limit_words: ClassVar[str]
    """What MessageTooLarge says of a limit a producer adopted from the consumer's smaller queue."""

    @property
    def module(self) -> ModuleType:
        """The transport module (availability, host_max_message_size)."""
        return importlib.import_module(self.consumer_class.__module__)

    @property
    def kernel_max(self) -> int:
        """The host's largest message for this queue."""
        return int(self.module.host_max_message_size())

    @property
    def wire_doc(self) -> Path:
        """The wire document, with the plain peers' scripts."""
        return WIRE_DOCS / f"{self.scheme}.md"

    @abstractmethod
    def queue_options(self, messages: int, size: int) -> dict[str, object]:
        """Consumer options for a queue that holds `messages` messages of `size` bytes and no more."""

    def new_url(self) -> str:
        """A channel URL no other test uses."""
        return f"{self.scheme}://{self._url_prefix()}podipc-test-{self.scheme}-{uuid.uuid4().hex[:12]}"

    def _url_prefix(self) -> str:
        return ""

    @abstractmethod
    def delivery_order(self, sent: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The order in which the kernel hands out messages put in as `sent` (tag, data)."""

    @abstractmethod
    def queue_exists(self, url: str) -> bool:
        """True while the channel's queue exists."""

    @abstractmethod
    def remove_queue(self, url: str) -> None:
        """Remove the channel's queue if it exists."""

    @abstractmethod
    def raw_send(self, url: str, data: bytes, mark: int) -> None:
        """Put one message tagged `mark` into the channel's queue, as a plain peer would."""

    @abstractmethod
    def create_raw(self, url: str) -> None:
        """Create the channel's queue (mode 0600) as another application would."""

    @abstractmethod
    def raw_receive(self, url: str) -> bytes:
        """Take the next message out of the channel's queue without waiting (its body)."""

    @abstractmethod
    def queue_mode(self, url: str) -> int:
        """The permission bits of the channel's queue."""

    def leftovers(self, url: str) -> list[str]:
        """What a channel left behind: its queue and presence files."""
        found = glob.glob(presence_path(parse_address(url).token, "*"))
        if self.queue_exists(url):
            found.append(f"the queue of {url}")
        return found

    def scrub(self, url: str) -> None:
        """Remove whatever a (killed) test run left: the queue and both presence files."""
        self.remove_queue(url)
        for path in glob.glob(presence_path(parse_address(url).token, "*")):
            os.unlink(path)

    def fresh_url(self) -> Iterator[str]:
        """For a fixture: a fresh channel URL; the test fails if the channel leaves anything behind."""
        url = self.new_url()
        yield url
        left = self.leftovers(url)
        self.scrub(url)
        assert not left, f"left behind: {left}"

    def url_fixture(self) -> Any:
        """A `url` fixture for a test module of this queue alone (assign it to `url` there)."""

        @pytest.fixture(name="url")
        def fresh_url() -> Iterator[str]:
            yield from self.fresh_url()

        return fresh_url

    def plain_script(self, marker: str) -> str:
        """The code block after `<!-- marker -->` in the wire document."""
        text = self.wire_doc.read_text()
        found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.DOTALL)
        assert found, f"no {marker} script in {self.wire_doc}"
        return found.group(1)

    def __repr__(self) -> str:
        return self.scheme


class PosixMQKit(QueueKit):
    """mq://: the POSIX queue /NAME; the tag is the priority."""

    scheme = "mq"
    consumer_class = PosixMQConsumer
    data_mark, end_mark = 1, 0
    raw_marks = range(41)

    # its size: depth messages of up to max_message_size bytes
    limit_source = "/proc/sys/fs/mqueue/msgsize_max"
    adopted_limit_words = "max_message_size of the queue"

    def queue_options(self, messages: int, size: int) -> dict[str, object]:
        return {"depth": messages, "max_message_size": size}

    def _url_prefix(self) -> str:
        return "/"

    def delivery_order(self, sent: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return sorted(sent, key=lambda message: -message[0])  # highest priority first, FIFO within one

    def queue_name(self, url: str) -> str:
        """The mq_open name of the channel's queue."""
        return "/" + parse_address(url).name

    def queue_exists(self, url: str) -> bool:
        try:
            posix_ipc.MessageQueue(self.queue_name(url)).close()
        except posix_ipc.ExistentialError:
            return False
        return True

    def remove_queue(self, url: str) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_message_queue(self.queue_name(url))

    def raw_send(self, url: str, data: bytes, mark: int) -> None:
        raw = posix_ipc.MessageQueue(self.queue_name(url))
        try:
            raw.send(data, priority=mark)
        finally:
            raw.close()

    def create_raw(self, url: str) -> None:
        posix_ipc.MessageQueue(self.queue_name(url), posix_ipc.O_CREX, 0o600, 4, 64).close()

    def raw_receive(self, url: str) -> bytes:
        raw = posix_ipc.MessageQueue(self.queue_name(url))
        try:
            data: bytes = raw.receive(0)[0]
            return data
        finally:
            raw.close()

    def queue_mode(self, url: str) -> int:
        raw = posix_ipc.MessageQueue(self.queue_name(url))
        try:
            return os.fstat(raw.mqd).st_mode & 0o777
        finally:
            raw.close()


class SysVMQKit(QueueKit):
    """sysvmq://: the SysV queue whose key the URL names or derives; the tag is the mtype."""

    scheme = "sysvmq"
    consumer_class = SysVMQConsumer
    data_mark, end_mark = 1, 2
    raw_marks = range(1, 13)  # mtypes are positive

    # its size: queue_bytes in all, messages of up to max_message_size bytes
    limit_source = "/proc/sys/kernel/msgmax"
    adopted_limit_words = "capacity"

    def queue_options(self, messages: int, size: int) -> dict[str, object]:
        return {"queue_bytes": messages * size, "max_message_size": size}

    def delivery_order(self, sent: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return list(sent)  # msgrcv with type 0: first in, first out

    def raw_queue(self, url: str) -> Any:
        """The channel's queue, opened with plain sysv_ipc."""
        return sysv_ipc.MessageQueue(parse_address(url).key, 0, 0, self.kernel_max)

    def queue_exists(self, url: str) -> bool:
        try:
            sysv_ipc.MessageQueue(parse_address(url).key)
        except sysv_ipc.ExistentialError:
            return False
        return True

    def remove_queue(self, url: str) -> None:
        with contextlib.suppress(sysv_ipc.ExistentialError):
            sysv_ipc.MessageQueue(parse_address(url).key).remove()

    def raw_send(self, url: str, data: bytes, mark: int) -> None:
        self.raw_queue(url).send(data, True, mark)

    def create_raw(self, url: str) -> None:
        sysv_ipc.MessageQueue(parse_address(url).key, sysv_ipc.IPC_CREX, 0o600)

    def raw_receive(self, url: str) -> bytes:
        data: bytes = self.raw_queue(url).receive(False)[0]
        return data

    def queue_mode(self, url: str) -> int:
        return int(self.raw_queue(url).mode) & 0o777


POSIX_MQ = PosixMQKit()
SYSV_MQ = SysVMQKit()
KITS = (POSIX_MQ, SYSV_MQ)


# --- child processes (forked) ---------------------------------------------------------


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


def consume_then_hang(url: str, options: dict[str, object], ready: multiprocessing.synchronize.Event) -> None:
    """Child process: open a consumer with `options`, never receive, hang (to be killed)."""
    consumer = podipc.consumer(url, **options)
    ready.set()
    signal.pause()
    consumer.close()


def consume_forever(url: str, ready: multiprocessing.synchronize.Event) -> None:
    """Child process: receive and drop every message until killed."""
    with podipc.consumer(url, wait=20) as consumer:
        ready.set()
        for _ in consumer:
            pass


def consume_after(url: str, delay: float, results: Any) -> None:
    """Child process: open a consumer, wait `delay` seconds, then read to the end; report the messages."""
    with podipc.consumer(url, wait=20) as consumer:
        time.sleep(delay)
        results.put(list(consumer))


def sample_messages(kernel_max: int) -> list[bytes]:
    """Messages of every awkward size up to the kernel's largest, empty ones included."""
    return [b"", b"a", b"", bytes(range(256)), b"\0" * kernel_max, b"z" * 100, b""] + [
        os.urandom(i * 37 % kernel_max) for i in range(60)
    ]
