"""The files of a spool: their names, and reading one message file (docs/wire/file.md)."""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from podipc.presence import PRESENCE_PREFIX

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024**2
DEFAULT_DEPTH = 1024
DEFAULT_MAX_BYTES = 256 * 1024**2

SPOOL_PREFIX = "podipc."
MESSAGE_PREFIX = "podipc.msg."
DONE_PREFIX = "podipc.done."
END_PREFIX = "podipc.end."
PART_PREFIX = "podipc.part."
DIRECTORY_MARKER = "podipc.directory"
PRESENCE_TOKEN = "spool"
SEQUENCE_DIGITS = 20
MAX_SEQUENCE = 10**SEQUENCE_DIGITS - 1

SPIN_POLLS = 16
"""Polls without sleeping before the backoff starts (a message usually follows soon)."""
FIRST_BACKOFF_SECONDS = 50e-6
MAX_BACKOFF_SECONDS = 0.005
"""Longest sleep between polls of an idle spool: bounds latency and idle CPU."""
PROBE_SECONDS = 0.1
"""How often a waiting side probes its peer's presence (PeerGone comes within this)."""
RESUME_ATTEMPTS = 1000
TRUNCATE_THRESHOLD = 1024**2
"""A committed message at least this large is truncated, so the done file holds no memory."""

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNREADABLE_ERRNOS = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV})
"""open() errors that mean the entry is no message (a symlink, a socket, not readable): skipped."""


# --- names -----------------------------------------------------------------


class SpoolName(NamedTuple):
    """What a file name in the spool directory means."""

    kind: str
    """message, done, end, part, presence, marker, or malformed (a msg/done/end name without a valid sequence)."""
    sequence: int
    """The sequence number for message, done and end; -1 otherwise."""


def message_name(sequence: int) -> str:
    """File name of message `sequence`."""
    return f"{MESSAGE_PREFIX}{sequence:020d}"


def done_name(sequence: int) -> str:
    """File name of message `sequence` once committed by the consumer."""
    return f"{DONE_PREFIX}{sequence:020d}"


def end_name(count: int) -> str:
    """File name of the end marker of a stream of `count` messages."""
    return f"{END_PREFIX}{count:020d}"


def part_name(sequence: int) -> str:
    """Temporary file name the producer writes message `sequence` under."""
    return f"{PART_PREFIX}{sequence:020d}"


SEQUENCED_KINDS = {MESSAGE_PREFIX: "message", DONE_PREFIX: "done", END_PREFIX: "end"}


def parse_spool_name(name: str) -> SpoolName | None:
    """Classify a directory entry; None for names that are not the spool's.

    The spool's names: ``podipc.msg.*``, ``podipc.done.*``, ``podipc.end.*`` (malformed
    unless followed by exactly 20 ASCII digits), ``podipc.part.*``, ``podipc.presence.*``
    and ``podipc.directory``.
    """
    if not name.startswith(SPOOL_PREFIX):
        return None
    for prefix, kind in SEQUENCED_KINDS.items():
        if name.startswith(prefix):
            digits = name[len(prefix) :]
            if len(digits) == SEQUENCE_DIGITS and digits.isascii() and digits.isdigit():
                return SpoolName(kind, int(digits))
            return SpoolName("malformed", -1)
    if name.startswith(PART_PREFIX):
        return SpoolName("part", -1)
    if name.startswith(PRESENCE_PREFIX):
        return SpoolName("presence", -1)
    if name == DIRECTORY_MARKER:
        return SpoolName("marker", -1)
    return None  # another podipc object sharing the directory (a socket, say): not the spool's


def read_message_file(fd: int, max_message_size: int) -> tuple[bytes | None, int]:
    """The content of an open message file (None when it is not a valid message) and its size.

    Invalid: not a regular file, larger than `max_message_size` (checked with fstat before
    a byte is read), or shorter than fstat said (changed while read).
    """
    status = os.fstat(fd)
    size = status.st_size
    if not stat.S_ISREG(status.st_mode) or size > max_message_size:
        return None, size
    if size == 0:
        return b"", 0
    data = os.read(fd, size)
    if len(data) == size:
        return data, size
    chunks = [data]
    received = len(data)
    while received < size:
        chunk = os.read(fd, size - received)
        if not chunk:
            return None, size
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks), size
