"""udp:// - datagrams over loopback (or the pod's shared network namespace).

Address:
    udp://HOST:PORT           the consumer binds HOST:PORT; the producer sends to it
    options: wait=SECONDS (peer rendezvous, default 30; none/inf: forever), mode=0600 (presence
             files), rcvbuf=BYTES (consumer receive buffer asked for, default 8MiB),
             spin=SECONDS (how long a consumer polls an empty socket before sleeping, default 0.0001),
             coalesce=true|false (producer: back-to-back small sends leave as one BATCH datagram, default true)

Requires:
    nothing beyond the standard library.

Semantics:
    One podipc message is one DATA datagram, or one entry of a BATCH datagram that carries
    several small ones: boundaries are kept, order is kept (late or duplicate datagrams
    are dropped), but UDP is NOT reliable: when the consumer's receive buffer overflows
    the kernel drops datagrams. Every datagram carries the number of its (first)
    message, so the consumer counts the messages that never arrived in `Consumer.lost`
    (the CLI summary prints it). A large SO_RCVBUF (SO_RCVBUFFORCE when allowed,
    else capped by /proc/sys/net/core/rmem_max) makes loss rare. Use tcp:// when
    every message must arrive.

    Max message: the UDP datagram limit (65507 bytes of IPv4 payload) minus the
    11-byte header, i.e. 65496 bytes; larger messages raise MessageTooLarge.

    Wire format (docs/wire/udp.md): an 11-byte header `b"pu"`, a kind byte, a
    64-bit big-endian sequence number, then the payload (a BATCH: entries of a 32-bit
    length and a message). The producer says HELLO until the consumer answers (or until
    the consumer's presence file shows it is bound), sends DATA, then repeats EOS
    (carrying the message count) until the consumer acknowledges it, so a lost EOS never
    hangs either side. podipc's consumer answers a HELLO with BATCH-OK before its
    HELLO-ACK; only then does the producer send BATCH (send_many packs them; send()
    coalesces bursts, see UDPProducer); a consumer that answers HELLO-ACK alone (a plain
    one, an older podipc) gets DATA only.

    Trust: a port has no permissions, so podipc checks who owns the sockets it talks
    to (/proc/net/udp names the UID of every UDP socket of the network namespace):
    the producer sends nothing to a port bound by another user's socket (ChannelUnavailable
    naming the owner), the consumer ignores a HELLO from another user's socket (counted
    in `Consumer.skipped`). Another user means: not our UID, nor the owner of the peer's
    presence file (which podipc.presence trusts only when it is ours, or a common group's
    with mode=0660). After the HELLO the consumer's socket is connected to the producer,
    so the kernel discards datagrams from any other address.

    Garbage: datagrams with a bad magic, kind or length, a malformed BATCH (its
    messages are then counted lost by the next datagram's number), datagrams before the
    HELLO (whatever their source), or from another address that queued before the HELLO
    was answered, are skipped and counted in `Consumer.skipped`.

    Liveness: datagrams cannot tell a dead peer, so both sides hold a
    podipc.presence.Presence file in /dev/shm, watched by the process's one peer
    monitor: a producer that dies (or aborts) makes the consumer raise PeerGone once
    what arrived is read, within about half a second, also while it waits in recv;
    a vanished consumer makes the producer's next send raise PeerGone (the kernel's
    ICMP "port unreachable", or the monitor within about 0.2 s, whichever comes first).

    Creates: the consumer binds the port (closed when the stream ends or it closes);
    each side creates and removes its presence file.

The endpoint contract (podipc.endpoint):
    Readiness is the socket itself: the consumer's for reading; the producer's for
    reading while it waits for the consumer's answers (with a resend timer as
    `retry_after`), for writing once attached; a consumer holding messages of a BATCH
    already read is ready now (`retry_after` 0; its fileno() is a hint, as everywhere:
    call try_recv until None). No helper thread of its own (the process's flusher thread
    writes what a burst left in the producer's outbox), so podipc.aio waits on the
    socket with loop.add_reader. A consumer's blocking recv reads the socket
    directly (the fast path: after `spin` seconds of polling, yielding the CPU between polls
    after the first PURE_SPIN_SECONDS, a kernel-blocking read of
    at most FAST_SLICE_SECONDS, then the poll wait); close() from another thread or a
    signal handler wakes it with shutdown(SHUT_RD). A send never waits for room:
    loopback hands a datagram to the consumer (or drops it there) within the call; it
    waits only for the consumer to appear. Endpoints may be shared by threads (one call
    at a time per side, by the base's gate).

Layout: the datagram format (header, kinds, BATCH entries) is podipc.transports.udp.wire,
the owner checks of a UDP port podipc.transports.udp.owners; both endpoints stay here, as
they are one protocol (sequence numbers, hello and BATCH-OK, end marker and its ack) read
together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from time import monotonic
from typing import Any, ClassVar

from podipc.address import Address
from podipc.coalescing import CoalescingProducer
from podipc.consuming import Consumer
from podipc.endpoint import holds_call_gate
from podipc.errors import ChannelClosed, ChannelUnavailable, EndOfStream, PeerGone, PeerTimeout, PodIPCError
from podipc.flushing import (
    BURST_HOLD_SECONDS,
    BURST_START_SECONDS,
    UNFLUSHED,
    flush_pending,
)
from podipc.options import Option, parse_bool, parse_seconds, parse_size
from podipc.ownership import SHARE_FIX, user_text
from podipc.presence import PeerState, PeerTracker, Presence
from podipc.producing import Producer
from podipc.transport import AddressForm, Capability, Example, MessageLimit, Transport
from podipc.waking import POLLIN, POLLOUT

from .owners import foreign_owner, udp_socket_owners
from .wire import (
    BATCH_ENTRIES_BYTES,
    HEADER,
    HEADER_SIZE,
    KIND_BATCH,
    KIND_BATCH_OK,
    KIND_DATA,
    KIND_EOS,
    KIND_EOS_ACK,
    KIND_HELLO,
    KIND_HELLO_ACK,
    LENGTH,
    LENGTH_SIZE,
    MAGIC,
    MAGIC_FIRST,
    MAGIC_SECOND,
    MAX_MESSAGE_SIZE,
    SEQUENCE,
    SEQUENCE_OFFSET,
    UDP_DATAGRAM_LIMIT,
    decode,
    encode,
    split_batch,
)

COALESCE_SIZE = 2048
"""Messages up to this size join a burst's outbox (and are copied); larger ones leave as DATA from the caller's buffer."""
OUTBOX_FULL = BATCH_ENTRIES_BYTES - LENGTH_SIZE - COALESCE_SIZE
"""An outbox holding this many bytes is written: one more entry of a coalesced send might not fit in the datagram."""
GATHER_THRESHOLD = COALESCE_SIZE  # bytes; larger payloads go out with sendmsg, header and payload uncopied
REPLY_LOOK_SECONDS = 0.001
"""While the consumer has not said whether it takes BATCH, how often a burst reads its replies (one syscall)."""

DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
DEFAULT_SPIN_SECONDS = 0.0001
PURE_SPIN_SECONDS = 0.000005
"""A consumer's spin polls without yielding this long; the rest of `spin` yields the CPU between polls."""
FAST_SLICE_SECONDS = 0.25
"""The longest a consumer's fast path blocks in the kernel before it looks at its state and deadline."""
RETRY_FIRST_SECONDS = 0.005
RETRY_MAX_SECONDS = 0.1
ACK_GRACE_SECONDS = 0.05
"""After the consumer is seen gone while closing, how long its end-of-stream ack may still take to arrive."""
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
RECEIVE_MEMORY = struct.Struct("@I")
"""The first field of SO_MEMINFO: bytes the socket's receive queue is charged (a little late in going down)."""
SMALLEST_DATAGRAM_CHARGE = 256
"""Bytes of receive memory the kernel charges at least per queued datagram (its sk_buff alone takes more)."""
TIMEVAL = struct.Struct("@ll")
LIMIT_SOURCE = "the UDP datagram limit"
LIMIT_FIX = "use tcp:// or shm:// for larger messages"
_DONTWAIT = socket.MSG_DONTWAIT
_pack_length = LENGTH.pack
_monotonic = monotonic
_sched_yield = os.sched_yield
_REFUSED = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH})


