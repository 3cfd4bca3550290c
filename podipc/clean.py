"""Find and remove what SIGKILLed podipc processes left behind: only what it can prove is theirs.

Every side of a channel holds a presence file (podipc.presence) that names its channel
and lists the IPC objects it created. A presence file whose lock is free belongs to a
dead process; when no live side of the same channel remains, the objects it lists and
the file itself are leftovers. Anyone can write a file in /dev/shm, so a listed object is
removed only when all of these hold:

- the presence file is a regular file written by our own user (root cleans root's own);
- its `channel` line names a channel whose token is the one in the file's name;
- the object is one podipc creates for that channel (channel_objects), never an
  arbitrary path or key named in the file;
- the object itself is still ours (owner, and creator for SysV), and no live side of any
  channel names it;
- links are never followed: files are looked at with lstat and opened with O_NOFOLLOW.

Everything else found at a presence path (another user's file, a FIFO, a symlink, a record
naming objects it cannot prove) is refused, with the reason (`survey().refused`; the CLI
prints them). One exception to "recorded objects only", confined to a spool directory
whose dead producer's presence file is there: its `podipc.part.*` temporaries (half-written
messages, never data) go too; the spool's message files stay (docs/wire/file.md).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
    lock_state,
    remove_if_gone,
)

# A file:// spool holds its presence files under this token; a dead spool producer may leave
# half-written temporaries (docs/wire/file.md), which are never messages.
SPOOL_PRESENCE_TOKEN = "spool"
SPOOL_TEMPORARY_PREFIX = "podipc.part."
POSIX_SHM_DIRECTORY = "/dev/shm"
"""Where Linux keeps POSIX shared memory (NAME) and named semaphores (sem.NAME)."""
MQUEUE_DIRECTORY = "/dev/mqueue"


@dataclass(frozen=True)
class Leftover:
    """One object a dead podipc process left: its kind, its name, and the presence file that recorded it."""

    kind: str
    name: str
    recorded_in: str
    holder: str
    guards: tuple[str, ...] = field(default=(), compare=False)
    """The channel's presence files: if one is alive again at removal, the object is kept."""

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
    if address.scheme == "mq":
        return frozenset({("posix_mq", "/" + address.name)})
    if address.scheme == "sysvmq":
        return frozenset({("sysv_mq", str(address.key))})
    if address.scheme == "shm":
        from podipc.transports.shm import semaphore_names

        semaphores = {("posix_sem", name) for name in semaphore_names(address.name)}
        return frozenset({("posix_shm", "/" + address.name), *semaphores})
    if address.scheme in ("unix", "zmq+ipc") and not address.abstract:
        return frozenset({("path", address.path)})
    return frozenset()


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
    for token, roles in channels.items():
        _survey_channel(directory, token, roles, live, found)


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
    if entry.token == SPOOL_PRESENCE_TOKEN and entry.role == "producer":
        for part in _spool_temporaries(directory):
            problem = _path_problem(part, (stat.S_IFREG,))
            if problem is None:
                found.leftovers.append(Leftover("path", part, entry.path, holder, guards))
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
    return address if address.token == token else None


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


def _spool_temporaries(directory: str) -> list[str]:
    """The half-written message files a dead spool producer left in its spool directory."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, entry) for entry in entries if entry.startswith(SPOOL_TEMPORARY_PREFIX))


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


def _object_problem(kind: str, name: str) -> str | None:
    """None when the object is ours (or already gone); else why clean must not remove it."""
    try:
        return _OWNERSHIP[kind](name)
    except KeyError:
        return f"unknown kind of object {kind!r}"
    except Exception as exc:  # a malformed name (a key that is no number): not provably ours
        return f"cannot check its owner: {exc}"


def _posix_mq_problem(name: str) -> str | None:
    if os.path.ismount(MQUEUE_DIRECTORY):
        return _path_problem(MQUEUE_DIRECTORY + name, (stat.S_IFREG,))
    import posix_ipc

    try:
        queue = posix_ipc.MessageQueue(name)
    except posix_ipc.ExistentialError:
        return None
    except posix_ipc.PermissionsError:
        return "not ours (we may not open it); left alone"
    try:
        status = os.fstat(queue.mqd)
    finally:
        queue.close()
    return _owner_problem(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))


def _posix_shm_problem(name: str) -> str | None:
    return _path_problem(POSIX_SHM_DIRECTORY + name, (stat.S_IFREG,))


def _posix_sem_problem(name: str) -> str | None:
    return _path_problem(f"{POSIX_SHM_DIRECTORY}/sem.{name.lstrip('/')}", (stat.S_IFREG,))


def _sysv_problem(opener: Callable[[int], Any]) -> Callable[[str], str | None]:
    def problem(key: str) -> str | None:
        import sysv_ipc

        try:
            item = opener(int(key))
        except sysv_ipc.ExistentialError:
            return None
        except sysv_ipc.PermissionsError:
            return "not ours (we may not open it); left alone"
        return _owner_problem(item.uid, item.gid, item.mode & 0o777, creator=item.cuid)

    return problem


def _sysv_mq(key: int) -> Any:
    import sysv_ipc

    return sysv_ipc.MessageQueue(key)


def _sysv_shm(key: int) -> Any:
    import sysv_ipc

    return sysv_ipc.SharedMemory(key)


def _sysv_sem(key: int) -> Any:
    import sysv_ipc

    return sysv_ipc.Semaphore(key)


def _socket_problem(path: str) -> str | None:
    return _path_problem(path, (stat.S_IFSOCK,))


_OWNERSHIP: dict[str, Callable[[str], str | None]] = {
    "posix_mq": _posix_mq_problem,
    "posix_sem": _posix_sem_problem,
    "posix_shm": _posix_shm_problem,
    "sysv_mq": _sysv_problem(_sysv_mq),
    "sysv_shm": _sysv_problem(_sysv_shm),
    "sysv_sem": _sysv_problem(_sysv_sem),
    "path": _socket_problem,
}


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
        spool_part = os.path.basename(leftover.name).startswith(SPOOL_TEMPORARY_PREFIX)
        _remove_file(leftover, (stat.S_IFREG,) if spool_part else (stat.S_IFSOCK,))
        return True
    problem = _object_problem(leftover.kind, leftover.name)
    if problem is not None:
        raise PodIPCError(f"cannot remove {leftover.describe()}: {problem}")
    try:
        _REMOVERS[leftover.kind](leftover.name)
    except KeyError as exc:
        raise PodIPCError(f"unknown kind of leftover {leftover.kind!r} in {leftover.recorded_in}") from exc
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


def _remove_posix_mq(name: str) -> None:
    import posix_ipc

    posix_ipc.unlink_message_queue(name)


def _remove_posix_sem(name: str) -> None:
    import posix_ipc

    posix_ipc.unlink_semaphore(name)


def _remove_posix_shm(name: str) -> None:
    import posix_ipc

    posix_ipc.unlink_shared_memory(name)


def _remove_sysv_mq(key: str) -> None:
    _sysv_mq(int(key)).remove()


def _remove_sysv_shm(key: str) -> None:
    _sysv_shm(int(key)).remove()


def _remove_sysv_sem(key: str) -> None:
    _sysv_sem(int(key)).remove()


_REMOVERS = {
    "posix_mq": _remove_posix_mq,
    "posix_sem": _remove_posix_sem,
    "posix_shm": _remove_posix_shm,
    "sysv_mq": _remove_sysv_mq,
    "sysv_shm": _remove_sysv_shm,
    "sysv_sem": _remove_sysv_sem,
}
