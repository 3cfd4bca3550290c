"""Find and remove what SIGKILLed podipc processes left behind: only what it can prove is theirs.

Every side of a channel holds a presence file (podipc.presence) that names its channel
and lists the IPC objects it created. A presence file whose lock is free belongs to a
dead process; when no live side of the same channel remains, the objects it lists and
the file itself are leftovers. Anyone can write a file in /dev/shm, so a listed object is
removed only when all of these hold:

- the presence file is a regular file written by our own user (root cleans root's own);
- its `channel` line names a channel whose token is the one in the file's name;
- the object is one podipc creates for that channel (what its transport declares:
  podipc.transport.Transport.channel_objects), never an arbitrary path or key named in the file;
- the object itself is still ours (owner, and creator for SysV), and no live side of any
  channel names it;
- links are never followed: files are looked at with lstat and opened with O_NOFOLLOW.

Everything else found at a presence path (another user's file, a FIFO, a symlink, a record
naming objects it cannot prove) is refused, with the reason (`survey().refused`; the CLI
prints them). One exception to "recorded objects only", confined to the directory of a
dead side's presence file: temporaries its transport declares (podipc.transport.Temporaries:
the spool's `podipc.part.*`, half-written messages, never data) go too, when ours; the
spool's message files stay (docs/wire/file.md). How each kind of object is removed, and
how its owner is found, is declared by the transports (podipc.transport.ObjectKind).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from podipc.address import Address, parse_address
from podipc.errors import AddressError, PodIPCError
from podipc.ownership import OPEN_FLAGS, Trust, kind_problem, owner_text, user_text
from podipc.presence import (
    CHANNEL,
    DECLARATION,
    PRESENCE_DIRECTORY,
    PRESENCE_PREFIX,
    RECORD_LIMIT_BYTES,
    ROLES,
    TEMPORARY_SUFFIX,
    PeerState,
    base_token,
    lock_state,
    remove_if_gone,
)
from podipc.transport import PATH_OBJECT, object_kinds, transport_for, transports
from podipc.work_queue import LOCK_SUFFIX


@dataclass(frozen=True)
class Leftover:
    """One object a dead podipc process left: its kind, its name, and the presence file that recorded it."""

    kind: str
    name: str
    recorded_in: str
    holder: str
    guards: tuple[str, ...] = field(default=(), compare=False)
    """The channel's presence files: if one is alive again at removal, the object is kept."""
    temporary: bool = field(default=False, compare=False)
    """A temporary its transport declares (a regular file), not a recorded object."""

    def describe(self) -> str:
        """A one-line human description."""
        return f"{self.kind} {self.name} (left by {self.holder or 'an unknown process'})"


@dataclass(frozen=True)
class Refusal:
    """Something clean found and will not remove, and why."""

    kind: str
    name: str
    reason: str
    recorded_in: str = ""

    def describe(self) -> str:
        """A one-line human description."""
        return f"{self.kind} {self.name}: {self.reason}"


@dataclass
class Survey:
    """What clean found: what it would remove, and what it refuses to touch."""

    leftovers: list[Leftover] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


@dataclass
class _Entry:
    """A presence file as found: its status (lstat), its holder's state, and its lines."""

    path: str
    status: os.stat_result
    state: PeerState | None
    """None when it cannot be told (not a regular file, not readable)."""
    lines: list[str]

    @property
    def token(self) -> str:
        return _channel_of(self.path)[0]

    @property
    def role(self) -> str:
        return _channel_of(self.path)[1]

    def regular(self) -> bool:
        return stat.S_ISREG(self.status.st_mode)


def channel_objects(address: Address) -> frozenset[tuple[str, str]]:
    """The IPC objects podipc creates for a channel, as (kind, name): the only ones clean may remove for it."""
    return frozenset(transport_for(address.scheme).channel_objects(address))


def survey(directories: Iterable[str] = (PRESENCE_DIRECTORY,)) -> Survey:
    """What clean would remove and what it refuses, in the given presence directories (/dev/shm, spool dirs)."""
    found = Survey()
    for directory in directories:
        _survey_directory(directory, found)
    return found


def find_leftovers(directories: Iterable[str] = (PRESENCE_DIRECTORY,)) -> list[Leftover]:
    """Leftovers of dead podipc processes that clean can prove are theirs (see survey() for the refusals too)."""
    return survey(directories).leftovers


def _survey_directory(directory: str, found: Survey) -> None:
    entries = [entry for entry in map(_inspect, _presence_files(directory)) if entry is not None]
    live = _objects_of_live_channels(entries)
    channels: dict[str, dict[str, _Entry]] = {}
    for entry in entries:
        if entry.path.endswith(TEMPORARY_SUFFIX):
            _survey_temporary(entry, found)
        elif entry.role in ROLES:
            channels.setdefault(entry.token, {})[entry.role] = entry
            _refuse_if_not_ours(entry, found)
        elif entry.role == LOCK_SUFFIX:
            _survey_queue_lock(entry, entries, found)
    for token, roles in channels.items():
        _survey_channel(directory, token, roles, live, found)


