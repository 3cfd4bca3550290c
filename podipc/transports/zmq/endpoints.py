"""zmq+tcp:// and zmq+ipc:// - ZeroMQ PAIR sockets (pyzmq).

Address:
    zmq+tcp://HOST:PORT        the consumer binds tcp://HOST:PORT, the producer connects
    zmq+ipc:///abs/path.sock   the consumer binds ipc:///abs/path.sock (a socket file)
    options: wait=SECONDS (peer rendezvous, default 30; none/inf: forever),
             mode=0600 (socket and presence files; 0660 shares a group),
             hwm=MESSAGES (send/receive high-water mark, default 1000),
             max_message_size=BYTES (default 64MiB; the consumer sets ZMQ_MAXMSGSIZE to it),
             pattern=pair|fanin, producers=N, name=NAME (fan-in: many named producers into one
             consumer, ROUTER and DEALER sockets: podipc.transports.zmq.fanin)

Requires:
    pyzmq (`pip install 'podipc[zmq]'`), libzmq >= 4.1 with ipc support for zmq+ipc://.
    This module imports pyzmq; the transport's descriptor (podipc.transports.zmq) does not,
    so podipc works without pyzmq and says how to install it.

Semantics:
    One podipc message is one single-frame zmq message: boundaries and order kept,
    reliable while both sides live. Backpressure comes from the high-water marks: a
    producer whose consumer lags waits in send (bounded by its timeout).

    A podipc producer begins its stream with the two-frame message [b"podipc", b"sos"]
    (start of stream) and declares it in its presence file (STARTS_STREAMS). End of stream
    is the two-frame message [b"podipc", b"eos"], which no single-frame
    data message (not even an empty one) can be mistaken for; the consumer answers
    [b"podipc", b"eos-ack"] and the producer's close() returns once it has that answer.
    A multipart message whose first frame is b"podipc" is control: the start or end of
    stream, else skipped and counted in `Consumer.skipped`. The frames of other multipart
    messages (which podipc never sends) arrive as separate messages. Telling a first frame
    from a later one needs libzmq's more-flag of every frame, which costs more than
    receiving a small frame (see RECEIVING_FRAMES); so the consumer looks at it only
    until the start of stream: a producer that sends sos promises one frame per message,
    and from then on only a frame equal to b"podipc" is looked at twice. A frame larger
    than max_message_size makes libzmq drop that connection (ZMQ_MAXMSGSIZE), so a peer
    claiming a huge size never makes the consumer allocate it. The consumer takes ZMTP 3
    peers only (ZMTP3_ONLY_DOMAIN): bytes that are not ZMTP never occupy its PAIR socket.

    Max message: the max_message_size option (default 64 MiB), on both sides.
    `recv_view()` hands out libzmq's own buffer (read-only, no copy) when a message is
    already queued; `recv()` returns bytes (one copy, as pyzmq's own recv does).

    Rendezvous: the producer's first send (or close) waits until the consumer's presence
    file appears or (for a plain pyzmq consumer) its socket monitor reports a connection
    (PeerTimeout after `wait`), probing every RENDEZVOUS_PROBE_SECONDS. ZMQ_IMMEDIATE is
    NOT used: with it libzmq drops the unread end-of-stream ack when the consumer
    disconnects. Liveness: zmq hides disconnects, so both sides hold a
    podipc.presence.Presence file in /dev/shm, and the process's one peer-death monitor
    (Presence.watch) wakes a side whose peer died, within about 0.2 s, whether it sends at
    full speed, waits at the high-water mark or waits for a message: the producer raises
    PeerGone; the consumer first hands out what is queued, then raises PeerGone.

    A restart ends the stream (zmq would reconnect the producer to a consumer restarted
    at once and go on): a consumer whose first message from a marked producer is not the
    start of stream joined a stream under way -> PeerGone (and never acks its end); the
    producer's monitor tracks the consumer it rendezvoused with (presence.PeerTracker:
    the file's identity) and a replaced one is PeerGone too. docs/wire/zmq.md describes it.

    Trust (podipc.ownership): zmq+ipc's socket file is checked before use. The consumer
    binds under a temporary name, sets `mode` and links it into place (never libzmq's
    unlink-then-bind at the real path); a file already there is replaced only when it is a
    socket nobody listens on that this user owns (or the common group's with mode=0660)
    and that other users may not connect to; anything else is ChannelUnavailable naming the
    owner and the fix. The producer sends nothing before the socket file at the path
    passes the same check. zmq+tcp has no permissions: anyone in the pod's network
    namespace can connect (docs/reliability.md, "Who can do what").

    Creates: the consumer binds (for zmq+ipc it creates the socket file and removes it
    when the stream ends or it closes); each side creates and removes its presence file.
    Every socket closes with a short linger, so close() never hangs.

Lifecycle (the endpoint contract of podipc.endpoint): every call is one non-blocking
attempt (NOBLOCK) and, when it must wait, a poll of zmq's own descriptor (ZMQ_FD) and the
endpoint's waker; no helper thread. zmq's descriptor is edge-triggered: it fires when
libzmq has commands to process, not while a message waits. A receive that finds nothing
has processed them (libzmq does so before it says EAGAIN) and a send that finds no room
asks ZMQ_EVENTS, which does the same, so the next arrival or room fires it again. A call
waiting inside the call gate sleeps on it alone (no other call can take the edge from
it); a waiter outside the gate (podipc.aio, podipc.wait, another thread's selector) also
re-checks every EDGE_RECHECK_SECONDS, since a call on another thread may consume the
edge it waits for. fileno() may fire spuriously (libzmq's own commands, a peer
connecting): then call try_recv()/try_send() until they return None/False.
Threads: zmq sockets are not thread-safe; the call gate serializes each side, and
close()/abort() from another thread or a signal handler never touch the socket while a
call is inside: they wake it through the waker, and the last call out frees. fork: an
inherited endpoint raises ChannelClosed in the child; the child's close() touches
nothing of the parent's (pyzmq never closes a parent's socket in a child).

Why one module of ~800 lines: both endpoints share `_ZMQEndpoint` (the socket, its
edge-triggered readiness and the monitor that sees the peer go), and the socket-file
trust checks and the per-process context exist only for them; split, each half would
reach into the other's private state.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import zmq

from podipc.address import UNIX_PATH_MAX, Address
from podipc.consuming import Consumer
from podipc.endpoint import _Endpoint, holds_call_gate
from podipc.errors import ChannelUnavailable, EndOfStream, PeerGone, PodIPCError
from podipc.options import Option
from podipc.ownership import Trust, owner_text
from podipc.presence import PeerState, PeerTracker, Presence
from podipc.producing import Producer
from podipc.queue import FANIN_WORD
from podipc.transports.zmq import LIMIT_FIX, LIMIT_SOURCE, OPTIONS
from podipc.waking import POLLIN

CONTROL_PREFIX = b"podipc"
START_OF_STREAM = (CONTROL_PREFIX, b"sos")
END_OF_STREAM = (CONTROL_PREFIX, b"eos")
END_OF_STREAM_ACK = (CONTROL_PREFIX, b"eos-ack")
CONTROL_MAX_SIZE = 64
RENDEZVOUS_PROBE_SECONDS = 0.02
"""How often a producer waiting for its consumer probes the consumer's presence file (and socket monitor)."""
EDGE_RECHECK_SECONDS = 0.1
"""How often a waiter outside the call gate re-tries although zmq's edge-triggered descriptor did not fire."""
RECONNECT_INTERVAL_MS = 20
ACK_GRACE_SECONDS = 1.0
"""How long a closing producer still waits for the end-of-stream ack once the peer monitor saw the consumer leave."""
# A podipc producer declares this in its presence file: "my streams begin with a start of stream".
# A raw peer's presence file does not.
STARTS_STREAMS = "start-of-stream"
PRODUCER_LINGER_MS = 0
CONSUMER_LINGER_MS = 500
# libzmq takes any first byte but 0xFF for a ZMTP 1.0 greeting, which has no handshake to fail:
# an HTTP probe or other garbage became the PAIR socket's one peer at once, and a producer
# connecting before that pipe was torn down was refused by PAIR while its connection stayed
# up, so its stream (end of stream included) went nowhere. With a ZAP domain set, libzmq
# refuses ZMTP 1.0/2.0 greetings; no ZAP handler lives in podipc's context, so ZMTP 3 peers
# connect as before. It authenticates nobody.
ZMTP3_ONLY_DOMAIN = b"podipc"
RECEIVING_FRAMES = (
    "Measured (pyzmq 27, 64-byte frames): recv(NOBLOCK) 0.19 us; asking RCVMORE after it +0.9 us "
    "(pyzmq turns the option into an enum on every call); recv(copy=False) with Frame.more and .bytes +0.47 us"
)
"""Why the consumer checks the more-flag of every frame only until the start of stream (see the module docstring)."""