def availability() -> str | None:
    """None: udp:// works everywhere a loopback interface exists."""
    return None


def host_max_message_size() -> int:
    """The largest message udp:// carries: one datagram minus the podipc header."""
    return MAX_MESSAGE_SIZE


def _family(address: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


def _target(address: Address) -> tuple[str, int]:
    host = "127.0.0.1" if address.host == "localhost" else address.host
    return host, address.port


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.pack(whole, max(micro, 1)))


def _translate(error: OSError, what: str) -> PodIPCError:
    if error.errno in _REFUSED:
        return PeerGone(f"the consumer of {what} is gone (port unreachable: {error.strerror})")
    return PodIPCError(f"{what}: {error.strerror or error}")


RECEIVE_BUFFER_OPTION = Option(
    "rcvbuf", parse_size, DEFAULT_RECEIVE_BUFFER, "bytes of socket receive buffer the consumer asks for"
)
SPIN_OPTION = Option(
    "spin", parse_seconds, DEFAULT_SPIN_SECONDS, "seconds a consumer polls an empty socket before it sleeps"
)
COALESCE_OPTION = Option(
    "coalesce",
    parse_bool,
    True,
    "join back-to-back small sends into one BATCH datagram when the consumer takes them (false: one per send)",
)
UDP_OPTIONS = (RECEIVE_BUFFER_OPTION, SPIN_OPTION, COALESCE_OPTION)
"""Both sides accept every option (the URL is shared); rcvbuf and spin are the consumer's, coalesce the producer's."""


# --- producer ---------------------------------------------------------------------------

_RENDEZVOUS, _READY, _ENDING, _DONE = range(4)


