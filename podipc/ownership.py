"""Trust only what is ours: the owner and mode checks for every object podipc finds instead of creating.

The containers of a pod share /dev/shm, the IPC namespace and often an emptyDir, and may
run as other users, from other images and vendors. Before a side uses a queue, segment,
semaphore, socket file, spool directory or presence file that already exists, it asks
whether the object is trusted:

    owned by this process's effective UID                                    -> trusted
    the channel opted into group sharing (a `mode` with group bits, e.g.
    0660), the object's group is one of ours, it grants nothing to "other"   -> trusted
    anything else                                                            -> ChannelUnavailable

The error names the owner (uid, user name when known, group, mode) and the deliberate way
to share: both sides with `mode=0660` and a common group (`runAsGroup`/`fsGroup`).

Files are opened without following a link and without blocking (O_NOFOLLOW|O_NONBLOCK)
and checked on the descriptor (fstat), so a symlink, FIFO, socket or directory put where a
file is expected never redirects, hangs or crashes a side. SysV objects are checked on
their permission record: owner and creator must both be us (a creator keeps control
after giving an object away), or the group rule holds.

Usage at open, in a transport:

    trust = Trust.for_mode(settings["mode"])
    fd = open_checked(path, os.O_RDWR, trust, "the ring /dev/shm/data")        # fd, checked
    check_sysv(trust, "SysV queue 0x4d2", queue.uid, queue.cuid, queue.gid, queue.mode)
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from dataclasses import dataclass

from podipc.errors import ChannelUnavailable

OTHER_PERMISSIONS = 0o007
"""The "other" bits of a mode: podipc never creates, and never trusts, an object with any of them."""
GROUP_PERMISSIONS = 0o070
"""A `mode` with any of these bits opts into group sharing."""
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Added to every open of an object found in a shared place: never follow a link, never block on a FIFO."""
SHARE_FIX = (
    "to share a channel between users deliberately, give both containers a common group "
    "(runAsGroup/fsGroup) and open both sides with mode=0660"
)
FOREIGN_FIX = f"podipc uses only its own user's objects: if it is stale, its owner removes it; {SHARE_FIX}"
KIND_NAMES = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


@dataclass(frozen=True)
class Owner:
    """Who owns an object and what it permits: from fstat/lstat, or a SysV object's ipc_perm."""

    uid: int
    gid: int
    mode: int
    """Permission bits (0o777)."""
    creator: int | None = None
    """The creating UID where the object keeps one (SysV)."""

    @classmethod
    def of_status(cls, status: os.stat_result) -> Owner:
        """The owner of a file from its (l/f)stat."""
        return cls(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))

    def text(self) -> str:
        """'owner uid 1000 (alice), gid 1000 (pod), mode 0640[, created by ...]'."""
        made = "" if self.creator is None or self.creator == self.uid else f", created by {user_text(self.creator)}"
        return owner_text(self.uid, self.gid, self.mode) + made


@dataclass(frozen=True)
class Trust:
    """Whose objects one side accepts: its own user's, and with group sharing those of a common group."""

    uid: int
    """This process's effective UID."""
    groups: frozenset[int]
    """Our effective and supplementary GIDs."""
    share_group: bool
    """True when the channel's `mode` has group bits (e.g. 0660): objects of our groups are accepted."""

    @classmethod
    def for_mode(cls, mode: int) -> Trust:
        """The trust of a side opened with `mode` (the channel option), as this process is now."""
        return cls(os.geteuid(), frozenset({os.getegid(), *os.getgroups()}), bool(mode & GROUP_PERMISSIONS))

    def problem(self, uid: int, gid: int, mode: int, creator: int | None = None) -> str | None:
        """None when an object of owner `uid`, group `gid`, permission bits `mode` is trusted; else why not, and the fix.

        `creator`: the creating UID where the object keeps one (SysV), which must be ours too.
        Our own objects are trusted whatever their mode (only we, or root, could have set it);
        use grants_others() where an object of ours open to other users must be refused too.
        """
        owner = owner_text(uid, gid, mode)
        owners = {uid} if creator is None else {uid, creator}
        if owners == {self.uid}:
            return None
        if creator is not None and creator != uid:
            owner += f", created by {user_text(creator)}"
        if not self.share_group:
            return f"belongs to another user ({owner}), not to {user_text(self.uid)}; {FOREIGN_FIX}"
        if gid not in self.groups:
            ours = ", ".join(group_text(group) for group in sorted(self.groups))
            return f"belongs to another user ({owner}) and its group is not one of ours ({ours}); {FOREIGN_FIX}"
        if grants_others(mode):
            return (
                f"belongs to another user and lets every user of the pod in ({owner}); podipc never shares such "
                "an object: remove it (as its owner) and let podipc create it again with mode=0660"
            )
        return None

    def check(self, what: str, uid: int, gid: int, mode: int, creator: int | None = None) -> None:
        """Raise ChannelUnavailable (owner and fix) unless the object is trusted; see problem()."""
        reason = self.problem(uid, gid, mode, creator)
        if reason is not None:
            raise ChannelUnavailable(f"{what} {reason}")

    def check_status(self, what: str, status: os.stat_result, kinds: tuple[int, ...] = (stat.S_IFREG,)) -> None:
        """Raise ChannelUnavailable unless `status` (from fstat/lstat) is one of `kinds` and trusted."""
        kind = stat.S_IFMT(status.st_mode)
        if kind not in kinds:
            raise wrong_kind(what, status, kinds)
        self.check(what, status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))


def grants_others(mode: int) -> bool:
    """True when permission bits `mode` grant anything to users outside the owner and the group."""
    return bool(mode & OTHER_PERMISSIONS)