_NOBLOCK = zmq.NOBLOCK
_SNDMORE = zmq.SNDMORE
_RCVMORE = zmq.RCVMORE
_EVENTS = zmq.EVENTS
_ZMQ_POLLOUT = zmq.POLLOUT


def endpoint_of(address: Address) -> str:
    """The libzmq endpoint of a podipc address."""
    if address.scheme == "zmq+ipc":
        return f"ipc://{address.path}"
    host = "127.0.0.1" if address.host == "localhost" else address.host
    return f"tcp://[{host}]:{address.port}" if ":" in host else f"tcp://{host}:{address.port}"


def _translate(error: zmq.ZMQError, what: str) -> PodIPCError:
    return PodIPCError(f"{what}: zmq: {error.strerror}")


class _ZMQEndpoint(_Endpoint):
    """The context, socket, readiness and presence file that both sides own."""

    _what: str
    _context: zmq.Context[zmq.Socket[bytes]]
    _sock: zmq.Socket[bytes]
    _presence: Presence
    _zfd: int
    _waiting_thread = 0
    """The thread waiting inside the call gate now (0: none); see _readiness."""
    _context_held = False
    _socket_file = ""
    _socket_type: ClassVar[int] = zmq.PAIR
    """PAIR; ROUTER and DEALER for fan-in (podipc.transports.zmq.fanin)."""
    _fanin: ClassVar[bool] = False
    """This side is fan-in's: the peer's presence file must declare FANIN_WORD (a pair side's must not)."""

    def _claim_presence(self, address: Address, settings: Mapping[str, Any], role: str) -> Presence:
        """This side's presence file (a fan-in producer claims a slot instead)."""
        return Presence(
            address.token, role, settings["mode"], handover_wait=float(settings["wait"]), channel=address.location
        )

    def _open_socket(self, address: Address, settings: Mapping[str, Any], role: str) -> None:
        """Claim the presence, take the shared context and make the socket; on failure, undo and raise."""
        self._what = address.location
        self._presence = self._claim_presence(address, settings, role)
        try:
            self._context = SHARED_CONTEXT.acquire()
        except BaseException:
            self._presence.close()
            raise
        self._context_held = True
        try:
            sock = self._context.socket(self._socket_type)
        except BaseException:
            self._leave_context_and_presence(clean=True)
            raise
        self._sock = sock
        try:
            sock.setsockopt(zmq.SNDHWM, int(settings["hwm"]))
            sock.setsockopt(zmq.RCVHWM, int(settings["hwm"]))
            # every send and receive is one attempt that never blocks in libzmq, also without NOBLOCK
            # (the hot paths pass no flags: parsing the argument costs measurably at 64 B)
            sock.setsockopt(zmq.SNDTIMEO, 0)
            sock.setsockopt(zmq.RCVTIMEO, 0)
            if address.scheme == "zmq+tcp" and ":" in address.host:
                sock.setsockopt(zmq.IPV6, 1)
            self._zfd = int(sock.get(zmq.FD))
        except BaseException:
            sock.close(linger=0)
            self._leave_context_and_presence(clean=True)
            raise

    def _leave_context_and_presence(self, clean: bool) -> None:
        try:
            if self._context_held:
                self._context_held = False
                SHARED_CONTEXT.release()
        finally:
            self._presence.leave(clean, self._peer_file_is_evidence)

    def _peer_file_is_evidence(self) -> bool:
        """Whether a dead peer's presence file must stay for `podipc clean` (it names an object still there)."""
        return False

    def _retry_hint(self) -> float | None:
        """retry_after for _readiness: the transport's own (rendezvous, room known now), else the edge rule."""
        if self._waiting_thread == threading.get_ident():
            return None  # a call inside the gate made the last attempt: the edge is armed for it alone
        return EDGE_RECHECK_SECONDS

    def _readiness(self) -> tuple[int, int, float | None]:
        """zmq's descriptor (ZMQ_FD, readable when libzmq has news), and when to re-try without it."""
        return self._zfd, POLLIN, self._retry_hint()

    def _await_readiness(self, deadline: float | None, closing: bool = False) -> None:
        self._waiting_thread = threading.get_ident()
        try:
            super()._await_readiness(deadline, closing)
        finally:
            self._waiting_thread = 0

    def _close_socket(self, linger: int) -> None:
        self._zfd = -1
        self._sock.close(linger=linger)

    def _drop_inherited(self) -> None:
        """In a forked child: nothing to close (pyzmq never closes a parent's socket in a child; presence has its hook)."""
        self._zfd = -1
        self._context_held = False
        self._freed = True