def _survey_queue_lock(entry: _Entry, entries: list[_Entry], found: Survey) -> None:
    """A work queue's consumers lock (podipc.work_queue): ours, not held, no live side of its channel -> leftover."""
    token = entry.token
    if not _ours(entry) or entry.state is not PeerState.GONE:
        return
    sides = [other for other in entries if other.role in ROLES and base_token(other.token) == token]
    if any(side.state is PeerState.ALIVE for side in sides):
        return
    guards = tuple(side.path for side in sides)
    found.leftovers.append(Leftover("path", entry.path, entry.path, "the consumers of a work queue", guards))


def _survey_temporary(entry: _Entry, found: Survey) -> None:
    """A claim's temporary file: ours and not held -> a leftover of an interrupted start."""
    if entry.regular() and entry.status.st_uid == os.geteuid() and entry.state is PeerState.GONE:
        found.leftovers.append(Leftover("path", entry.path, entry.path, "an interrupted start"))
    else:
        _refuse_if_not_ours(entry, found)


def _refuse_if_not_ours(entry: _Entry, found: Survey) -> None:
    """Report what sits at a presence path and is not a presence file of ours (a live one of another user is fine)."""
    if not entry.regular():
        found.refused.append(Refusal("path", entry.path, "it " + kind_problem(entry.status, (stat.S_IFREG,))))
    elif entry.status.st_uid != os.geteuid() and entry.state is not PeerState.ALIVE:
        owner = owner_text(entry.status.st_uid, entry.status.st_gid, stat.S_IMODE(entry.status.st_mode))
        found.refused.append(
            Refusal(
                "path",
                entry.path,
                f"written by another user ({owner}); clean removes only entries of its own user "
                f"({user_text(os.geteuid())}): run `podipc clean` as its owner",
            )
        )


def _survey_channel(
    directory: str, token: str, roles: dict[str, _Entry], live: set[tuple[str, str]], found: Survey
) -> None:
    dead = [entry for entry in roles.values() if _ours(entry) and entry.state is PeerState.GONE]
    if not dead or any(entry.state is PeerState.ALIVE for entry in roles.values()):
        return
    guards = tuple(os.path.join(directory, f"{PRESENCE_PREFIX}{token}.{role}") for role in ROLES)
    unknown = [entry for entry in roles.values() if entry.state is None and entry.regular()]
    if unknown:
        for entry in dead:
            found.refused.append(
                Refusal(
                    "path",
                    entry.path,
                    f"cannot tell whether the other side of this channel lives ({unknown[0].path} is not readable)",
                )
            )
        return
    for entry in dead:
        _survey_dead_side(directory, entry, guards, live, found)


def _survey_dead_side(
    directory: str, entry: _Entry, guards: tuple[str, ...], live: set[tuple[str, str]], found: Survey
) -> None:
    holder, channel, objects = _parse_record(entry.lines)
    address = _verified_channel(channel, entry.token)
    provable = channel_objects(address) if address is not None else frozenset()
    refused = False
    for kind, name in objects:
        reason = _why_not_removable(kind, name, address, provable, live)
        if reason is None:
            found.leftovers.append(Leftover(kind, name, entry.path, holder, guards))
        else:
            found.refused.append(Refusal(kind, name, reason, entry.path))
            refused = True
    for part in _temporaries(directory, entry.token, entry.role):
        problem = _path_problem(part, (stat.S_IFREG,))
        if problem is None:
            found.leftovers.append(Leftover("path", part, entry.path, holder, guards, temporary=True))
        else:
            found.refused.append(Refusal("path", part, problem, entry.path))
    if not refused:  # otherwise the record stays: it is the evidence of what is left
        found.leftovers.append(Leftover("path", entry.path, entry.path, holder, guards))


def _why_not_removable(
    kind: str,
    name: str,
    address: Address | None,
    provable: frozenset[tuple[str, str]],
    live: set[tuple[str, str]],
) -> str | None:
    if address is None:
        return (
            "its presence file names no channel, or one that does not match the file's name, so nothing proves "
            "the object is podipc's; left alone"
        )
    if (kind, name) not in provable:
        return f"not an object podipc creates for {address.location}; left alone"
    if (kind, name) in live:
        return "a live channel uses it; left alone"
    return _object_problem(kind, name)


def _ours(entry: _Entry) -> bool:
    return entry.regular() and entry.status.st_uid == os.geteuid()


def _verified_channel(channel: str, token: str) -> Address | None:
    """The channel a record names, if it parses and its token is the presence file's."""
    if not channel:
        return None
    try:
        address = parse_address(channel)
    except AddressError:
        return None
    return address if address.token == base_token(token) else None


def _objects_of_live_channels(entries: list[_Entry]) -> set[tuple[str, str]]:
    """Every object a live side's channel uses (two spellings of one channel share objects under two tokens)."""
    live: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.state is PeerState.ALIVE:
            _, channel, _ = _parse_record(entry.lines)
            with contextlib.suppress(AddressError):
                live |= channel_objects(parse_address(channel)) if channel else set()
    return live


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


