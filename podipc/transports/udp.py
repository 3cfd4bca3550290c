"""udp:// - datagrams over loopback (or the pod's shared network namespace).

Address:
    udp://HOST:PORT           the consumer binds HOST:PORT; the producer sends to it
    options: wait=SECONDS (peer rendezvous, default 30), mode=0600 (presence files),
             rcvbuf=BYTES (consumer receive buffer asked for, default 8MiB)

Requires:
    nothing beyond the standard library.

Semantics:
    One podipc message is one datagram: boundaries are kept, order is kept (late or
    duplicate datagrams are dropped), but UDP is NOT reliable: when the consumer's
    receive buffer overflows the kernel drops datagrams. Every datagram carries a
    sequence number, so the consumer counts what never arrived in `Consumer.lost`
    (the CLI summary prints it). A large SO_RCVBUF (SO_RCVBUFFORCE when allowed,
    else capped by /proc/sys/net/core/rmem_max) makes loss rare. Use tcp:// when
    every message must arrive.

    Max message: the UDP datagram limit (65507 bytes of IPv4 payload) minus the
    11-byte header, i.e. 65496 bytes; larger messages raise MessageTooLarge.

    Wire format (docs/wire/udp.md): an 11-byte header `b"pu"`, a kind byte, a
    64-bit big-endian sequence number, then the payload. The producer says HELLO
    until the consumer answers (or until the consumer's presence file appears),
    sends DATA, then repeats EOS (carrying the message count) until the consumer
    acknowledges it, so a lost EOS never hangs either side.

    Garbage: datagrams with a bad magic, kind or length, or (before the HELLO) from
    any address, are skipped and counted in `Consumer.skipped`. After the HELLO the
    consumer's socket is connected to the producer, so the kernel itself discards
    datagrams from other addresses (those are not counted).

    Liveness: datagrams cannot tell a dead peer, so both sides hold a
    podipc.presence.Presence file in /dev/shm; a killed producer makes the blocked
    consumer raise PeerGone within a quarter second, a vanished consumer makes the
    producer's next send fail (ICMP port unreachable -> PeerGone).

    Creates: the consumer binds the port (closed when the stream ends or it closes);
    each side creates and removes its presence file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import struct
import time
from collections.abc import Callable, Mapping
from time import monotonic
from typing import Any, ClassVar

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, parse_size, remaining
from podipc.errors import ChannelUnavailable, EndOfStream, PeerGone, PeerTimeout, PodIPCError, Timeout
from podipc.presence import PeerState, Presence
from podipc.transport import AddressForm, Capability, Example, MessageLimit, Transport

UDP_DATAGRAM_LIMIT = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)
MAGIC = b"pu"
MAGIC_FIRST, MAGIC_SECOND = MAGIC
HEADER = struct.Struct("!2sBQ")
HEADER_SIZE = HEADER.size
SEQUENCE = struct.Struct("!Q")
SEQUENCE_OFFSET = 3
MAX_MESSAGE_SIZE = UDP_DATAGRAM_LIMIT - HEADER_SIZE

KIND_DATA = 0x44  # 'D'
KIND_HELLO = 0x48  # 'H'
KIND_HELLO_ACK = 0x68  # 'h'
KIND_EOS = 0x45  # 'E'
KIND_EOS_ACK = 0x65  # 'e'
KINDS = frozenset({KIND_DATA, KIND_HELLO, KIND_HELLO_ACK, KIND_EOS, KIND_EOS_ACK})

DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
LIVENESS_SLICE_SECONDS = 0.25
MINIMUM_SLICE_SECONDS = 0.0005
GATHER_THRESHOLD = 2048  # bytes; larger payloads go out with sendmsg, header and payload uncopied
RETRY_FIRST_SECONDS = 0.005
RETRY_MAX_SECONDS = 0.1
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
TIMEVAL = struct.Struct("@ll")

LIMIT_SOURCE = "the UDP datagram limit"
LIMIT_FIX = "use tcp:// or shm:// for larger messages"


def availability() -> str | None:
    """None: udp:// works everywhere a loopback interface exists."""
    return None


def host_max_message_size() -> int:
    """The largest message udp:// carries: one datagram minus the podipc header."""
    return MAX_MESSAGE_SIZE


def encode(kind: int, sequence: int, payload: bytes = b"") -> bytes:
    """One datagram: header (magic, kind, sequence) and payload."""
    return HEADER.pack(MAGIC, kind, sequence) + payload


def decode(datagram: bytes | bytearray | memoryview) -> tuple[int, int, bytes] | None:
    """Split a datagram into (kind, sequence, payload); None when it is not a valid podipc datagram."""
    if len(datagram) < HEADER_SIZE:
        return None
    magic, kind, sequence = HEADER.unpack_from(datagram)
    if magic != MAGIC or kind not in KINDS:
        return None
    if kind != KIND_DATA and len(datagram) != HEADER_SIZE:
        return None
    return kind, sequence, bytes(datagram[HEADER_SIZE:])


