"""Unix stream socket channel: length-prefixed frames over one Unix-domain connection.

Address:
    unix:///path/to/file.sock[?mode=0600&wait=30&max_message_size=64MiB]
        a socket file; in a pod, put it on an emptyDir both containers mount
    unix://@name
        an abstract socket: no file, scoped to the network namespace, which the
        containers of a pod share; anyone in the pod can connect (no permissions)
    mode               octal permissions of the socket file (default 0600; 0660 with a
                       shared fsGroup when the sides run as different users)
    wait               seconds either side waits for the other to appear (default 30)
    max_message_size   largest message in bytes, the same on both sides (default 64 MiB)
    coalesce           join back-to-back small sends into one write (default true; the
                       producer's option, see podipc.stream and the README's Batches)
    pattern            pair (default: one producer), fanin (the consumer takes many named
                       producers, podipc.fanin; a producer with name= is a fan-in producer) or
                       broadcast (the producer listens, N subscribers each get every message;
                       podipc.stream_broadcast)
    subscribers        broadcast: how many subscribers the producer's first send waits for (1-64)
    slow               broadcast: wait (default: a slow subscriber holds the producer back) or
                       drop (its messages are dropped and counted, in-band, for it alone)
    producers          fan-in consumer: end the stream once this many producers ended theirs
                       (default 0: never; > 0 implies pattern=fanin)
    name               fan-in producer: its name at the consumer (default HOSTNAME-PID-RANDOM)

Requires:
    Nothing beyond the standard library.

Semantics:
    Boundaries and order kept (frames: 4-byte big-endian length + payload, see
    docs/wire/stream.md); reliable; flow-controlled by the kernel's socket buffers.
    Max message: the max_message_size option (podipc's default 64 MiB, at most
    4 GiB - 2 bytes); the consumer refuses larger frames with ProtocolError.
    The consumer creates the socket file at open with `mode` (bound under a temporary
    name, chmod-ed, then linked into place, so it never appears with other
    permissions) and unlinks it at the end of stream or when it closes. A stale file
    left by a killed consumer (nobody listening) is replaced; a live one is refused
    with ChannelUnavailable. The producer connects on its first send or close,
    retrying until `wait`.
    Trust (podipc.ownership): whatever is at the path must be a socket (a link is never
    followed) of a user this side trusts (its own; its group's with mode=0660): another
    user's socket file, stale or live, is never replaced or connected to. The producer
    also refuses a socket file writable by every user, and checks once connected that
    the process listening is the file's owner (SO_PEERCRED). An abstract name has no
    owner: any process of the pod's network namespace may connect, or listen first.
    Batches: send_many() is one gathered write, recv_many() cuts a whole read; a loop
    of single sends is coalesced (podipc.stream).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
import struct
from typing import ClassVar

from podipc.address import UNIX_PATH_MAX, Address
from podipc.errors import ChannelUnavailable
from podipc.fanin import FanInConsumer
from podipc.framing import DEFAULT_MAX_MESSAGE_SIZE
from podipc.options import Option
from podipc.ownership import SHARE_FIX, Trust, check_path, group_text, owner_text, user_text
from podipc.presence import Presence
from podipc.stream import LISTEN_BACKLOG, STREAM_OPTIONS, StreamConsumer, socket_problem
from podipc.stream_broadcast import StreamBroadcastProducer, StreamBroadcastSubscriber
from podipc.stream_producer import StreamProducer
from podipc.transport import PATH_OBJECT, AddressForm, Example, Transport, option_limit

__all__ = [
    "TRANSPORT",
    "UnixBroadcastProducer",
    "UnixBroadcastSubscriber",
    "UnixConsumer",
    "UnixFanInConsumer",
    "UnixListener",
    "UnixProducer",
    "availability",
    "check_socket_file",
    "host_max_message_size",
    "verify_listener",
]

PROBE_SECONDS = 1.0
"""How long a consumer's probe of an existing socket file may take to connect."""
SOCKET = (stat.S_IFSOCK,)
OTHERS_MAY_CONNECT = stat.S_IWOTH
"""Connecting to a socket file needs write permission: a socket writable by "other" lets every user in."""
PEER_CREDENTIALS = struct.Struct("3i")
"""struct ucred: the pid, uid and gid of a Unix socket's peer (SO_PEERCRED)."""


