"""Find and remove what SIGKILLed podipc processes left behind, and nothing else.

Every side of a channel holds a presence file (podipc.presence) that lists the IPC
objects it created. A presence file whose lock is free belongs to a dead process;
when no live side of the same channel remains, the objects it lists and the file
itself are leftovers. Objects are never guessed from names: what podipc did not
record is not touched. One exception, confined to the directory of a dead side's
presence file: temporaries its transport declares (podipc.transport.Temporaries: the
spool's `podipc.part.*`, half-written messages, never data) go too; the spool's message
files stay (docs/wire/file.md). How each kind of object is removed is declared by the
transports (podipc.transport.ObjectKind).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from podipc.errors import PodIPCError
from podipc.presence import DECLARATION, PRESENCE_DIRECTORY, PRESENCE_PREFIX, ROLES, PeerState, probe
from podipc.transport import object_kinds, transports

TEMPORARY_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Leftover:
    """One object a dead podipc process left: its kind, its name, and the presence file that recorded it."""

    kind: str
    name: str
    recorded_in: str
    holder: str

    def describe(self) -> str:
        """A one-line human description."""
        return f"{self.kind} {self.name} (left by {self.holder or 'an unknown process'})"


def _presence_files(directory: str) -> list[str]:
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, entry) for entry in entries if entry.startswith(PRESENCE_PREFIX))


def _channel_of(path: str) -> tuple[str, str]:
    """(token, role) from a presence file name."""
    stem = os.path.basename(path)[len(PRESENCE_PREFIX) :]
    token, _, role = stem.rpartition(".")
    return token, role


def _read_record(path: str) -> tuple[str, list[tuple[str, str]]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as record:
            lines = record.read().splitlines()
    except OSError:
        return "", []
    holder = f"pid {lines[0]}" if lines else ""
    objects = []
    for line in lines[1:]:
        kind, _, name = line.partition(" ")
        if kind and name and kind != DECLARATION:
            objects.append((kind, name))
    return holder, objects


def find_leftovers(directories: Iterable[str] = (PRESENCE_DIRECTORY,)) -> list[Leftover]:
    """Leftovers of dead podipc processes in the given presence directories (/dev/shm and any spool dirs)."""
    found: list[Leftover] = []
    for directory in directories:
        paths = _presence_files(directory)
        for path in paths:
            if path.endswith(TEMPORARY_SUFFIX):
                if probe(path) is not PeerState.ALIVE:
                    found.append(Leftover("path", path, path, "an interrupted start"))
                continue
            token, role = _channel_of(path)
            if role not in ROLES or probe(path) is not PeerState.GONE:
                continue
            other = os.path.join(directory, f"{PRESENCE_PREFIX}{token}.{ROLES[1 - ROLES.index(role)]}")
            if probe(other) is PeerState.ALIVE:
                continue
            holder, objects = _read_record(path)
            found += [Leftover(kind, name, path, holder) for kind, name in objects]
            found += [Leftover("path", name, path, holder) for name in _temporaries(directory, token, role)]
            found.append(Leftover("path", path, path, holder))
    return found


def _temporaries(directory: str, token: str, role: str) -> list[str]:
    """The temporaries a dead side of this token and role left in its directory, as its transport declares them."""
    prefixes = tuple(
        transport.temporaries.prefix
        for transport in transports()
        if transport.temporaries is not None
        and (transport.temporaries.presence_token, transport.temporaries.role) == (token, role)
    )
    if not prefixes:
        return []
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, entry) for entry in entries if entry.startswith(prefixes))


def remove(leftover: Leftover) -> None:
    """Remove one leftover; an object already gone is fine. Raises PodIPCError when it cannot."""
    kind = object_kinds().get(leftover.kind)
    if kind is None:
        raise PodIPCError(f"unknown kind of leftover {leftover.kind!r} in {leftover.recorded_in}")
    try:
        kind.remove(leftover.name)
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc.strerror}; run as its owner") from exc
    except Exception as exc:
        if type(exc).__name__ == "ExistentialError":
            return
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc}") from exc