class ZMQProducer(_ZMQEndpoint, Producer):
    """Connects a PAIR socket to the consumer and sends one frame per message."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX
    _room_now = False
    """The last look (poll) found room: a send would not wait now."""
    _ending = False
    """The end of stream went out; waiting for its ack."""
    _acknowledged = False
    _lost_at: float | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        Producer.__init__(self, address, settings)
        self.max_message_size = int(settings["max_message_size"])
        self._monitor: zmq.Socket[bytes] | None = None
        self._started = False
        """Rendezvous done and the start of stream sent: send() may go straight to pyzmq (until then `_state` is set)."""
        self._state = 1
        self._trust = Trust.for_mode(int(settings["mode"]))
        self._socket_file = address.path if address.scheme == "zmq+ipc" else ""
        self._open_socket(address, settings, "producer")
        sock = self._sock
        self._send_frame = sock.send
        try:
            self._presence.declare(STARTS_STREAMS)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
            sock.setsockopt(zmq.LINGER, PRODUCER_LINGER_MS)
            sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_SIZE)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
            sock.connect(endpoint_of(address))
            self._tracker = PeerTracker(self._presence)
        except zmq.ZMQError as exc:
            self._free_at_open()
            raise ChannelUnavailable(f"cannot connect to {self._what}: {exc.strerror}") from exc
        except OSError as exc:
            self._free_at_open()
            raise ChannelUnavailable(f"cannot mark {self._presence.path}: {exc.strerror}") from exc
        except BaseException:
            self._free_at_open()
            raise

    def _free_at_open(self) -> None:
        self._closed = True
        self._freed = True
        self._free()

    @holds_call_gate
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (see Producer.send); whole bytes without a timeout go straight to pyzmq.

        The same gate and checks as Producer.send (closed, too large), done inline: at 64 B
        the generic path (a memoryview and its format checks) costs as much as pyzmq's send.
        Anything else (waiting, a closed or forked producer, a lost consumer) takes the generic path.
        """
        if type(data) is bytes and timeout is None:
            token = self._token
            try:
                token.pop()
            except IndexError:
                pass  # another thread's call is inside: wait for the gate on the generic path
            else:
                try:
                    if not self._state and len(data) <= self.max_message_size:
                        self._send_frame(data)  # SNDTIMEO 0: never blocks
                        return
                except zmq.Again:
                    pass  # full: the generic path waits for room
                except zmq.ZMQError as exc:
                    raise _translate(exc, self._what) from exc
                finally:
                    token.append(None)
                    if self._state:
                        self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        super().send(data, timeout)

    # --- the endpoint contract ---------------------------------------------------

    def _try_send(self, view: memoryview) -> bool:
        if self._peer_lost:
            raise self._consumer_gone()
        if not self._started and not self._start():
            return False
        whole = view.obj
        payload = whole if type(whole) is bytes and len(whole) == view.nbytes else view
        for _ in range(2):  # pyzmq copies a whole bytes object faster than a memoryview of it
            try:
                self._send_frame(payload, _NOBLOCK)
                return True
            except zmq.Again:
                if not self._room_after_eagain():
                    return False
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        return False

    def _room_after_eagain(self) -> bool:
        """After EAGAIN: ask ZMQ_EVENTS, which processes libzmq's pending commands (a send may skip them) and so
        re-arms ZMQ_FD; True when room came meanwhile."""
        self._room_now = False
        return self._has_room()

    def _has_room(self) -> bool:
        try:
            return bool(cast(int, self._sock.get(_EVENTS)) & _ZMQ_POLLOUT)
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc

    def _try_prepare(self) -> bool:
        if self._peer_lost:
            raise self._consumer_gone()
        if not self._started and not self._start():
            return False
        self._room_now = self._has_room()
        return self._room_now

    def _readiness(self) -> tuple[int, int, float | None]:
        if not self._started:
            return self._zfd, POLLIN, RENDEZVOUS_PROBE_SECONDS
        if self._room_now:
            return self._zfd, POLLIN, 0.0
        return self._zfd, POLLIN, self._retry_hint()

    def _start(self) -> bool:
        """One non-blocking step of the rendezvous: True once the consumer is there and the start of stream went out.

        The consumer there then is the one this stream is for: from here on the peer
        monitor reports a different one (a consumer restarted at once, which zmq
        reconnects to silently) as lost, and so does a dead one.
        """
        if not self._peer_seen:
            if not self._consumer_is_there():
                return False
            self._attach()
        if not self._send_control(START_OF_STREAM):
            return False
        self._started = True
        self._settle()
        return True

    def _flags_set(self) -> bool:
        return super()._flags_set() or not self._started

    def _send_control(self, frames: tuple[bytes, bytes]) -> bool:
        """Send a two-frame control message if there is room now; False when not (nothing of it was sent)."""
        sock = self._sock
        for _ in range(2):
            try:
                sock.send(frames[0], _SNDMORE | _NOBLOCK)
            except zmq.Again:
                if not self._room_after_eagain():
                    return False
                continue
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
            sock.send(frames[1], _NOBLOCK)  # the rest of a multipart message never waits
            return True
        return False

    def _consumer_is_there(self) -> bool:
        """The consumer's presence file is alive, or (a plain pyzmq consumer) the socket monitor saw a connection."""
        there = self._presence.peer_state() is PeerState.ALIVE
        monitor = self._monitor
        if not there and monitor is not None:
            try:
                there = bool(monitor.poll(0))
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        if there and self._presence.peer_declares(FANIN_WORD) != self._fanin:
            raise ChannelUnavailable(
                f"the consumer of {self._what} gathers many producers (pattern=fanin): give this producer a "
                "name= (podipc produce --name)"
                if not self._fanin
                else f"the consumer of {self._what} takes one producer (pattern=pair): open it with pattern=fanin "
                "(podipc consume --producers N), or drop name= and pattern= here"
            )
        return there and self._socket_file_is_trusted()

    def _socket_file_is_trusted(self) -> bool:
        """zmq+ipc: the socket file at the path is there and trusted (else nothing is sent); True for zmq+tcp."""
        if not self._socket_file:
            return True
        status = check_socket_file(self._socket_file, self._trust, "producer")
        return status is not None

    def _attach(self) -> None:
        self._close_monitor()
        self._tracker.attach()
        self._peer_seen = True
        self._presence.watch(self._signal_peer_lost, self._tracker)

    def _close_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            monitor.close(linger=0)

    def _consumer_gone(self) -> PeerGone | ChannelUnavailable:
        """The PeerGone for a consumer the peer monitor lost: died, left, or replaced by another."""
        tracker = self._tracker
        if tracker.state is PeerState.ALIVE:
            return PeerGone(
                f"the consumer of {self._what} was replaced: the one this stream began with died or left "
                "and a new one attached (restarted at once?); what the old one held is lost, so the stream is broken"
            )
        return self._presence.lost_error(
            PeerGone(f"the consumer of {self._what} is gone (it died or closed without ending the stream)")
        )

    def _try_close(self) -> bool:
        """One step of ending the stream: rendezvous if needed, send the end of stream, take its ack.

        A consumer acks, then leaves: the peer monitor may see it gone before its ack arrived
        here, so a lost consumer gets ACK_GRACE_SECONDS for the ack before it is PeerGone.
        """
        if self._peer_lost and not self._ending:
            raise self._consumer_gone()
        sock = self._sock
        try:
            if not self._ending:
                if not self._started and not self._start():
                    return False
                self._presence.declare_ending()
                if not self._send_control(END_OF_STREAM):
                    return False
                self._ending = True
            while True:
                try:
                    answer = sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break  # libzmq processed its commands before EAGAIN: ZMQ_FD fires on the ack
                if tuple(answer) == END_OF_STREAM_ACK:
                    self._acknowledged = True
                    return True
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc
        if self._peer_lost:
            now = time.monotonic()
            if self._lost_at is None:
                self._lost_at = now  # a close re-tries every ABORT_CHECK_SECONDS at least
            elif now - self._lost_at >= ACK_GRACE_SECONDS:
                raise self._consumer_gone()
        return False

    def _peer_file_is_evidence(self) -> bool:
        return bool(self._socket_file) and os.path.lexists(self._socket_file)

    def _free(self) -> None:
        self._started = False
        self._close_monitor()
        self._close_socket(PRODUCER_LINGER_MS)
        self._leave_context_and_presence(clean=self._acknowledged)


