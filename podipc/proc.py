"""Read kernel settings from /proc: the limits channels, bench and doctor report and obey."""

from __future__ import annotations


def read_int(path: str) -> int | None:
    """The first integer of a /proc file (e.g. /proc/sys/fs/mqueue/msgsize_max), None when unreadable."""
    try:
        with open(path, "rb") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_int_or(path: str, fallback: int) -> int:
    """The first integer of a /proc file, or `fallback` when it cannot be read."""
    value = read_int(path)
    return fallback if value is None else value
