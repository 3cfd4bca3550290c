"""Messages for `podipc produce`, their framing on standard input and output, and the digest both sides print.

Generated messages are a pure function of (seed, index), so a restarted producer can
regenerate and skip what it already sent, and a test can predict every byte.

Framing (`produce --stdin` reads with it, `consume --output` writes with it, so
`produce --stdin | ... | consume --output` gives back what went in):

- `lines` (the default): one message per line, without its newline; written back as the
  message and a newline. Exact for text whose last line ends with a newline (a last line
  without one is sent too, and gets its newline on output).
- `length`: each message is a 4-byte big-endian length, then that many bytes; exact for
  any bytes, including messages that contain newlines or are empty.
- `raw`: no boundaries: whatever one read of standard input returns (at most the chunk
  size) is one message; written back concatenated. Exact for any byte stream.

Each message is handed on as soon as it is complete: a line is sent when its newline is
read, not when a buffer fills (a `tail -f` stdin delivers its first line at once).
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import os
import random
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from podipc.errors import ProtocolError

PATTERN_BLOCK = bytes(range(256)) * 16


def fixed_message(index: int, size: int) -> bytes:
    """Message `index` of a fixed-size stream: its index in 8 bytes, then a repeating byte pattern."""
    head = index.to_bytes(8, "big")[:size]
    if size <= len(head):
        return head
    body_size = size - len(head)
    repeats = body_size // len(PATTERN_BLOCK) + 1
    return head + (PATTERN_BLOCK * repeats)[:body_size]


def random_message(seed: int, index: int, max_size: int) -> bytes:
    """Message `index` of a random stream: a length in 0..max_size and bytes drawn from (seed, index)."""
    generator = random.Random(seed * 1_000_003 + index)
    size = generator.randint(0, max_size)
    return generator.randbytes(size)


def generated_messages(count: int, size: int, randomize: bool, seed: int, start: int = 0) -> Iterator[bytes]:
    """Messages start..count-1 of a generated stream."""
    for index in range(start, count):
        yield random_message(seed, index, size) if randomize else fixed_message(index, size)


class Framing(enum.Enum):
    """How messages are cut from standard input and written to an output (the module docstring says each)."""

    LINES = "lines"
    LENGTH = "length"
    RAW = "raw"


LENGTH_PREFIX = struct.Struct(">I")
"""The header of `length` framing: the payload's size in bytes, 4 bytes big-endian."""
READ_SIZE = 65536
"""Bytes asked of one read of standard input (lines and length framing)."""
NEWLINE = b"\n"


def read_messages(
    fd: int,
    framing: Framing,
    *,
    chunk_size: int = READ_SIZE,
    max_size: int,
    too_large: Callable[[int], Exception],
    stop_fd: int = -1,
) -> Iterator[bytes]:
    """Messages framed as `framing` from file descriptor `fd`, each yielded as soon as it is complete.

    Reads whatever is there (never waits for a buffer to fill); stops at the end of input
    or when `stop_fd` (e.g. close_on_signals().fileno()) becomes readable. A message
    longer than `max_size` bytes raises `too_large(size)` as soon as that is known (a
    line is not buffered without bound); `length` input that ends inside a frame raises
    ProtocolError.
    """
    chunks = _reads(fd, chunk_size if framing is Framing.RAW else READ_SIZE, stop_fd)
    if framing is Framing.RAW:
        yield from chunks
    elif framing is Framing.LINES:
        yield from _lines(chunks, max_size, too_large)
    else:
        yield from _length_prefixed(chunks, max_size, too_large)


def _reads(fd: int, size: int, stop_fd: int) -> Iterator[bytes]:
    """What each read of `fd` returns, until the end of input or `stop_fd` is readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if stop_fd >= 0:
        poller.register(stop_fd, select.POLLIN)
    while True:
        ready = {descriptor for descriptor, _ in poller.poll()}
        if stop_fd in ready:
            return
        data = os.read(fd, size)
        if not data:
            return
        yield data


def _lines(chunks: Iterator[bytes], max_size: int, too_large: Callable[[int], Exception]) -> Iterator[bytes]:
    pending = b""
    for data in chunks:
        if pending:
            data = pending + data
        lines = data.split(NEWLINE)
        pending = lines.pop()
        for line in lines:
            if len(line) > max_size:
                raise too_large(len(line))
            yield line
        if len(pending) > max_size:
            raise too_large(len(pending))
    if pending:
        yield pending


def _length_prefixed(chunks: Iterator[bytes], max_size: int, too_large: Callable[[int], Exception]) -> Iterator[bytes]:
    buffer = bytearray()
    header = LENGTH_PREFIX.size
    for data in chunks:
        buffer += data
        start = 0
        while len(buffer) - start >= header:
            (size,) = LENGTH_PREFIX.unpack_from(buffer, start)
            if size > max_size:
                raise too_large(size)
            end = start + header + size
            if end > len(buffer):
                break
            yield bytes(buffer[start + header : end])
            start = end
        del buffer[:start]
    if buffer:
        raise ProtocolError(
            f"the input ended inside a length-prefixed message ({len(buffer)} bytes after the last whole one)"
        )


class MessageWriter:
    """Writes messages to a binary stream with a framing, so that read_messages() gives them back."""

    def __init__(self, stream: IO[bytes], framing: Framing) -> None:
        self.stream = stream
        self.framing = framing

    def write(self, message: builtins.bytes | memoryview) -> None:
        """Write one message (not flushed: call flush() when no message follows at once)."""
        if self.framing is Framing.LENGTH:
            self.stream.write(LENGTH_PREFIX.pack(len(message)))
        self.stream.write(message)
        if self.framing is Framing.LINES:
            self.stream.write(NEWLINE)

    def flush(self) -> None:
        """Hand what was written to the operating system."""
        self.stream.flush()


class RateLimiter:
    """Spaces calls to at most `per_second` a second (0: unlimited), without drift.

    `sleep(seconds)` does the waiting (default time.sleep); one that returns True stops
    the waiting early (close_on_signals().sleep, so a signal ends a slow stream at once).
    """

    def __init__(self, per_second: float, sleep: Callable[[float], object] = time.sleep) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next_at = time.monotonic()
        self.sleep = sleep

    def wait(self) -> None:
        """Sleep until the next call is due."""
        if not self.interval:
            return
        delay = self.next_at - time.monotonic()
        if delay > 0 and self.sleep(delay) is True:
            return
        self.next_at = max(self.next_at, time.monotonic() - self.interval) + self.interval


@dataclass
class StreamSummary:
    """Counts and SHA-256 over the concatenated payloads, in order: the line both sides print."""

    role: str
    url: str
    messages: int = 0
    bytes: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def add(self, payload: builtins.bytes | memoryview) -> None:
        """Count one message and fold it into the digest."""
        self.messages += 1
        self.bytes += len(payload)
        self.digest.update(payload)

    def as_dict(self, **extra: object) -> dict[str, object]:
        """The summary as a JSON-ready dict; `extra` keys are appended."""
        return {
            "role": self.role,
            "url": self.url,
            "messages": self.messages,
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
            **extra,
        }