def kind_problem(status: os.stat_result, kinds: tuple[int, ...]) -> str:
    """Why an object of `status` is not one of `kinds` (a FIFO where a regular file belongs...), with the fix."""
    found = KIND_NAMES.get(stat.S_IFMT(status.st_mode), "special file")
    expected = " or ".join(KIND_NAMES.get(kind, "special file") for kind in kinds)
    owner = owner_text(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))
    return (
        f"is a {found} ({owner}), not a {expected}: someone else put it there; podipc never opens it; "
        "remove it (as its owner) or use another channel name"
    )


def wrong_kind(what: str, status: os.stat_result, kinds: tuple[int, ...]) -> ChannelUnavailable:
    """The one-line error for a FIFO, link, directory... where podipc expects another kind of object."""
    return ChannelUnavailable(f"{what} {kind_problem(status, kinds)}")


def user_text(uid: int) -> str:
    """'uid 1000 (alice)', or 'uid 1000' when the name is unknown here."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OverflowError):
        return f"uid {uid}"


def group_text(gid: int) -> str:
    """'gid 1000 (pod)', or 'gid 1000' when the name is unknown here."""
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except (KeyError, OverflowError):
        return f"gid {gid}"


def owner_text(uid: int, gid: int, mode: int) -> str:
    """'owner uid 1000 (alice), gid 1000 (pod), mode 0640'."""
    return f"owner {user_text(uid)}, {group_text(gid)}, mode {mode:04o}"


def check_fd(fd: int, trust: Trust, what: str, kinds: tuple[int, ...] = (stat.S_IFREG,)) -> os.stat_result:
    """fstat an open descriptor and raise ChannelUnavailable unless it is one of `kinds` and trusted."""
    status = os.fstat(fd)
    trust.check_status(what, status, kinds)
    return status


def open_checked(
    path: str,
    flags: int,
    trust: Trust,
    what: str,
    kinds: tuple[int, ...] = (stat.S_IFREG,),
    *,
    dir_fd: int | None = None,
) -> int:
    """Open an existing object without following a link or blocking, then check kind and owner on the fd.

    `flags`: the access mode and any extra flags (O_CREAT is refused: this opens what exists).
    Returns the descriptor (close-on-exec, non-blocking: clear O_NONBLOCK with os.set_blocking if
    needed). Raises FileNotFoundError when nothing is there, ChannelUnavailable for a link, the
    wrong kind of object, an object that is not trusted, or one we may not open.
    """
    if flags & os.O_CREAT:
        raise ValueError("open_checked opens existing objects; create with O_CREAT|O_EXCL|O_NOFOLLOW instead")
    try:
        fd = os.open(path, flags | OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise refusal_for(exc, path, trust, what, kinds, dir_fd=dir_fd) from exc
    try:
        check_fd(fd, trust, what, kinds)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refusal_for(
    error: OSError,
    path: str,
    trust: Trust,
    what: str,
    kinds: tuple[int, ...] = (stat.S_IFREG,),
    *,
    dir_fd: int | None = None,
) -> ChannelUnavailable:
    """The ChannelUnavailable for an open of `path` that failed with `error`, naming the owner when it can."""
    try:
        status = os.lstat(path, dir_fd=dir_fd)
    except OSError:
        return ChannelUnavailable(f"cannot open {what}: {error.strerror or error}")
    if stat.S_IFMT(status.st_mode) not in kinds or error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
        return wrong_kind(what, status, kinds)
    reason = trust.problem(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))
    if reason is not None:
        return ChannelUnavailable(f"{what} {reason}")
    owner = owner_text(status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode))
    return ChannelUnavailable(f"cannot open {what} ({owner}): {error.strerror or error}; {SHARE_FIX}")


def check_path(
    path: str, trust: Trust, what: str, kinds: tuple[int, ...] = (stat.S_IFREG,), *, dir_fd: int | None = None
) -> os.stat_result | None:
    """lstat `path` (never following a link): None when absent, else its status once kind and owner are checked.

    For objects that are not opened as files (a socket file before connect, a POSIX semaphore's
    /dev/shm/sem.NAME). Prefer open_checked where an fd follows: it checks what it opened.
    """
    try:
        status = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    trust.check_status(what, status, kinds)
    return status


def check_sysv(trust: Trust, what: str, uid: int, cuid: int, gid: int, mode: int) -> None:
    """Raise ChannelUnavailable unless a SysV object's permission record (ipc_perm) is trusted.

    uid/cuid/gid/mode as sysv_ipc exposes them (`queue.uid`, `queue.cuid`, `queue.gid`, `queue.mode`).
    Owned by us: owner and creator both our UID. Group sharing: the group rule alone. (The kernel
    lets a SysV object's owner set any group with IPC_SET, so with group sharing a user outside the
    group can label a queue with it: share SysV queues only among users you trust.)
    """
    trust.check(what, uid, gid, stat.S_IMODE(mode), creator=cuid)


def check_mode_option(mode: int) -> None:
    """Raise ValueError unless `mode` is one podipc creates objects with: owner rw, nothing for "other"."""
    if not 0 <= mode <= 0o777:
        raise ValueError("expected an octal mode like 0600 or 0660")
    if mode & OTHER_PERMISSIONS:
        raise ValueError(
            f"mode {mode:04o} lets every user of the pod in (world-readable or world-writable modes are refused); "
            "share a group instead (mode=0660 with runAsGroup/fsGroup)"
        )
    if mode & 0o600 != 0o600:
        raise ValueError("the owner needs read and write (0600 at least)")