class ZMQConsumer(_ZMQEndpoint, Consumer):
    """Binds a PAIR socket and receives one frame per message."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    waits_forever: ClassVar[bool] = True
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX
    _single_frames = False
    """The producer began with the start of stream, promising one frame per message (see the module docstring)."""
    _in_message = False
    """Until then: the last frame received had more frames after it (its message goes on)."""
    _started = False
    _end_received = False
    _socket_file = ""
    _socket_identity: tuple[int, int] | None = None

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        Consumer.__init__(self, address, settings)
        self.max_message_size = int(settings["max_message_size"])
        self._open_socket(address, settings, "consumer")
        sock = self._sock
        try:
            sock.setsockopt(zmq.LINGER, CONSUMER_LINGER_MS)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            sock.setsockopt(zmq.ZAP_DOMAIN, ZMTP3_ONLY_DOMAIN)
            if address.scheme == "zmq+ipc":
                self._bind_socket_file(address.path, int(settings["mode"]))
            else:
                sock.bind(endpoint_of(address))
            self._watch_peers()
        except zmq.ZMQError as exc:
            self._free_at_open()
            hint = "; another process uses this address" if exc.errno == errno.EADDRINUSE else ""
            raise ChannelUnavailable(f"cannot bind {self._what}: {exc.strerror}{hint}") from exc
        except OSError as exc:
            self._free_at_open()
            raise ChannelUnavailable(f"cannot create the socket file of {self._what}: {exc.strerror}") from exc
        except BaseException:
            self._free_at_open()
            raise
        self._recv_frame = sock.recv
        self._more = sock.get

    def _free_at_open(self) -> None:
        self._closed = True
        self._freed = True
        self._free()

    def _watch_peers(self) -> None:
        """Have the peer monitor wake this consumer when its producer dies (fan-in watches each producer)."""
        self._presence.watch(self._signal_peer_lost)

    def _bind_socket_file(self, path: str, mode: int) -> None:
        """Bind the ipc socket file with `mode`: under a temporary name, chmod-ed, then linked into place.

        libzmq unlinks whatever is at an ipc path before it binds; binding a fresh
        temporary name and linking it means nothing podipc did not check is ever removed:
        a stale socket file of ours is replaced atomically (rename), anything else refused.
        """
        stale = check_socket_file(path, Trust.for_mode(mode), "consumer")
        directory = os.path.dirname(path) or "/"
        temporary = os.path.join(directory, f".podipc-{secrets.token_hex(6)}")
        if len(temporary.encode()) > UNIX_PATH_MAX:
            raise ChannelUnavailable(
                f"{self._what}: a temporary name beside {path} would exceed {UNIX_PATH_MAX} bytes; use a shorter path"
            )
        self._sock.bind(f"ipc://{temporary}")
        try:
            os.chmod(temporary, mode)
            if stale is not None:
                _replace_stale(temporary, path, stale)
            else:
                try:
                    os.link(temporary, path, follow_symlinks=False)
                except FileExistsError as exc:
                    raise ChannelUnavailable(
                        f"{path} appeared while this consumer started (another consumer?); a channel has one consumer"
                    ) from exc
            status = os.lstat(path)
            self._socket_identity = (status.st_dev, status.st_ino)
            self._socket_file = path
            self._presence.record("path", path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    # --- receiving -----------------------------------------------------------------

    def _recv(self, deadline: float | None) -> bytes:
        if self._single_frames:
            try:
                data = self._recv_frame()  # RCVTIMEO 0: never blocks
                if data != CONTROL_PREFIX or not self._more(_RCVMORE):  # asking RCVMORE costs 0.9 us
                    return data
                self._control(data)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        return Consumer._recv(self, deadline)

    def _try_recv(self) -> bytes | None:
        try:
            while True:
                if self._single_frames:
                    data = self._recv_frame()
                    if data != CONTROL_PREFIX or not self._more(_RCVMORE):
                        return data
                    self._control(data)
                    continue
                checked = self._receive_checking_frames()
                if checked is not None:
                    return checked
        except zmq.Again:
            self._nothing_now()
            return None
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc

    def _receive_checking_frames(self) -> bytes | None:
        """Before the start of stream: one frame, its message's first frame told from the others; None for control."""
        frame = self._sock.recv(_NOBLOCK, copy=False)
        first = not self._in_message
        self._in_message = more = frame.more
        data = frame.bytes
        if first and more and data == CONTROL_PREFIX:
            self._in_message = False  # _control takes the rest of the message
            self._control(data)
            return None
        if not self._started:
            self._start_without_sos()
        self._peer_seen = True
        return data

    def _nothing_now(self) -> None:
        """No message now (libzmq processed its commands before EAGAIN, so ZMQ_FD fires on the next one).

        Raises PeerGone once the peer monitor lost the producer (what was queued is taken by then).
        """
        if self._peer_lost:
            raise self._presence.lost_error(
                PeerGone(f"the producer of {self._what} is gone (it died or closed without ending the stream)")
            )
        if not self._peer_seen and self._presence.peer_state() is PeerState.ALIVE:
            self._peer_seen = True

    @holds_call_gate
    def recv_view(self, timeout: float | None = None) -> memoryview:
        """Receive the next message as a read-only view of libzmq's own buffer, without copying it.

        The view keeps its frame alive, so it stays valid after later receives. Waiting
        (a timeout, the first message, an empty queue) falls back to a copying receive.
        """
        token = self._token
        try:
            token.pop()
        except IndexError:
            delegated = True  # read from the frame by _inside_call_here
            return memoryview(self.recv(timeout))
        try:
            if not self._state and self._single_frames:
                frame = self._sock.recv(_NOBLOCK, copy=False)
                if len(frame) != len(CONTROL_PREFIX) or frame.bytes != CONTROL_PREFIX or not frame.more:
                    return frame.buffer.toreadonly()
                self._control(frame.bytes)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc
        except EndOfStream:
            self._ended = True
            raise
        finally:
            token.append(None)
            if self._state:
                self._after_call()
        delegated = True  # noqa: F841 - read from the frame by _inside_call_here
        return memoryview(self.recv(timeout))

    def _start_without_sos(self) -> None:
        """The first message is not a start of stream: fine from a plain pyzmq producer, PeerGone from podipc's.

        A podipc producer (its presence file declares STARTS_STREAMS) sends the start of
        stream first, so anything else first means this consumer joined its stream under way:
        zmq reconnected the producer of a consumer that died (restarted at once) to this one.
        """
        self._presence.peer_state()
        if self._presence.peer_declares(STARTS_STREAMS):
            raise PeerGone(
                f"{self._what}: this consumer joined a stream under way (the producer's first message to it was "
                "not the start of stream): the consumer the stream began with died, what it held is lost, and "
                "the stream is broken; a restarted producer starts a new one"
            )
        self._started = True

    def _control(self, first: bytes) -> None:
        """A multipart message starting with b"podipc": the start or end of stream (ack it, raise EndOfStream), or skipped."""
        frames = [first]
        sock = self._sock
        while self._more(_RCVMORE):
            frames.append(sock.recv(_NOBLOCK))
        self._peer_seen = True
        if tuple(frames) == START_OF_STREAM:
            if self._started:
                raise PeerGone(
                    f"{self._what}: a new stream started before this one ended: its producer died "
                    "and another one (restarted at once?) attached; the stream is broken"
                )
            self._started = self._single_frames = True
            self._presence.peer_state()  # a podipc producer holds its presence before it sends: seen
            return
        if not self._started:
            self._start_without_sos()
        if tuple(frames) == END_OF_STREAM:
            with contextlib.suppress(zmq.ZMQError):  # a producer gone already waits for nothing
                sock.send_multipart(END_OF_STREAM_ACK, _NOBLOCK)
            self._end_received = True
            self._free_once()  # we are the call inside: the socket file and presence go now
            raise EndOfStream(f"{self._what}: the producer ended the stream")
        self.skipped += 1

    def _free(self) -> None:
        self._single_frames = False
        try:
            self._close_socket(CONSUMER_LINGER_MS)
            self._remove_socket_file()
        finally:
            self._leave_context_and_presence(clean=self._end_received)

    def _remove_socket_file(self) -> None:
        """Unlink the socket file if it is still the one we bound (we still hold the presence: no other consumer can have)."""
        identity, self._socket_identity = self._socket_identity, None
        if identity is None:
            return
        try:
            status = os.lstat(self._socket_file)
        except FileNotFoundError:
            return
        if (status.st_dev, status.st_ino) == identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_file)


