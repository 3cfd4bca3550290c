"""The shm:// options, the ring geometry they give, and what a default ring needs here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podipc.errors import AddressError
from podipc.options import Option, parse_count, parse_seconds, parse_size
from podipc.transport import DEV_SHM_FIX
from podipc.transports.shm.layout import ALIGNMENT, MAX_RECORD_LENGTH, check_geometry
from podipc.transports.shm.segment import availability_for

DEFAULT_CAPACITY = 8 * 1024 * 1024
DEFAULT_SPIN_SECONDS = 0.0005
PATTERNS = ("pair", "broadcast")
SLOW_POLICIES = ("wait", "drop")
MAX_SUBSCRIBERS = 64
"""Most subscriber slots a broadcast ring has (each is a 64-byte slot in its header and a FIFO)."""
MAX_MESSAGE_SOURCE = "shm max_message_size (default capacity // 2)"
"""Where a side's limit comes from before a producer has attached (then: the ring's, see ring_limit_source)."""
MAX_MESSAGE_FIX = f"raise capacity= and max_message_size= on both sides; {DEV_SHM_FIX} if it is too small"

RING_OPTIONS = (
    Option(
        "capacity", parse_size, DEFAULT_CAPACITY, "ring size in bytes (set by the consumer, which creates the ring)"
    ),
    Option(
        "max_message_size",
        parse_size,
        None,
        "largest message in bytes (default capacity // 2, at most capacity - 8 and 4 GiB - 1)",
    ),
    Option("spin", parse_seconds, DEFAULT_SPIN_SECONDS, "seconds to busy-poll before sleeping on a semaphore"),
)


def parse_choice(value: object, choices: tuple[str, ...]) -> str:
    """`value` as one of `choices`; ValueError naming them otherwise."""
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return text


def parse_subscribers(value: object) -> int:
    """A subscriber count from 1 to MAX_SUBSCRIBERS."""
    count = parse_count(value)
    if not 1 <= count <= MAX_SUBSCRIBERS:
        raise ValueError(f"must be from 1 to {MAX_SUBSCRIBERS}")
    return count


def parse_pattern(value: object) -> str:
    """pair or broadcast."""
    return parse_choice(value, PATTERNS)


def parse_slow(value: object) -> str:
    """wait or drop."""
    return parse_choice(value, SLOW_POLICIES)


BROADCAST_OPTIONS = (
    Option(
        "pattern",
        parse_pattern,
        "pair",
        "pair (one producer, one consumer) or broadcast (one producer, N subscribers each get every message)",
    ),
    Option(
        "subscribers",
        parse_subscribers,
        None,
        f"broadcast: subscriber slots (1 to {MAX_SUBSCRIBERS}, default 1); the producer waits for this many "
        "before its first send",
    ),
    Option(
        "slow",
        parse_slow,
        "wait",
        "broadcast: a slow subscriber is waited for (wait) or overrun, counting its loss (drop)",
    ),
)
"""Options only a broadcast ring uses (pattern=pair refuses subscribers= and slow=)."""

OPTIONS = (*RING_OPTIONS, *BROADCAST_OPTIONS)


def default_max_message_size(capacity: int) -> int:
    """The max message size of a ring of `capacity` bytes when none is given: half of it (at most 4 GiB - 8)."""
    return min(capacity // 2, MAX_RECORD_LENGTH) // ALIGNMENT * ALIGNMENT


def ring_limit_source(location: str) -> str:
    """Where a producer's limit comes from once attached: the ring's header, set by its consumer."""
    return f"the max message size of the ring {location} (set by its consumer)"


def ring_geometry(settings: Mapping[str, Any], url: str) -> tuple[int, int]:
    """Capacity and max message size from the options, checked; AddressError when unusable."""
    capacity = int(settings["capacity"])
    given = settings["max_message_size"]
    max_message_size = default_max_message_size(capacity) if given is None else int(given)
    try:
        check_geometry(capacity, max_message_size)
    except ValueError as exc:
        raise AddressError(f"{url}: {exc}") from exc
    return capacity, max_message_size


def availability() -> str | None:
    """None when shm:// works here (a default ring fits /dev/shm), else why not and the fix."""
    return availability_for(DEFAULT_CAPACITY, "a default ring")


def host_max_message_size() -> int:
    """The default max message size here: half the default ring."""
    return default_max_message_size(DEFAULT_CAPACITY)
