"""Channel options and deadlines: the common options, their parsers, and monotonic deadlines.

Every transport declares the options it accepts as `Option`s; `resolve_options` merges
defaults, a URL's query and keyword overrides. A per-call timeout in seconds becomes a
`time.monotonic()` deadline once (`deadline_after`), and waits ask `remaining(deadline)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from podipc.address import Address, suggest
from podipc.errors import (
    AddressError,
)
from podipc.ownership import check_mode_option

DEFAULT_WAIT_SECONDS = 30.0
DEFAULT_MODE = 0o600


# --- deadlines -------------------------------------------------------------


def deadline_after(timeout: float | None) -> float | None:
    """Turn a timeout in seconds (None: no limit) into a monotonic deadline."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout}")
    return time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a deadline (never negative), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two deadlines, where None means never."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


# --- options ---------------------------------------------------------------

SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def parse_size(value: object) -> int:
    """A size in bytes: an int, or text like '4096', '64KiB', '1MiB', '8M'."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().lower()
        number = text.rstrip("kmgib")
        suffix = text[len(number) :]
        if not number.isdigit() or suffix not in SIZE_SUFFIXES:
            raise ValueError("expected a size in bytes such as 4096, 64KiB or 1MiB")
        size = int(number) * SIZE_SUFFIXES[suffix]
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_seconds(value: object) -> float:
    """A duration in seconds, >= 0."""
    if isinstance(value, bool):
        raise ValueError("expected seconds")
    seconds = float(value)  # type: ignore[arg-type]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError("expected a finite number of seconds >= 0")
    return seconds


FOREVER_WORDS = frozenset({"none", "inf", "infinity", "forever"})


def parse_wait(value: object) -> float:
    """The `wait` option: seconds >= 0, or None / 'inf' / 'forever' to wait for the peer forever (math.inf)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in FOREVER_WORDS):
        return math.inf
    if isinstance(value, float) and value == math.inf:
        return math.inf
    return parse_seconds(value)


def parse_count(value: object) -> int:
    """A whole number >= 1."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = value if isinstance(value, int) else int(str(value), 10)
    if number < 1:
        raise ValueError("expected a whole number >= 1")
    return number


def parse_mode(value: object) -> int:
    """A file mode: octal text ('0660', '660') or an int; owner rw, never anything for "other" users."""
    if isinstance(value, bool):
        raise ValueError("expected an octal mode like 0600")
    mode = value if isinstance(value, int) else int(str(value), 8)
    check_mode_option(mode)
    return mode


def parse_bool(value: object) -> bool:
    """A boolean: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Option:
    """One tuning option a channel accepts, in its URL query or as a keyword argument."""

    name: str
    convert: Callable[[object], Any]
    default: Any
    help: str


COMMON_OPTIONS = (
    Option("wait", parse_wait, DEFAULT_WAIT_SECONDS, "seconds a side waits for its peer to appear (none/inf: forever)"),
    Option("mode", parse_mode, DEFAULT_MODE, "octal permissions of created IPC objects (0660 to share a group)"),
)


def schemes_taking(name: str) -> list[str]:
    """The URL schemes (as `scheme://`) whose transport declares the option `name` (for a clear AddressError)."""
    from podipc.transport import transports  # the descriptors import this module

    return [
        f"{scheme}://"
        for transport in transports()
        if any(option.name == name for option in transport.options)
        for scheme in transport.schemes
    ]


def resolve_options(address: Address, accepted: tuple[Option, ...], overrides: Mapping[str, object]) -> dict[str, Any]:
    """Merge defaults, URL query options and keyword overrides, converting and checking each."""
    specs = {option.name: option for option in (*COMMON_OPTIONS, *accepted)}
    given: dict[str, object] = {**address.options, **overrides}
    settings: dict[str, Any] = {name: spec.default for name, spec in specs.items()}
    for name, raw in given.items():
        spec = specs.get(name)
        if spec is None:
            elsewhere = schemes_taking(name)
            if elsewhere:
                raise AddressError(
                    f"option {name!r} is not for {address.scheme}://: only {', '.join(elsewhere)} take it; "
                    f"{address.scheme}:// knows: {', '.join(sorted(specs))}"
                )
            raise AddressError(
                f"unknown option {name!r} for {address.scheme}://{suggest(name, tuple(specs))}; "
                f"known: {', '.join(sorted(specs))}"
            )
        try:
            settings[name] = spec.convert(raw)
        except (TypeError, ValueError) as exc:
            raise AddressError(f"option {name}={raw!r} for {address.scheme}://: {exc}") from exc
    return settings
