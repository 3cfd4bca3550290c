"""Messages for `podipc produce`, and the digest both sides print to prove a stream arrived whole.

Generated messages are a pure function of (seed, index), so a restarted producer can
regenerate and skip what it already sent, and a test can predict every byte.
"""

from __future__ import annotations

import builtins
import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

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


def stdin_chunks(stream: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    """Standard input cut into messages of at most `chunk_size` bytes (the last may be shorter)."""
    read = stream.read
    while True:
        chunk = read(chunk_size)
        if not chunk:
            return
        yield chunk


class RateLimiter:
    """Spaces calls to at most `per_second` a second (0: unlimited), without drift."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        """Sleep until the next call is due."""
        if not self.interval:
            return
        delay = self.next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
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