def availability() -> str | None:
    """None when Unix sockets work here, else why not."""
    return socket_problem(socket.AF_UNIX, "Unix")


def host_max_message_size() -> int:
    """The default largest message: the max_message_size option's default (64 MiB)."""
    return DEFAULT_MAX_MESSAGE_SIZE


def socket_address(address: object) -> str:
    """What bind/connect take for an Address: the path, or NUL + name for an abstract socket."""
    if getattr(address, "abstract", False):
        return "\0" + str(getattr(address, "name", ""))
    return str(getattr(address, "path", ""))


def _is_live(path: str) -> bool:
    """True when a consumer listens on the socket file at `path`; False when it is stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(PROBE_SECONDS)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # its backlog is full: someone listens
    finally:
        probe.close()
    return True


def check_socket_file(address: Address, mode: int) -> int | None:
    """Before connecting to a socket file: refuse anything but a trusted socket; the owner's UID to verify, or None.

    None when nothing is at the path yet (connecting fails and is retried). Refused with
    ChannelUnavailable (the owner and the fix): a link, another kind of file, a user this
    side does not trust (ownership.Trust for `mode`), or a socket every user may connect to.
    """
    path = address.path
    what = f"{address.location}: {path}"
    status = check_path(path, Trust.for_mode(mode), what, SOCKET)
    if status is None:
        return None
    permissions = stat.S_IMODE(status.st_mode)
    if permissions & OTHERS_MAY_CONNECT:
        raise ChannelUnavailable(
            f"{what} lets every user of the pod connect ({owner_text(status.st_uid, status.st_gid, permissions)}); "
            f"podipc never creates such a socket: {SHARE_FIX}"
        )
    return status.st_uid


def verify_listener(address: Address, sock: socket.socket, expected: int | None) -> None:
    """Once connected: the listening process must run as the socket file's owner (SO_PEERCRED), else ChannelUnavailable."""
    if expected is None:
        return
    _, uid, gid = PEER_CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size))
    if uid != expected:
        raise ChannelUnavailable(
            f"{address.location}: the process listening there runs as {user_text(uid)}, {group_text(gid)}, "
            f"not as the socket file's owner {user_text(expected)}: someone replaced the file; "
            "remove it (as its owner) and restart the consumer"
        )


