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

import errno
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer, parse_size, remaining
from podipc.errors import ChannelUnavailable, EndOfStream, PeerGone, PeerTimeout, PodIPCError, Timeout
from podipc.presence import PeerState, Presence

UDP_DATAGRAM_LIMIT = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)
MAGIC = b"pu"
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
    micro = max(1, int((seconds - whole) * 1_000_000)) if whole == 0 else int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.pack(whole, micro))


def _translate(error: OSError, what: str) -> PodIPCError:
    if error.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return PeerGone(f"the consumer of {what} is gone (port unreachable: {error.strerror})")
    return PodIPCError(f"{what}: {error.strerror or error}")


class UDPProducer(Producer):
    """Sends each message as one datagram to the consumer's port."""

    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = MAX_MESSAGE_SIZE
        self._what = address.location
        self._sequence = 0
        self._ready = False
        self._header = bytearray(HEADER.pack(MAGIC, KIND_DATA, 0))
        self._sock = socket.socket(_family(address), socket.SOCK_DGRAM)
        try:
            self._sock.connect(_target(address))
            self._presence = Presence(address.token, "producer", settings["mode"])
        except OSError as exc:
            self._sock.close()
            raise ChannelUnavailable(f"cannot open {self._what}: {exc.strerror or exc}") from exc
        except BaseException:
            self._sock.close()
            raise
        self._sendmsg = self._sock.sendmsg
        self._pack_sequence = SEQUENCE.pack_into

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if not self._ready:
            self._rendezvous(deadline)
        header = self._header
        self._pack_sequence(header, SEQUENCE_OFFSET, self._sequence)
        try:
            self._sendmsg((header, view))
        except OSError as exc:
            raise _translate(exc, self._what) from exc
        self._sequence += 1

    def _rendezvous(self, deadline: float | None) -> None:
        """Say HELLO until the consumer answers or its presence shows it is bound and listening."""
        hello = encode(KIND_HELLO, 0)
        pause = RETRY_FIRST_SECONDS
        while True:
            self._send_control(hello)
            if self._presence.peer_state() is PeerState.ALIVE:
                self._send_control(hello)  # the consumer was bound before its presence appeared
                break
            if self._await_reply(KIND_HELLO_ACK, pause):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(f"{self._what}: no consumer answered before the send timeout")
            if now >= self.wait_deadline:
                raise PeerTimeout(f"no consumer appeared on {self._what} within the wait timeout (option wait=)")
            pause = min(pause * 2, RETRY_MAX_SECONDS)
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # forget refusals from before the consumer
        self._ready = True

    def _send_control(self, datagram: bytes) -> None:
        try:
            self._sock.send(datagram)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise _translate(exc, self._what) from exc

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
            eos = encode(KIND_EOS, self._sequence)
            pause = RETRY_FIRST_SECONDS
            while True:
                try:
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

    options: ClassVar[tuple[Option, ...]] = (
        Option("rcvbuf", parse_size, DEFAULT_RECEIVE_BUFFER, "bytes of socket receive buffer to ask for"),
    )
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
            self._presence = Presence(address.token, "consumer", settings["mode"])
        except OSError as exc:
            self._sock.close()
            hint = "; another process uses this port" if exc.errno == errno.EADDRINUSE else ""
            raise ChannelUnavailable(f"cannot bind {self._what}: {exc.strerror or exc}{hint}") from exc
        except BaseException:
            self._sock.close()
            raise
        self._recv_into = self._sock.recv_into

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
        if deadline is not None:
            self._set_slice(deadline)
        elif self._slice != LIVENESS_SLICE_SECONDS:
            self._slice = LIVENESS_SLICE_SECONDS
            _set_receive_timeout(self._sock, LIVENESS_SLICE_SECONDS)
        if self._producer is None:
            self._await_hello(deadline)
        buffer, view, recv_into = self._buffer, self._view, self._recv_into
        while True:
            try:
                size = recv_into(buffer)
            except BlockingIOError:
                self._idle(deadline)
                continue
            except OSError as exc:
                raise PodIPCError(f"{self._what}: {exc.strerror or exc}") from exc
            if size >= HEADER_SIZE and buffer[2] == KIND_DATA and buffer[0] == 0x70 and buffer[1] == 0x75:
                sequence = int.from_bytes(buffer[SEQUENCE_OFFSET:HEADER_SIZE], "big")
                expected = self._expected
                if sequence == expected:
                    self._expected = expected + 1
                    return bytes(view[HEADER_SIZE:size])
                if sequence > expected:
                    self.lost += sequence - expected
                    self._expected = sequence + 1
                    return bytes(view[HEADER_SIZE:size])
                self.late += 1
                continue
            self._control(view[:size])

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
            raise PeerTimeout(f"no producer appeared on {self._what} within the wait timeout (option wait=)")
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
        try:
            self._sock.send(encode(kind, self._expected))
        except OSError:
            pass  # the producer repeats what needs an answer

    def _finish(self) -> None:
        self._sock.close()
        self._presence.close()

    def _close(self) -> None:
        self._finish()