class UDPProducer(CoalescingProducer):
    """Sends each message as one datagram to the consumer's port, or many small ones as one BATCH datagram.

    BATCH only once the consumer said it takes them (BATCH-OK before its HELLO-ACK):
    send_many() packs its messages into BATCH datagrams of at most BATCH_DATAGRAM_BYTES;
    send() coalesces back-to-back small sends into an outbox (the `coalesce` option, on by
    default), as podipc.stream_producer does: a burst starts with a send beginning less than
    BURST_START_SECONDS after the previous one returned and goes on while sends begin less
    than BURST_HOLD_SECONDS apart; the outbox leaves as one datagram when it is full, when
    the burst ends (the next send), when the process's flusher thread (podipc.flushing) finds
    no call inside, and in flush() and close(). A lone message leaves within its send().
    What the outbox holds counts as sent; abort() and kill -9 lose it.
    """

    options: ClassVar[tuple[Option, ...]] = UDP_OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX
    _takes_batches: bool | None = None
    """Whether the consumer takes BATCH datagrams: None until its replies said (BATCH-OK, or a HELLO-ACK alone)."""
    _next_reply_look = 0.0

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = MAX_MESSAGE_SIZE
        self._what = address.location
        self._family = _family(address)
        self._phase = _RENDEZVOUS
        self._sent = 0
        """Messages sent (as DATA or in BATCH datagrams): the sequence number of the next one."""
        self._header = bytearray(HEADER.pack(MAGIC, KIND_DATA, 0))
        self._batch_header = bytearray(HEADER.pack(MAGIC, KIND_BATCH, 0))
        self._outbox = bytearray()
        """The entries (length, payload) of a BATCH datagram not yet sent: messages accepted, counted as sent."""
        self._held = 0
        """How many messages the outbox holds."""
        self._last_send = 0.0
        """When the last coalesced send began, or the last datagram went out (monotonic seconds)."""
        self._burst_start = 0.0
        """BURST_START_SECONDS once attached (unless coalescing is off or the consumer refuses BATCH), else 0."""
        self._coalescing = bool(settings["coalesce"])
        self._hello = encode(KIND_HELLO, 0)
        self._end_of_stream = b""
        self._next_control_at = 0.0
        self._control_pause = RETRY_FIRST_SECONDS
        self._refused = False
        """An ICMP refusal came back while ending: the consumer's port is closed."""
        self._gone_since: float | None = None
        self._sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.connect(_target(address))
            self._presence = Presence(
                address.token,
                "producer",
                settings["mode"],
                handover_wait=float(settings["wait"]),
                channel=address.location,
            )
        except OSError as exc:
            self._sock.close()
            raise ChannelUnavailable(f"cannot open {self._what}: {exc.strerror or exc}") from exc
        except BaseException:
            self._sock.close()
            raise

    # --- sending -------------------------------------------------------------

    _steady = False
    """True once attached: the fast send() may put a datagram out itself."""

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (as Producer.send); its fast version: small bytes once attached, into the burst's
        outbox when back-to-back, else header and payload in one datagram (behind the outbox, in the same one).
        A full outbox the socket had no room for, and everything else, goes the checked way."""
        if (
            self._steady
            and timeout is None
            and (type(data) is bytes or type(data) is bytearray)
            and len(data) <= COALESCE_SIZE
        ):
            token = self._token
            try:
                token.pop()
            except IndexError:
                pass  # another thread's call is inside: the checked path waits its turn
            else:
                try:
                    if not self._state:
                        outbox = self._outbox
                        now = _monotonic()
                        if outbox:
                            if len(outbox) < OUTBOX_FULL:
                                outbox += _pack_length(len(data))
                                outbox += data
                                self._held += 1
                                if now - self._last_send < BURST_HOLD_SECONDS and len(outbox) < OUTBOX_FULL:
                                    self._last_send = now
                                else:  # the burst ended, or the datagram is full: it leaves now, this message last
                                    self._write_outbox()  # no room: it stays (counted as sent), the flusher has it
                                    self._last_send = _monotonic()
                                return
                        elif now - self._last_send < self._burst_start and (
                            self._takes_batches or self._learn_batches(now)
                        ):
                            outbox += _pack_length(len(data))
                            outbox += data
                            self._held = 1
                            self._last_send = now
                            if not self._watched:
                                self._watch()
                            return
                        else:
                            sequence = self._sent
                            header = self._header
                            SEQUENCE.pack_into(header, SEQUENCE_OFFSET, sequence)
                            try:
                                self._sock_send(header + data)
                            except BlockingIOError:
                                pass  # no room in the socket: the checked path waits for it
                            except OSError as exc:
                                raise _translate(exc, self._what) from exc
                            else:
                                self._sent = sequence + 1
                                self._last_send = _monotonic()
                                return
                finally:
                    token.append(None)
                    if self._state:
                        self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        Producer.send(self, data, timeout)

    def _steady_sender(self) -> Callable[[memoryview, float | None], None]:
        """The per-message send once attached, with everything it needs bound once (no lookups per message)."""
        header, pack_sequence, what, owner = self._header, SEQUENCE.pack_into, self._what, self
        send, sendmsg, outbox = self._sock.send, self._sock.sendmsg, self._outbox

        def send_data(view: memoryview, deadline: float | None) -> None:
            if outbox:
                Producer._send(owner, view, deadline)  # the outbox leaves first: as an attempt does
                return
            sequence = owner._sent
            pack_sequence(header, SEQUENCE_OFFSET, sequence)
            try:
                if view.nbytes <= GATHER_THRESHOLD:
                    send(header + view)  # one small copy beats sendmsg's setup
                else:
                    sendmsg((header, view))
            except BlockingIOError:
                Producer._send(owner, view, deadline)  # no room in the socket: wait as an attempt would
                return
            except OSError as exc:
                raise _translate(exc, what) from exc
            owner._sent = sequence + 1

        return send_data

    def _try_send(self, view: memoryview) -> bool:
        if self._phase != _READY and not self._progress():
            return False
        if self._peer_lost:
            raise self._consumer_gone()
        if self._outbox and not self._write_outbox():
            return False
        sequence = self._sent
        SEQUENCE.pack_into(self._header, SEQUENCE_OFFSET, sequence)
        try:
            if view.nbytes <= GATHER_THRESHOLD:
                self._sock.send(self._header + view)
            else:
                self._sock.sendmsg((self._header, view))
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _translate(exc, self._what) from exc
        self._sent = sequence + 1
        return True

    def _try_send_many(self, views: Sequence[memoryview], start: int) -> int:
        """One attempt at `views[start:]`: BATCH datagrams of up to BATCH_DATAGRAM_BYTES when the consumer takes
        them (a message too large for one goes as DATA), else DATA one by one; the index after the last accepted.

        Messages are packed behind what the outbox holds; a datagram the socket has no room
        for stays in the outbox (its messages count as sent) and the attempt ends there.
        """
        if self._phase != _READY and not self._progress():
            return start
        if self._peer_lost:
            raise self._consumer_gone()
        takes_batches = self._takes_batches
        if takes_batches is None:
            takes_batches = self._learn_batches(0.0)
        if not takes_batches:
            return Producer._try_send_many(self, views, start)
        outbox = self._outbox
        index, total = start, len(views)
        try:
            while index < total:
                view = views[index]
                nbytes = view.nbytes
                if len(outbox) + LENGTH_SIZE + nbytes > BATCH_ENTRIES_BYTES:
                    if outbox and not self._write_outbox():
                        return index
                    if nbytes > BATCH_ENTRIES_BYTES - LENGTH_SIZE:
                        if not self._try_send(view):
                            return index
                        index += 1
                        continue
                outbox += _pack_length(nbytes)
                outbox += view
                self._held += 1
                index += 1
            if outbox:
                self._write_outbox()  # no room: it stays (counted as sent) and the flusher has it
            self._last_send = _monotonic()
        except PodIPCError:
            if index == start:
                raise
        return index

    def _write_outbox(self) -> bool:
        """Send what the outbox holds as one BATCH datagram, without blocking; True when it is empty.

        No room in the socket: it stays, counted as sent, and the flusher thread looks after it.
        """
        header = self._batch_header
        sequence = self._sent
        SEQUENCE.pack_into(header, SEQUENCE_OFFSET, sequence)
        try:
            self._sock.sendmsg((header, self._outbox))
        except BlockingIOError:
            if not self._watched:
                self._watch()
            return False
        except OSError as exc:
            raise _translate(exc, self._what) from exc
        self._sent = sequence + self._held
        self._held = 0
        self._outbox.clear()
        return True

    def _try_flush(self) -> bool:
        return not self._outbox or self._write_outbox()

    def _try_prepare(self) -> bool:
        return (self._phase == _READY or self._progress()) and self._try_flush()

    def _learn_batches(self, now: float) -> bool:
        """Read the consumer's replies (never waits) while it has not said whether it takes BATCH; True once it did.

        A burst looks at most every REPLY_LOOK_SECONDS (`now`: its clock); send_many at every call (`now` 0).
        """
        if now and now < self._next_reply_look:
            return False
        self._next_reply_look = now + REPLY_LOOK_SECONDS
        self._refused = False
        self._take_replies(KIND_HELLO_ACK)
        if self._refused:
            raise self._consumer_gone()
        return bool(self._takes_batches)

    def _heard(self, kind: int) -> None:
        """Note what a reply of `kind` says about BATCH: a BATCH-OK comes before its HELLO-ACK, so an ack alone says no."""
        if kind == KIND_BATCH_OK:
            self._takes_batches = True
        elif kind == KIND_HELLO_ACK and self._takes_batches is None:
            self._takes_batches = False
            self._burst_start = 0.0

    def _signal_peer_lost(self) -> None:
        self._steady = False
        self.__dict__.pop("_send", None)  # the next send is an attempt, which says PeerGone
        super()._signal_peer_lost()

    def _consumer_gone(self) -> PeerGone | ChannelUnavailable:
        return self._presence.lost_error(
            PeerGone(f"the consumer of {self._what} is gone (it died or closed before the end of stream)")
        )

    # --- the flusher's side ------------------------------------------------------

    def _write_outbox_now(self) -> bool:
        """Under the call gate, never blocking: True once the outbox is written (or it is not attached yet)."""
        return self._phase != _READY or not self._outbox or self._write_outbox()

    def _flusher_fd(self) -> int:
        """The socket the flusher waits on for room."""
        return -1 if self._freed else self._sock.fileno()

    # --- the rendezvous --------------------------------------------------------

    def _progress(self) -> bool:
        """One non-blocking step of the rendezvous; True once the consumer is there (then sends go straight out)."""
        if self._take_replies(KIND_HELLO_ACK):
            return self._attach()
        now = monotonic()
        if now < self._next_control_at:
            return False
        self._schedule_control(now)
        consumer = self._presence.peer_state()
        # a consumer binds before its presence appears: alive now, it queues this HELLO and answers it when it reads
        return self._send_control(self._hello) and consumer is PeerState.ALIVE and self._attach()

    def _attach(self) -> bool:
        """The consumer is there: check who holds its port, then send at full speed and watch it."""
        host, port = self._sock.getpeername()[:2]
        owners = udp_socket_owners(self._family, host, port)
        foreign = None if owners is None else foreign_owner(self._presence, owners)
        if foreign is not None:
            raise ChannelUnavailable(
                f"{self._what}: the port is held by a socket of {user_text(foreign)}, not by this channel's "
                f"consumer ({user_text(self._presence.trust.uid)} or the owner of its presence file): podipc "
                f"sends nothing there; stop that program or use another port ({SHARE_FIX})"
            )
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # refusals of HELLOs sent before it bound
        self._refused = False
        self._phase = _READY
        self._peer_seen = True
        if self._coalescing and self._takes_batches is not False:
            self._burst_start = BURST_START_SECONDS
        self._send = self._steady_sender()  # type: ignore[method-assign,assignment]
        self._sock_send = self._sock.send
        self._steady = True
        self._presence.watch(self._signal_peer_lost)
        self._readiness_changed()
        return True

    def _schedule_control(self, now: float) -> None:
        self._next_control_at = now + self._control_pause
        self._control_pause = min(self._control_pause * 2, RETRY_MAX_SECONDS)

    def _send_control(self, datagram: bytes) -> bool:
        """Send a control datagram; False when refused (nobody listened, now or for an earlier one)."""
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # a pending refusal would eat this send
        try:
            self._sock.send(datagram)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise _translate(exc, self._what) from exc
            self._refused = True
            return False
        return True

    def _take_replies(self, kind: int) -> bool:
        """Read every reply queued now (never waits); True when one of `kind` was among them."""
        found = False
        while True:
            try:
                reply = self._sock.recv(HEADER_SIZE + 1)
            except BlockingIOError:
                return found
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise _translate(exc, self._what) from exc
                self._refused = True  # one of our datagrams found the port closed; what is queued comes next
                continue
            decoded = decode(reply)
            if decoded is not None:
                self._heard(decoded[0])
                found = found or decoded[0] == kind

    # --- readiness, closing ------------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        fd = self._sock.fileno()
        if self._phase == _READY:
            return fd, POLLOUT, None
        return fd, POLLIN, max(0.0, self._next_control_at - monotonic())

    def _try_close(self) -> bool:
        if self._phase == _DONE:
            return True
        if self._phase == _RENDEZVOUS and not self._progress():
            return False
        if self._phase == _READY:
            if not self._try_flush():
                return False  # the end of stream counts what the outbox holds: it leaves first
            self._begin_ending()
        if self._take_replies(KIND_EOS_ACK):
            self._phase = _DONE
            return True
        now = monotonic()
        if self._peer_lost or self._refused:
            # the consumer acknowledges before it leaves, so its ack is queued by now, or comes within the grace
            if self._gone_since is None:
                self._gone_since = now
                self._next_control_at = min(self._next_control_at, now + ACK_GRACE_SECONDS)
            elif now >= self._gone_since + ACK_GRACE_SECONDS:
                raise self._presence.lost_error(
                    PeerGone(f"the consumer of {self._what} is gone before it took the end of stream")
                )
        if now >= self._next_control_at:
            self._send_control(self._hello)  # the first HELLO may have been lost: say it again
            self._send_control(self._end_of_stream)
            self._schedule_control(now)
        return False

    def _begin_ending(self) -> None:
        self._phase = _ENDING
        self._steady = False
        self._burst_start = 0.0
        self._end_of_stream = encode(KIND_EOS, self._sent)  # the count of messages sent
        self.__dict__.pop("_send", None)
        self._refused = False
        self._send_control(self._end_of_stream)
        self._control_pause = RETRY_FIRST_SECONDS
        self._schedule_control(monotonic())
        self._readiness_changed()

    def _free(self) -> None:
        self._steady = False
        self._burst_start = 0.0
        self.__dict__.pop("_send", None)
        self._unwatch()
        self._outbox.clear()
        self._held = 0
        self._presence.leave(clean=self._phase == _DONE, peer_file_is_evidence=_never)
        self._sock.close()

    def _drop_inherited(self) -> None:
        self._sock.close()


def _never() -> bool:
    return False


# --- consumer ---------------------------------------------------------------------------


class UDPConsumer(Consumer):
    """Binds the port and receives datagrams (DATA, and BATCH once it said it takes them); counts lost ones, skips garbage.

    The messages of a BATCH datagram after its first wait in `_pending` (last first) and are
    served before the socket is read again.
    """

    options: ClassVar[tuple[Option, ...]] = UDP_OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    late: int = 0
    """Messages that arrived after a later one (in reordered or duplicated datagrams) and were dropped."""
    _port_closed = False
    _verified = False
    _unchecked_at_most = 0
    """After connect(): how many datagrams at most may still be queued from before it (from anyone)."""
    _refusal: str | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        super().__init__(address, settings)
        self.max_message_size = MAX_MESSAGE_SIZE
        self._what = address.location
        self._family = _family(address)
        self._expected = 0
        self._pending: list[bytes] = []
        """The messages of the last BATCH datagram not yet served, the next one last."""
        self._producer: tuple[str, int] | None = None
        self._buffer = bytearray(UDP_DATAGRAM_LIMIT + 1)
        self._view = memoryview(self._buffer)
        self._spin = float(settings["spin"])
        self._sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            self._grow_receive_buffer(int(settings["rcvbuf"]))
            self._bind(address)
            _set_receive_timeout(self._sock, FAST_SLICE_SECONDS)
            self._presence = Presence(
                address.token,
                "consumer",
                settings["mode"],
                handover_wait=float(settings["wait"]),
                channel=address.location,
            )
        except OSError as exc:
            self._sock.close()
            raise ChannelUnavailable(f"cannot open {self._what}: {exc.strerror or exc}") from exc
        except BaseException:
            self._sock.close()
            raise
        try:
            self._tracker = PeerTracker(self._presence)
        except BaseException:
            self._presence.close()
            self._sock.close()
            raise
        self._recv_into = self._sock.recv_into
        poller = select.poll()
        poller.register(self._sock, POLLIN)  # polled with timeout 0 only: it never stays on the socket's wait queue
        self._poll = poller.poll
        self._unpack_sequence = SEQUENCE.unpack_from

    def _grow_receive_buffer(self, size: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:  # no CAP_NET_ADMIN: capped by /proc/sys/net/core/rmem_max
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def _bind(self, address: Address) -> None:
        host, port = _target(address)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            owners = udp_socket_owners(self._family, host, port) or []
            holders = ", ".join(sorted({user_text(uid) for uid in owners})) or "a process we cannot see"
            raise ChannelUnavailable(
                f"cannot bind {self._what}: {exc.strerror}; another socket holds this port ({holders}): "
                "stop it or use another port"
            ) from exc

    @property
    def receive_buffer_size(self) -> int:
        """Bytes of receive buffer the kernel granted (it reports twice what it accounts)."""
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    # --- receiving ---------------------------------------------------------------

    @holds_call_gate
    def recv(self, timeout: float | None = None) -> bytes:
        """Receive the next message (as Consumer.recv); its fast version: a datagram already queued, in order.

        At 64 B the base class's layers (a deadline from the clock twice, a call more) cost a
        tenth of a message; anything but the next data datagram queued now goes the checked way.
        """
        if self._verified and (timeout is None or timeout >= FAST_SLICE_SECONDS):
            token = self._token
            try:
                token.pop()
            except IndexError:
                pass  # another thread's call is inside: the checked path waits its turn
            else:
                try:
                    if not self._state:
                        pending = self._pending
                        if pending:
                            return pending.pop()
                        buffer = self._buffer
                        try:
                            size = self._recv_into(buffer, 0, _DONTWAIT)
                        except OSError:
                            size = -1  # nothing queued (or an error the checked path meets again)
                        if (
                            size >= HEADER_SIZE
                            and buffer[2] == KIND_DATA
                            and buffer[0] == MAGIC_FIRST
                            and buffer[1] == MAGIC_SECOND
                            and self._unpack_sequence(buffer, SEQUENCE_OFFSET)[0] == self._expected
                        ):
                            self._expected += 1
                            return bytes(self._view[HEADER_SIZE:size])
                        if size >= 0:
                            message = self._take(size)
                            if message is not None:
                                return message
                except EndOfStream:
                    self._ended = True
                    raise
                except PodIPCError as error:
                    if self._closing and not isinstance(error, ChannelClosed):
                        raise self._closed_error() from error
                    raise
                finally:
                    token.append(None)
                    if self._state:
                        self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return Consumer.recv(self, timeout)

    def _recv(self, deadline: float | None) -> bytes:
        pending = self._pending
        if pending:
            return pending.pop()
        if self._verified and (deadline is None or deadline - monotonic() >= FAST_SLICE_SECONDS):
            # the fast path: one blocking read cannot overrun the deadline (SO_RCVTIMEO is one slice)
            buffer = self._buffer
            try:
                size = self._recv_into(buffer, 0, _DONTWAIT)
            except BlockingIOError:
                size = self._spin_then_block()
            except OSError:
                size = -1
            if (
                size >= HEADER_SIZE
                and buffer[2] == KIND_DATA
                and buffer[0] == MAGIC_FIRST
                and buffer[1] == MAGIC_SECOND
                and self._unpack_sequence(buffer, SEQUENCE_OFFSET)[0] == self._expected
            ):
                self._expected += 1
                return bytes(self._view[HEADER_SIZE:size])
            if size >= 0:
                message = self._take(size)
                if message is not None:
                    return message
        return Consumer._recv(self, deadline)

    def _spin_then_block(self) -> int:
        """Poll the empty socket for `spin` seconds (a peer sending now need not wake us), then block one slice.

        After PURE_SPIN_SECONDS each poll yields the CPU first: a peer that shares this core
        (two vCPUs on a busy node) otherwise waits out the whole spin, on both sides of a
        round trip (measured: 230 us round trips at 64 B instead of 15-35 us).

        The datagram's size, or -1 when nothing came (or an error is waiting for the attempt path).
        """
        if UNFLUSHED:
            flush_pending()  # what this process sent may be what we are waiting for
        spin = self._spin
        if spin:
            poll, began = self._poll, monotonic()
            until, yield_after = began + spin, began + min(spin, PURE_SPIN_SECONDS)
            while not poll(0):
                now = monotonic()
                if self._state or now >= until:
                    break
                if now >= yield_after:
                    _sched_yield()  # the peer may be waiting for this very core (2 vCPUs, a busy node)
        try:
            return self._recv_into(self._buffer)
        except OSError:
            return -1

    def _try_recv(self) -> bytes | None:
        pending = self._pending
        if pending:
            return pending.pop()
        while True:
            if self._verified:
                try:
                    size = self._recv_into(self._buffer, 0, _DONTWAIT)
                except BlockingIOError:
                    self._check_producer()
                    return None
                except OSError as exc:
                    self._receive_failed(exc)
                    continue
            else:
                checked = self._receive_checking_source()
                if checked is None:
                    self._check_producer()
                    return None
                if checked < 0:
                    continue
                size = checked
            message = self._take(size)
            if message is not None:
                return message

    def _try_recv_many(self, max_count: int) -> list[bytes]:
        """Up to `max_count` messages there now: what a BATCH left pending taken at once, then datagram by datagram."""
        messages: list[bytes] = []
        pending = self._pending
        try:
            while len(messages) < max_count:
                if pending:
                    taken = pending[-(max_count - len(messages)) :]
                    del pending[-len(taken) :]
                    taken.reverse()
                    messages += taken
                    continue
                message = self._try_recv()
                if message is None:
                    break
                messages.append(message)
                pending = self._pending  # a BATCH datagram left its other messages here
        except PodIPCError as error:
            self._after_some(messages, error)
        return messages

    def _receive_checking_source(self) -> int | None:
        """Read one datagram looking at its source: None when none is queued, -1 when skipped, else its size.

        Until the HELLO every datagram's source is checked; after it, until the queue was once empty,
        because what queued before connect() may come from anywhere.
        """
        try:
            size, source = self._sock.recvfrom_into(self._buffer, 0, _DONTWAIT)
        except BlockingIOError:
            if self._producer is not None:
                self._verified = True  # everything queued before connect() is read: the kernel filters the rest
            return None
        except OSError as exc:
            self._receive_failed(exc)
            return -1
        if self._producer is not None:
            self._unchecked_at_most -= 1
            if self._unchecked_at_most <= 0:
                self._verified = True  # a consumer that never finds its socket empty still gets to the fast path
        if self._producer is None:
            decoded = decode(self._view[:size])
            if decoded is not None and decoded[0] == KIND_HELLO:
                self._answer_hello(source)
            else:
                self.skipped += 1
            return -1
        if tuple(source[:2]) != self._producer:
            self.skipped += 1
            return -1
        return size

    def _queued_at_most(self) -> int:
        """An upper bound of the datagrams in the socket's queue now, from the memory they are charged."""
        try:
            meminfo = self._sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, RECEIVE_MEMORY.size)
            charged = int(RECEIVE_MEMORY.unpack(meminfo)[0])
        except OSError:  # a kernel before 4.6: the whole buffer could be full
            charged = int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        return charged // SMALLEST_DATAGRAM_CHARGE + 1

    def _receive_failed(self, error: OSError) -> None:
        if error.errno not in _REFUSED:
            raise PodIPCError(f"{self._what}: {error.strerror or error}") from error
        self._port_closed = True  # an answer of ours found the producer's port closed; read what is queued first

    def _check_producer(self) -> None:
        """Nothing is queued: raise PeerGone if the producer was lost meanwhile (its last datagrams are read)."""
        if self._peer_lost or self._port_closed:
            raise self._presence.lost_error(
                PeerGone(f"the producer of {self._what} is gone (it died or closed without ending the stream)")
            )

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
        if size >= HEADER_SIZE and buffer[2] == KIND_BATCH and buffer[0] == MAGIC_FIRST and buffer[1] == MAGIC_SECOND:
            return self._take_batch(size)
        if size == 0 and self._closing:
            raise self._closed_error()  # shutdown() by a close elsewhere: a blocking read returns nothing
        self._control(self._view[:size])
        return None

    def _take_batch(self, size: int) -> bytes | None:
        """Handle the BATCH datagram of `size` bytes in the buffer: its first new message (the rest wait in
        `_pending`), or None when it was malformed (skipped) or late (dropped)."""
        messages = split_batch(bytes(self._view[HEADER_SIZE:size]))
        if messages is None:
            self.skipped += 1  # its messages are counted lost by the next datagram's sequence number
            return None
        sequence = self._unpack_sequence(self._buffer, SEQUENCE_OFFSET)[0]
        expected = self._expected
        if sequence < expected:  # all of it late, or (only from a forger) its head
            late = min(expected - sequence, len(messages))
            self.late += late
            del messages[:late]
            sequence += late
            if not messages:
                return None
        self.lost += sequence - expected
        self._expected = sequence + len(messages)
        messages.reverse()
        first = messages.pop()
        self._pending = messages
        return first

    def _answer_hello(self, source: Any) -> None:
        """A HELLO before any: if its socket is ours (or the producer's trusted user's), talk only to it from now on."""
        host, port = source[0], source[1]
        owners = udp_socket_owners(self._family, host, port)
        if owners is None:
            foreign = None  # this system does not say who owns sockets: the handshake alone decides
        elif not owners:
            foreign = -1  # its socket is gone already
        else:
            foreign = foreign_owner(self._presence, owners)
        if foreign is not None:
            self.skipped += 1
            if self._refusal is None:
                whose = "a socket that is gone" if foreign < 0 else f"a socket of {user_text(foreign)}"
                self._refusal = f"ignored a HELLO from {host}:{port}, {whose}"
            return
        try:
            self._sock.connect(source)
        except OSError as exc:
            raise PodIPCError(f"{self._what}: cannot answer {host}:{port}: {exc.strerror or exc}") from exc
        self._producer = (host, port)
        self._unchecked_at_most = self._queued_at_most()
        self._peer_seen = True
        self._say_hello_back()
        self._presence.peer_seen = False  # a producer seen before (one of an earlier stream) is not this one
        self._tracker.attach()
        self._presence.watch(self._signal_peer_lost, self._tracker)

    def _control(self, datagram: memoryview) -> None:
        """Handle a HELLO (repeated) or the EOS; skip anything else. Raises EndOfStream at EOS."""
        decoded = decode(datagram)
        if decoded is None:
            self.skipped += 1
            return
        kind, sequence, _ = decoded
        if kind == KIND_HELLO:
            self._say_hello_back()
        elif kind == KIND_EOS:
            if sequence > self._expected:
                self.lost += sequence - self._expected
                self._expected = sequence
            self._reply(KIND_EOS_ACK)
            self._free_once()
            raise EndOfStream(f"{self._what}: the producer ended the stream")
        else:
            self.skipped += 1

    def _say_hello_back(self) -> None:
        """Answer a HELLO: BATCH-OK (this consumer takes BATCH; older producers ignore it), then the HELLO-ACK."""
        self._reply(KIND_BATCH_OK)
        self._reply(KIND_HELLO_ACK)

    def _reply(self, kind: int) -> None:
        with contextlib.suppress(OSError):  # the producer repeats what needs an answer
            self._sock.send(encode(kind, self._expected))

    def _peer_timeout(self) -> PeerTimeout:
        timeout = super()._peer_timeout()
        if self._refusal is None:
            return timeout
        return PeerTimeout(f"{timeout}; {self._refusal} (podipc takes a HELLO only from its own user's producer)")

    # --- readiness, closing ------------------------------------------------------

    def _readiness(self) -> tuple[int, int, float | None]:
        return self._sock.fileno(), POLLIN, 0.0 if self._pending else None

    def _interrupt(self) -> None:
        with contextlib.suppress(OSError):  # ENOTCONN before the HELLO: the read wakes all the same
            self._sock.shutdown(socket.SHUT_RD)

    def _free(self) -> None:
        self._pending = []
        self._presence.leave(clean=True, peer_file_is_evidence=_never)
        self._sock.close()

    def _drop_inherited(self) -> None:
        self._sock.close()


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
    options=UDP_OPTIONS,
    capabilities=frozenset({Capability.PRESENCE_FILES}),
    availability=availability,
    port_protocol="udp",
    rank=20,
)