class UnixListener:
    """Listening on a unix:// address, as a consumer (or a request/reply server) does: the socket and its file.

    `listen()` binds an abstract name, or creates the socket file with `mode` (bound under a
    temporary name, chmod-ed, then linked into place; a stale file of ours replaced, a live
    one or another user's refused) and records it for `podipc clean`; `remove_traces()`
    unlinks that file (only if it is still the one created) and the record.
    """

    def __init__(self, address: Address, mode: int, role: str = "consumer") -> None:
        self.address = address
        self.mode = mode
        self.role = role
        self._identity: tuple[int, int] | None = None
        self._record: Presence | None = None

    def listen(self) -> socket.socket:
        """Create, bind and listen; raise ChannelUnavailable with the fix when that is impossible."""
        if self.address.abstract:
            return self._listen_abstract()
        return self._listen_on_file()

    def _listen_abstract(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(socket_address(self.address))
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise ChannelUnavailable(
                    f"another {self.role} listens on {self.address.location}; a channel has one {self.role}"
                ) from exc
            raise ChannelUnavailable(f"{self.address.location}: cannot listen: {exc.strerror}") from exc
        return listener

    def _listen_on_file(self) -> socket.socket:
        path = self.address.path
        stale = self._existing_is_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bound_at = self._bind_with_mode(listener, path)
            listener.listen(LISTEN_BACKLOG)
            if bound_at != path:
                self._install(bound_at, path, stale)
            status = os.stat(path)
            self._identity = (status.st_dev, status.st_ino)
            self._record_for_clean(path)
        except OSError as exc:
            listener.close()
            raise ChannelUnavailable(f"{self.address.location}: cannot create the socket file: {exc.strerror}") from exc
        except BaseException:
            listener.close()
            raise
        return listener

    def _record_for_clean(self, path: str) -> None:
        """Note the socket file in a presence record, so `podipc clean` can remove it should we be killed."""
        try:
            self._record = Presence(self.address.token, "consumer", self.mode, channel=self.address.location)
        except ChannelUnavailable:
            return  # no writable /dev/shm: the file is still replaced as stale by the next consumer
        self._record.record("path", path)

    def _existing_is_stale(self, path: str) -> bool:
        """Look at what is at `path` now: nothing (False), a stale socket of ours (True), else refuse.

        Whatever is there must be a socket (never followed if it is a link) that this side
        trusts (ownership.Trust: ours, or our group's with group sharing): another user's
        socket is never replaced, live or not.
        """
        directory = os.path.dirname(path) or "/"
        if not os.path.isdir(directory):
            raise ChannelUnavailable(
                f"{self.address.location}: directory {directory} does not exist; mount a volume "
                "(an emptyDir) there in both containers, or create it"
            )
        status = check_path(path, Trust.for_mode(self.mode), f"{self.address.location}: {path}", SOCKET)
        if status is None:
            return False
        try:
            live = _is_live(path)
        except PermissionError as exc:
            raise ChannelUnavailable(f"{self.address.location}: {path} belongs to another user; {SHARE_FIX}") from exc
        if live:
            raise ChannelUnavailable(
                f"another {self.role} listens on {self.address.location}; a channel has one {self.role}"
            )
        return True

    def _bind_with_mode(self, listener: socket.socket, path: str) -> str:
        """Bind under a temporary name and chmod it, so the real path never has other permissions."""
        temporary = os.path.join(os.path.dirname(path), f".podipc-{secrets.token_hex(4)}")
        if len(temporary.encode()) > UNIX_PATH_MAX:
            temporary = path
            if os.path.lexists(path):
                os.unlink(path)
        listener.bind(temporary)
        try:
            os.chmod(temporary, self.mode)
        except BaseException:
            os.unlink(temporary)
            raise
        return temporary

    def _install(self, temporary: str, path: str, stale: bool) -> None:
        """Put the bound socket at `path`: link when nothing is there, replace a stale file."""
        try:
            if stale:
                os.rename(temporary, path)
                return
            try:
                os.link(temporary, path)
            except FileExistsError as exc:
                raise ChannelUnavailable(
                    f"another {self.role} created {path} at the same time; a channel has one {self.role}"
                ) from exc
            except OSError:
                os.rename(temporary, path)
        finally:
            if os.path.lexists(temporary):
                os.unlink(temporary)

    def remove_traces(self) -> None:
        """Remove the socket file (if it is still the one listen() created) and its presence record."""
        if self._record is not None:
            self._record.close()
            self._record = None
        if self._identity is None:
            return
        path, identity = self.address.path, self._identity
        self._identity = None
        try:
            status = os.lstat(path)
            if (status.st_dev, status.st_ino) == identity:
                os.unlink(path)
        except FileNotFoundError:
            pass


class _ListensOnUnix:
    """The listening hooks of both unix:// consumers: the socket (file) of podipc.transports.unix.UnixListener."""

    address: Address
    settings: dict[str, object]
    _listening: UnixListener | None = None
    _listener_role = "consumer"

    def _listen(self) -> socket.socket:
        self._listening = UnixListener(self.address, int(str(self.settings["mode"])), self._listener_role)
        return self._listening.listen()

    def _remove_listener_traces(self) -> None:
        if self._listening is not None:
            self._listening.remove_traces()


class UnixConsumer(_ListensOnUnix, StreamConsumer):
    """Receives frames on a Unix socket it creates at open and removes when done."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


class UnixFanInConsumer(_ListensOnUnix, FanInConsumer):
    """Receives frames from many named producers on a Unix socket it creates at open (pattern=fanin; podipc.fanin)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


class _ConnectsOverUnix:
    """The connecting hooks of the unix:// sides that connect (a producer, a broadcast subscriber).

    Before connecting to a socket file it checks what is at the path (a socket, never a
    link followed, owned by a user it trusts, not writable by "other"), and once
    connected that the process listening is the file's owner (SO_PEERCRED): a co-tenant
    who swaps the file in between is refused too. An abstract name has no owner: anyone
    in the pod's network namespace may listen on it.
    """

    address: Address
    settings: dict[str, object]
    _what: str
    _expected_listener: int | None = None
    """The UID of the checked socket file's owner: the listening process must run as it."""

    def _connection_socket(self) -> tuple[socket.socket, str]:
        if not self.address.abstract:
            self._check_socket_file(self.address.path)
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), socket_address(self.address)

    def _check_socket_file(self, path: str) -> None:
        """Refuse (ChannelUnavailable, owner and fix) anything at `path` but a trusted socket; note its owner."""
        owner = check_socket_file(self.address, int(str(self.settings["mode"])))
        if owner is not None:
            self._expected_listener = owner

    def _verify_peer(self, sock: socket.socket) -> None:
        verify_listener(self.address, sock, self._expected_listener)

    def _unreachable(self, error: OSError) -> ChannelUnavailable:
        if error.errno == errno.EACCES:
            return ChannelUnavailable(f"no permission to connect to {self.address.location}; {SHARE_FIX}")
        return ChannelUnavailable(f"cannot connect to {self._what}: {error.strerror or error}")