# --- the socket file of zmq+ipc -----------------------------------------------------------


def check_socket_file(path: str, trust: Trust, role: str) -> os.stat_result | None:
    """Look at what is at a zmq+ipc path (never following a link): None when nothing is there, else its status.

    Raises ChannelUnavailable (owner and fix) unless it is a socket file trusted for `trust`
    (ours, or a common group's with group sharing) that other users may not connect to. For
    the consumer (role "consumer") it must moreover be stale (nobody listening): a live one
    belongs to another consumer.
    """
    what = f"the socket file {path}"
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChannelUnavailable(f"cannot look at {what}: {exc.strerror}") from exc
    trust.check_status(what, status, (stat.S_IFSOCK,))
    mode = stat.S_IMODE(status.st_mode)
    if mode & stat.S_IWOTH:  # connecting to a socket file needs write permission: every user of the pod may
        owner = owner_text(status.st_uid, status.st_gid, mode)
        raise ChannelUnavailable(
            f"{what} lets every user of the pod connect ({owner}); podipc never uses such a socket: "
            "remove it (as its owner) and let the consumer create it again (mode=0600, or 0660 to share a group)"
        )
    if role == "consumer" and _is_listening(path):
        raise ChannelUnavailable(f"{path} is a live socket of another process; a channel has one consumer")
    return status