def _inspect(path: str) -> _Entry | None:
    """Look at a presence path without following a link or blocking; None when it vanished."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return _Entry(path, status, None, [])
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except OSError:
        return _Entry(path, status, None, [])
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino) or not stat.S_ISREG(opened.st_mode):
            return _Entry(path, status, None, [])  # replaced meanwhile: the next run will see it
        state = lock_state(fd)
        lines = os.read(fd, RECORD_LIMIT_BYTES).decode("utf-8", "replace").splitlines()
    except OSError:
        return _Entry(path, status, None, [])
    finally:
        os.close(fd)
    return _Entry(path, status, state, lines)


def _parse_record(lines: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """(holder, channel, objects) of a presence file's lines."""
    words = lines[0].split() if lines else []
    holder = f"pid {words[0]} on {words[1]}" if len(words) >= 2 else f"pid {lines[0]}" if lines else ""
    channel = ""
    objects = []
    for line in lines[1:]:
        kind, _, name = line.partition(" ")
        if kind == CHANNEL:
            channel = name
        elif kind and name and kind != DECLARATION:
            objects.append((kind, name))
    return holder, channel, objects


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


# --- is the object ours? -------------------------------------------------------


def _own_trust() -> Trust:
    return Trust(os.geteuid(), frozenset(), share_group=False)


def _path_problem(path: str, kinds: tuple[int, ...]) -> str | None:
    """None when nothing is at `path` or it is ours and of one of `kinds` (a link is never followed); else why not."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at it: {exc.strerror}"
    return _status_problem(status, kinds)


def _status_problem(status: os.stat_result, kinds: tuple[int, ...]) -> str | None:
    if stat.S_IFMT(status.st_mode) not in kinds:
        return "it " + kind_problem(status, kinds)
    return _owner_problem(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))


def _owner_problem(uid: int, gid: int, mode: int, creator: int | None = None) -> str | None:
    if ({uid} if creator is None else {uid, creator}) == {os.geteuid()}:
        return None
    if creator is not None and creator != uid:
        return f"not ours ({owner_text(uid, gid, mode)}, created by {user_text(creator)}); left alone"
    return f"not ours ({owner_text(uid, gid, mode)}); left alone"


def _object_problem(kind_name: str, name: str) -> str | None:
    """None when the object is ours (or already gone); else why clean must not remove it."""
    kind = object_kinds().get(kind_name)
    if kind is None:
        return f"unknown kind of object {kind_name!r}"
    if kind is PATH_OBJECT:
        return _path_problem(name, (stat.S_IFSOCK,))  # the socket file of unix:// or zmq+ipc://
    try:
        owner = kind.owner_of(name)
    except Exception as exc:  # we may not open it, or a malformed name: not provably ours
        return f"cannot tell its owner ({type(exc).__name__}: {exc}); left alone"
    return None if owner is None else _owner_problem(owner.uid, owner.gid, owner.mode, owner.creator)


# --- removal -------------------------------------------------------------------


def remove(leftover: Leftover) -> bool:
    """Remove one leftover, checking again that it is ours and its channel still dead.

    True: removed, or already gone. False: kept, because a side of its channel is alive
    again (a new pair started meanwhile). Raises PodIPCError when it cannot be removed.
    """
    if any(_alive(guard) for guard in leftover.guards):
        return False
    if os.path.basename(leftover.name).startswith(PRESENCE_PREFIX) and leftover.kind == "path":
        return _remove_presence_file(leftover.name)
    if leftover.kind == "path":
        _remove_file(leftover, (stat.S_IFREG,) if leftover.temporary else (stat.S_IFSOCK,))
        return True
    problem = _object_problem(leftover.kind, leftover.name)
    if problem is not None:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {problem}")
    try:
        object_kinds()[leftover.kind].remove(leftover.name)
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc.strerror}; run as its owner") from exc
    except Exception as exc:
        if type(exc).__name__ == "ExistentialError":
            return True
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc}") from exc
    return True


def _remove_file(leftover: Leftover, kinds: tuple[int, ...]) -> None:
    """Unlink a file of ours, checked and removed through one directory descriptor; a link is never followed."""
    directory, name = os.path.split(leftover.name)
    try:
        dir_fd = os.open(directory or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc.strerror}") from exc
    try:
        status = os.lstat(name, dir_fd=dir_fd)
        problem = _status_problem(status, kinds)
        if problem is not None:
            raise PodIPCError(f"cannot remove {leftover.describe()}: {problem}")
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {exc.strerror}; run as its owner") from exc
    finally:
        os.close(dir_fd)


def _alive(path: str) -> bool:
    entry = _inspect(path)
    return entry is not None and entry.state is PeerState.ALIVE


def _remove_presence_file(path: str) -> bool:
    """Remove a dead side's presence file (or a claim's temporary): only while unlocked and still the same file."""
    if remove_if_gone(path, _own_trust()):
        return True
    return not os.path.lexists(path)