class UnixProducer(_ConnectsOverUnix, StreamProducer):
    """Sends frames over a Unix socket connection to the consumer's socket (checked as _ConnectsOverUnix says)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


class UnixBroadcastProducer(_ListensOnUnix, StreamBroadcastProducer):
    """Listens on a Unix socket it creates at open and writes every message to each subscriber (pattern=broadcast)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS
    _listener_role = "producer"


class UnixBroadcastSubscriber(_ConnectsOverUnix, StreamBroadcastSubscriber):
    """Connects to a broadcast producer's Unix socket and reads every message (pattern=broadcast)."""

    options: ClassVar[tuple[Option, ...]] = STREAM_OPTIONS


TRANSPORT = Transport(
    name="unix",
    title="Unix stream socket",
    schemes={"unix": AddressForm.SOCKET_PATH_OR_ABSTRACT},
    producer="podipc.transports.unix:UnixProducer",
    consumer="podipc.transports.unix:UnixConsumer",
    fanin_consumer="podipc.transports.unix:UnixFanInConsumer",
    broadcast_producer="podipc.transports.unix:UnixBroadcastProducer",
    broadcast_subscriber="podipc.transports.unix:UnixBroadcastSubscriber",
    examples=(
        Example("unix:///shared/podipc.sock", "Unix socket on an emptyDir"),
        Example("unix://@name", "abstract Unix socket", "scoped to the network namespace: no volume"),
    ),
    reliable=True,
    ordered=True,
    limit=option_limit(DEFAULT_MAX_MESSAGE_SIZE),
    options=STREAM_OPTIONS,
    capabilities=frozenset(),
    availability=availability,
    unusable_fix="the container cannot create Unix sockets (a seccomp profile?): allow socket(AF_UNIX)",
    objects=(PATH_OBJECT,),
    channel_objects=lambda address: () if address.abstract else (("path", address.path),),
    rank=30,
)