def _replace_stale(temporary: str, path: str, stale: os.stat_result) -> None:
    """Put the bound socket at `path` in place of a stale socket file (checked: trusted, nobody listening)."""
    try:
        os.rename(temporary, path)
    except OSError as exc:
        owner = owner_text(stale.st_uid, stale.st_gid, stat.S_IMODE(stale.st_mode))
        raise ChannelUnavailable(
            f"cannot replace the stale socket file {path} ({owner}): {exc.strerror}; in a directory with the "
            "sticky bit only its owner may: that user (or root) removes it, e.g. with `podipc clean`"
        ) from exc


def _is_listening(path: str) -> bool:
    """True when a process listens on the socket file at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # its backlog is full: someone listens
    except OSError as exc:
        raise ChannelUnavailable(f"cannot probe the socket file {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


# --- one context per process ----------------------------------------------------------------


class _SharedContext:
    """One zmq context (one I/O thread) per process for all its endpoints, terminated with the last.

    A second context would add a second I/O thread and about 10 us to every round trip;
    terminating with the last endpoint flushes what lingers (the end-of-stream ack) before exit.
    """

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        """Start afresh (also in a forked child: the parent's context and its lock are not ours)."""
        self._lock = threading.Lock()
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._users = 0

    def acquire(self) -> zmq.Context[zmq.Socket[bytes]]:
        """The process's context, created on first use."""
        with self._lock:
            if self._context is None:
                self._context = zmq.Context(io_threads=1)
                self._users = 0
            self._users += 1
            return self._context

    def release(self) -> None:
        """One endpoint fewer; the last one terminates the context (bounded by the sockets' linger)."""
        with self._lock:
            if self._context is None:
                return
            self._users -= 1
            if self._users == 0:
                context, self._context = self._context, None
                context.term()


SHARED_CONTEXT = _SharedContext()
os.register_at_fork(after_in_child=SHARED_CONTEXT._forget)