def _family(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


def _target(address: Address) -> tuple[str, int]:
    host = "127.0.0.1" if address.host == "localhost" else address.host
    return host, address.port


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole == 0 and micro == 0:
        micro = 1  # a zero timeval means "block forever"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.pack(whole, micro))


def _translate(error: OSError, what: str) -> PodIPCError:
    if error.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return PeerGone(f"the consumer of {what} is gone (port unreachable: {error.strerror})")
    return PodIPCError(f"{what}: {error.strerror or error}")


RECEIVE_BUFFER_OPTION = Option(
    "rcvbuf", parse_size, DEFAULT_RECEIVE_BUFFER, "bytes of socket receive buffer the consumer asks for"
)


class UDPProducer(Producer):
    """Sends each message as one datagram to the consumer's port."""

    options: ClassVar[tuple[Option, ...]] = (RECEIVE_BUFFER_OPTION,)  # the URL is shared; only consumers use it

    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = MAX_MESSAGE_SIZE
        self._what = address.location
        self._ready = False
        self._header = bytearray(HEADER.pack(MAGIC, KIND_DATA, 0))
        self._sock = socket.socket(_family(address), socket.SOCK_DGRAM)
        try:
            self._sock.connect(_target(address))
            self._presence = Presence(
                address.token, "producer", settings["mode"], handover_wait=float(settings["wait"])
            )
        except OSError as exc:
            self._sock.close()
            raise ChannelUnavailable(f"cannot open {self._what}: {exc.strerror or exc}") from exc
        except BaseException:
            self._sock.close()
            raise
        self._sequence_numbers = itertools.count()

    def _send(self, view: memoryview, deadline: float | None) -> None:
        """The first send: rendezvous, then replace this method by the steady one for this instance."""
        self._rendezvous(deadline)
        self._send = self._steady_sender()  # type: ignore[method-assign,assignment]
        self._send(view, deadline)

    def _steady_sender(self) -> Callable[[memoryview, float | None], None]:
        """The per-message send, with everything it needs bound once (no attribute lookups per message)."""
        header, pack_sequence, sequence_numbers = self._header, SEQUENCE.pack_into, self._sequence_numbers
        send, sendmsg, what = self._sock.send, self._sock.sendmsg, self._what

        def send_data(view: memoryview, deadline: float | None) -> None:
            pack_sequence(header, SEQUENCE_OFFSET, next(sequence_numbers))
            try:
                if view.nbytes <= GATHER_THRESHOLD:
                    send(header + view)  # one small copy beats sendmsg's setup
                else:
                    sendmsg((header, view))
            except OSError as exc:
                raise _translate(exc, what) from exc

        return send_data

    def _rendezvous(self, deadline: float | None) -> None:
        """Say HELLO until the consumer answers or its presence shows it is bound and listening."""
        hello = encode(KIND_HELLO, 0)
        pause = RETRY_FIRST_SECONDS
        while True:
            self._send_control(hello)
            if self._presence.peer_state() is PeerState.ALIVE and self._send_control(hello):
                break  # the consumer binds before its presence appears, so this HELLO is queued for it
            if self._await_reply(KIND_HELLO_ACK, pause):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(f"{self._what}: no consumer answered before the send timeout")
            if now >= self.wait_deadline:
                raise PeerTimeout(
                    f"no consumer appeared on {self._what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )
            pause = min(pause * 2, RETRY_MAX_SECONDS)
        self._presence.peer_state()  # remember a podipc consumer as seen, to tell when it vanishes
        self._ready = True

    def _send_control(self, datagram: bytes) -> bool:
        """Send a control datagram; False when refused (nobody listened, now or for an earlier one)."""
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # a pending refusal would eat this send
        try:
            self._sock.send(datagram)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise _translate(exc, self._what) from exc
            return False
        return True

    def _await_reply(self, kind: int, seconds: float) -> bool:
        """Wait up to `seconds` for a control datagram of `kind`; refusals mean nobody listens yet."""
        until = time.monotonic() + seconds
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return False
            self._sock.settimeout(left)
            try:
                reply = self._sock.recv(HEADER_SIZE + 1)
            except TimeoutError:
                return False
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    return False
                raise _translate(exc, self._what) from exc
            finally:
                self._sock.settimeout(None)
            decoded = decode(reply)
            if decoded is not None and decoded[0] == kind:
                return True

    def _close(self, deadline: float | None) -> None:
        """Repeat EOS (with the message count) until the consumer acknowledges it."""
        try:
            if not self._ready:
                self._rendezvous(deadline)
            eos = encode(KIND_EOS, next(self._sequence_numbers))  # the count of DATA sent
            hello = encode(KIND_HELLO, 0)
            pause = RETRY_FIRST_SECONDS
            while True:
                try:
                    if pause > RETRY_FIRST_SECONDS:  # unanswered: maybe the HELLO was lost, say it again
                        self._sock.send(hello)
                    self._sock.send(eos)
                except OSError as exc:
                    raise _translate(exc, self._what) from exc
                if self._await_reply(KIND_EOS_ACK, pause):
                    return
                if self._presence.peer_lost():
                    raise PeerGone(f"the consumer of {self._what} is gone before it took the end of stream")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(f"{self._what}: the consumer did not acknowledge the end of stream in time")
                pause = min(pause * 2, RETRY_MAX_SECONDS)
        finally:
            self._abort()

    def _abort(self) -> None:
        self._sock.close()
        self._presence.close()


class UDPConsumer(Consumer):
    """Binds the port and receives datagrams; counts lost ones, skips garbage."""

    options: ClassVar[tuple[Option, ...]] = (RECEIVE_BUFFER_OPTION,)
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    late: int = 0
    """Datagrams that arrived after a later one (reordered or duplicated) and were dropped."""

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = MAX_MESSAGE_SIZE
        self._what = address.location
        self._expected = 0
        self._producer: Any = None
        self._buffer = bytearray(UDP_DATAGRAM_LIMIT + 1)
        self._view = memoryview(self._buffer)
        self._slice = LIVENESS_SLICE_SECONDS
        self._sock = socket.socket(_family(address), socket.SOCK_DGRAM)
        try:
            self._grow_receive_buffer(int(settings["rcvbuf"]))
            self._sock.bind(_target(address))
            _set_receive_timeout(self._sock, LIVENESS_SLICE_SECONDS)
            self._presence = Presence(
                address.token, "consumer", settings["mode"], handover_wait=float(settings["wait"])
            )
        except OSError as exc:
            self._sock.close()
            hint = "; another process uses this port" if exc.errno == errno.EADDRINUSE else ""
            raise ChannelUnavailable(f"cannot bind {self._what}: {exc.strerror or exc}{hint}") from exc
        except BaseException:
            self._sock.close()
            raise
        self._recv_into = self._sock.recv_into
        self._unpack_sequence = SEQUENCE.unpack_from
        self._steady = False

    def _grow_receive_buffer(self, size: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:  # no CAP_NET_ADMIN: capped by /proc/sys/net/core/rmem_max
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    @property
    def receive_buffer_size(self) -> int:
        """Bytes of receive buffer the kernel granted (it reports twice what it accounts)."""
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def _recv(self, deadline: float | None) -> bytes:
        if self._steady and (deadline is None or deadline - monotonic() >= LIVENESS_SLICE_SECONDS):
            # one slice of blocking cannot overrun the deadline; _recv_slowly checks it after a slice
            buffer = self._buffer
            try:
                size = self._recv_into(buffer)
            except OSError:
                return self._recv_slowly(deadline)
            if (
                size >= HEADER_SIZE
                and buffer[2] == KIND_DATA
                and buffer[0] == MAGIC_FIRST
                and buffer[1] == MAGIC_SECOND
                and self._unpack_sequence(buffer, SEQUENCE_OFFSET)[0] == self._expected
            ):
                self._expected += 1
                return bytes(self._view[HEADER_SIZE:size])
            message = self._take(size)
            if message is not None:
                return message
        return self._recv_slowly(deadline)

    def _recv_slowly(self, deadline: float | None) -> bytes:
        """Receive with a deadline, before the HELLO, or after a gap: slice by slice, checking liveness."""
        if deadline is not None:
            self._set_slice(deadline)
        elif self._slice != LIVENESS_SLICE_SECONDS:
            self._slice = LIVENESS_SLICE_SECONDS
            _set_receive_timeout(self._sock, LIVENESS_SLICE_SECONDS)
        if self._producer is None:
            self._await_hello(deadline)
        self._steady = self._slice == LIVENESS_SLICE_SECONDS
        while True:
            try:
                size = self._recv_into(self._buffer)
            except BlockingIOError:
                self._idle(deadline)
                continue
            except ConnectionRefusedError as exc:
                raise PeerGone(f"the producer of {self._what} is gone (its port is closed)") from exc
            except OSError as exc:
                raise PodIPCError(f"{self._what}: {exc.strerror or exc}") from exc
            message = self._take(size)
            if message is not None:
                return message

    def _take(self, size: int) -> bytes | None:
        """Handle the datagram of `size` bytes in the buffer: its payload, or None when it was not data."""
        buffer = self._buffer
        if size >= HEADER_SIZE and buffer[2] == KIND_DATA and buffer[0] == MAGIC_FIRST and buffer[1] == MAGIC_SECOND:
            sequence = self._unpack_sequence(buffer, SEQUENCE_OFFSET)[0]
            expected = self._expected
            if sequence < expected:
                self.late += 1
                return None
            self.lost += sequence - expected
            self._expected = sequence + 1
            return bytes(self._view[HEADER_SIZE:size])
        self._control(self._view[:size])
        return None

    def _await_hello(self, deadline: float | None) -> None:
        """Skip everything until a producer says HELLO; then talk only to it (connect)."""
        while True:
            try:
                size, source = self._sock.recvfrom_into(self._buffer)
            except BlockingIOError:
                self._idle(deadline)
                continue
            except OSError as exc:
                raise PodIPCError(f"{self._what}: {exc.strerror or exc}") from exc
            decoded = decode(self._view[:size])
            if decoded is None or decoded[0] != KIND_HELLO:
                self.skipped += 1
                continue
            try:
                self._sock.connect(source)
            except OSError as exc:
                raise PodIPCError(f"{self._what}: cannot answer {source}: {exc.strerror or exc}") from exc
            self._producer = source
            self._reply(KIND_HELLO_ACK)
            self._presence.peer_state()  # a podipc producer holds its presence before its HELLO: seen
            return

    def _set_slice(self, deadline: float) -> None:
        left = remaining(deadline) or 0.0
        wanted = min(LIVENESS_SLICE_SECONDS, max(left, MINIMUM_SLICE_SECONDS))
        if wanted != self._slice:
            self._slice = wanted
            _set_receive_timeout(self._sock, wanted)

    def _idle(self, deadline: float | None) -> None:
        """Nothing arrived in a slice: check the deadline, the rendezvous and the producer's presence."""
        now = time.monotonic()
        state = self._presence.peer_state()
        if state is not PeerState.ALIVE and self._presence.peer_seen:
            self._gone()
        if self._producer is None and state is not PeerState.ALIVE and now >= self.wait_deadline:
            raise PeerTimeout(
                f"no producer appeared on {self._what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )
        if deadline is not None:
            if now >= deadline:
                raise Timeout(f"{self._what}: no message within the receive timeout")
            self._set_slice(deadline)

    def _gone(self) -> None:
        """The producer's presence vanished: a clean producer sent EOS first, so look once more."""
        self._slice = MINIMUM_SLICE_SECONDS
        _set_receive_timeout(self._sock, self._slice)
        while self._producer is not None:
            try:
                size = self._recv_into(self._buffer)
            except OSError:
                break
            decoded = decode(self._view[:size])
            if decoded is not None and decoded[0] == KIND_EOS:
                self._control(self._view[:size])
        raise PeerGone(f"the producer of {self._what} is gone (it died or closed without ending the stream)")

    def _control(self, datagram: memoryview) -> None:
        """Handle a HELLO (repeated) or the EOS; skip anything else. Raises EndOfStream at EOS."""
        decoded = decode(datagram)
        if decoded is None:
            self.skipped += 1
            return
        kind, sequence, _ = decoded
        if kind == KIND_HELLO:
            self._reply(KIND_HELLO_ACK)
        elif kind == KIND_EOS:
            if sequence > self._expected:
                self.lost += sequence - self._expected
                self._expected = sequence
            self._reply(KIND_EOS_ACK)
            self._finish()
            raise EndOfStream(f"{self._what}: the producer ended the stream")
        else:
            self.skipped += 1

    def _reply(self, kind: int) -> None:
        with contextlib.suppress(OSError):  # the producer repeats what needs an answer
            self._sock.send(encode(kind, self._expected))

    def _finish(self) -> None:
        self._sock.close()
        self._presence.close()

    def _close(self) -> None:
        self._finish()


TRANSPORT = Transport(
    name="udp",
    title="UDP datagrams",
    schemes={"udp": AddressForm.HOST_PORT},
    producer="podipc.transports.udp:UDPProducer",
    consumer="podipc.transports.udp:UDPConsumer",
    examples=(Example("udp://127.0.0.1:7001", "loopback UDP"),),
    reliable=False,
    reliability_note="may drop, counted in `lost`",
    ordered=True,
    limit=MessageLimit(
        host_max_message_size,
        LIMIT_SOURCE,
        LIMIT_FIX,
        f"{UDP_DATAGRAM_LIMIT:,} B minus an {HEADER_SIZE} B header",
    ),
    options=(RECEIVE_BUFFER_OPTION,),
    capabilities=frozenset({Capability.PRESENCE_FILES}),
    availability=availability,
    port_protocol="udp",
    rank=20,
)
