"""zmq+tcp:// and zmq+ipc:// - ZeroMQ PAIR sockets (pyzmq).

Address:
    zmq+tcp://HOST:PORT        the consumer binds tcp://HOST:PORT, the producer connects
    zmq+ipc:///abs/path.sock   the consumer binds ipc:///abs/path.sock (a socket file)
    options: wait=SECONDS (peer rendezvous, default 30), mode=0600 (socket and presence files),
             hwm=MESSAGES (send/receive high-water mark, default 1000),
             max_message_size=BYTES (default 64MiB; the consumer sets ZMQ_MAXMSGSIZE to it)

Requires:
    pyzmq (`pip install 'podipc[zmq]'`), libzmq >= 4.1 with ipc support for zmq+ipc://.
    This module imports pyzmq; the transport's descriptor (podipc.transports.zmq) does not,
    so podipc works without pyzmq and says how to install it.

Semantics:
    One podipc message is one single-frame zmq message: boundaries and order kept,
    reliable while both sides live. Backpressure comes from the high-water marks: a
    producer whose consumer lags blocks in send (bounded by its timeout).

    A podipc producer begins its stream with the two-frame message [b"podipc", b"sos"]
    (start of stream) and declares it in its presence file (STARTS_STREAMS). End of stream
    is the two-frame message [b"podipc", b"eos"], which no single-frame
    data message (not even an empty one) can be mistaken for; the consumer answers
    [b"podipc", b"eos-ack"] and the producer's close() returns once it has that answer.
    Any other multipart message starting with a b"podipc" frame is skipped and counted
    in `Consumer.skipped`; the frames of other multipart messages (which podipc never
    sends) arrive as separate messages, since only a b"podipc" frame is looked at twice. A frame
    larger than max_message_size makes libzmq drop that connection (ZMQ_MAXMSGSIZE), so
    a peer claiming a huge size never makes the consumer allocate it. The consumer takes
    ZMTP 3 peers only (ZMTP3_ONLY_DOMAIN): bytes that are not ZMTP never occupy its PAIR socket.

    Max message: the max_message_size option (default 64 MiB), on both sides.
    `recv_view()` hands out libzmq's own buffer (read-only, no copy) when a message is
    already queued; `recv()` returns bytes (one copy, as pyzmq's own recv does).

    Rendezvous: the producer's first send waits until the consumer's presence file
    appears or (for a plain pyzmq consumer) its socket monitor reports a connection
    (PeerTimeout after `wait`). ZMQ_IMMEDIATE is NOT used: with it libzmq drops the
    unread end-of-stream ack when the consumer disconnects. Liveness: zmq hides
    disconnects, so both sides hold a podipc.presence.Presence file in /dev/shm and a
    blocked send or receive checks it every quarter second -> PeerGone.

    A restart ends the stream (zmq would reconnect the producer to a consumer restarted
    at once and go on): a consumer whose first message from a marked producer is not the
    start of stream joined a stream under way -> PeerGone (and never acks its end); the
    producer tracks the consumer it rendezvoused with (presence.PeerTracker: the file's
    identity) and raises PeerGone when it is gone or replaced, probing every 0.05 s while
    it sends. docs/wire/zmq.md describes it.

    Creates: the consumer binds (for zmq+ipc it creates the socket file with `mode`,
    recovers a stale one left by a killed consumer, and removes it when it closes);
    each side creates and removes its presence file. Every socket closes with a short
    linger, so close() never hangs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import zmq

from podipc.address import Address
from podipc.channel import Consumer, Option, Producer
from podipc.errors import ChannelUnavailable, EndOfStream, PeerGone, PeerTimeout, PodIPCError, Timeout
from podipc.presence import PeerState, PeerTracker, Presence
from podipc.transports.zmq import LIMIT_FIX, LIMIT_SOURCE, OPTIONS

CONTROL_PREFIX = b"podipc"
RCVMORE = zmq.RCVMORE
START_OF_STREAM = (CONTROL_PREFIX, b"sos")
END_OF_STREAM = (CONTROL_PREFIX, b"eos")
END_OF_STREAM_ACK = (CONTROL_PREFIX, b"eos-ack")
CONTROL_MAX_SIZE = 64
LIVENESS_SLICE_SECONDS = 0.25
RENDEZVOUS_PROBE_SECONDS = 0.02
RECONNECT_INTERVAL_MS = 20
PROBE_SECONDS = 0.05  # a sending producer probes its consumer's presence this often
LOOKS_PER_PROBE = 8  # and looks at the clock about this often per probe interval
MAX_BUDGET = 256  # messages sent between two looks at the clock, at most
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
# connect as before.
ZMTP3_ONLY_DOMAIN = b"podipc"


def endpoint_of(address: Address) -> str:
    """The libzmq endpoint of a podipc address."""
    if address.scheme == "zmq+ipc":
        return f"ipc://{address.path}"
    host = "127.0.0.1" if address.host == "localhost" else address.host
    return f"tcp://[{host}]:{address.port}" if ":" in host else f"tcp://{host}:{address.port}"


def _translate(error: zmq.ZMQError, what: str) -> PodIPCError:
    return PodIPCError(f"{what}: zmq: {error.strerror}")


class _ZMQEndpoint:
    """The context, socket and presence file that both sides own."""

    _what: str
    _context: zmq.Context[zmq.Socket[bytes]]
    _sock: zmq.Socket[bytes]
    _presence: Presence
    _poller: zmq.Poller

    def _open_socket(self, address: Address, settings: Mapping[str, Any], role: str) -> None:
        self._what = address.location
        self._socket_file = ""
        self._presence = Presence(
            address.token, role, settings["mode"], handover_wait=float(settings["wait"]), channel=address.location
        )
        try:
            self._context = SHARED_CONTEXT.acquire()
        except BaseException:
            self._presence.close()
            raise
        self._released = False
        sock = self._context.socket(zmq.PAIR)
        self._sock = sock
        sock.setsockopt(zmq.SNDHWM, int(settings["hwm"]))
        sock.setsockopt(zmq.RCVHWM, int(settings["hwm"]))
        if address.scheme == "zmq+tcp" and ":" in address.host:
            sock.setsockopt(zmq.IPV6, 1)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def _release(self) -> None:
        """Close the socket (bounded linger), let go of the context and the socket file, then leave. Idempotent."""
        if self._released:
            return
        self._released = True
        try:
            self._sock.close()
            if self._socket_file:  # libzmq leaves it; we still hold the presence, so it is ours
                _unlink_quietly(self._socket_file)
        finally:
            try:
                SHARED_CONTEXT.release()
            finally:
                self._presence.close()

    def _wait_readable(self, seconds: float) -> bool:
        return bool(self._poller.poll(max(0, int(seconds * 1000))))


class ZMQProducer(_ZMQEndpoint, Producer):
    """Connects a PAIR socket to the consumer and sends one frame per message."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        Producer.__init__(self, address, settings)
        self.max_message_size = int(settings["max_message_size"])
        self._open_socket(address, settings, "producer")
        sock = self._sock
        try:
            self._presence.declare(STARTS_STREAMS)
            self._monitor: zmq.Socket[bytes] | None = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
            sock.setsockopt(zmq.LINGER, PRODUCER_LINGER_MS)
            sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_SIZE)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
            sock.setsockopt(zmq.SNDTIMEO, int(LIVENESS_SLICE_SECONDS * 1000))
            sock.connect(endpoint_of(address))
        except zmq.ZMQError as exc:
            self._abort()
            raise ChannelUnavailable(f"cannot connect to {self._what}: {exc.strerror}") from exc
        except OSError as exc:
            self._abort()
            raise ChannelUnavailable(f"cannot mark {self._presence.path}: {exc.strerror}") from exc
        except BaseException:
            self._abort()
            raise
        self._tracker = PeerTracker(self._presence)
        self._started = False  # rendezvous done and start of stream sent
        self._budget = 0  # messages send() may still pass straight to pyzmq before _look(); 0: not started
        self._chunk = 1
        self._looked_at = self._probe_at = 0.0
        self._send_frame = sock.send

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (see Producer.send); whole bytes without a timeout go straight to pyzmq.

        The same checks as Producer.send (closed, too large), done inline: at 64 B the
        generic path (a memoryview and its format checks) costs as much as pyzmq's send.
        """
        if type(data) is bytes and timeout is None and self._budget > 0 and len(data) <= self.max_message_size:
            self._budget -= 1
            try:
                self._send_frame(data)
                return
            except zmq.Again:
                pass  # full: the generic path waits for room, watching the consumer
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        super().send(data, timeout)

    def _send(self, view: memoryview, deadline: float | None) -> None:
        if self._started:
            self._budget -= 1
            if self._budget <= 0:
                self._look()
        if deadline is None and self._started:
            whole = view.obj
            try:  # pyzmq copies a whole bytes object faster than a memoryview of it
                self._send_frame(whole if type(whole) is bytes and len(whole) == view.nbytes else view)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        self._send_blocked(view, 0, deadline)

    def _rendezvous(self, deadline: float | None) -> None:
        """Wait until a consumer is there (its presence file, or a plain pyzmq peer's connection), then start the stream.

        The consumer there now is the one this stream is for: from here on, a different
        one (a consumer restarted at once, which zmq reconnects to silently) is PeerGone.
        """
        monitor = self._monitor
        while monitor is not None:
            if self._presence.peer_state() is PeerState.ALIVE or monitor.poll(0):
                break
            left = LIVENESS_SLICE_SECONDS if deadline is None else deadline - time.monotonic()
            if monitor.poll(max(0, int(min(left, RENDEZVOUS_PROBE_SECONDS) * 1000))):
                break
            self._check_consumer(deadline, "consumer")
        self._close_monitor()
        self._tracker.attach()
        self._send_when_room(START_OF_STREAM[0], zmq.SNDMORE, deadline)
        self._sock.send(START_OF_STREAM[1])  # the rest of a multipart message never blocks
        self._started = True
        self._looked_at = self._probe_at = time.monotonic()
        self._budget = self._chunk = 1

    def _look(self) -> None:
        """Every `_chunk` messages: probe the consumer when PROBE_SECONDS have passed, and size the next chunk.

        The chunk is what the producer sends in about PROBE_SECONDS / LOOKS_PER_PROBE at its
        current rate (1 to MAX_BUDGET): a slow producer looks at the clock at every message,
        a fast one every few hundred, so that probing costs nothing noticeable per message.
        """
        now = time.monotonic()
        if now >= self._probe_at:
            self._probe_at = now + PROBE_SECONDS
            self._check_attached()
        elapsed = now - self._looked_at
        self._looked_at = now
        chunk = int(self._chunk * (PROBE_SECONDS / LOOKS_PER_PROBE) / elapsed) if elapsed > 0 else MAX_BUDGET
        self._chunk = self._budget = max(1, min(MAX_BUDGET, chunk))

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _send_blocked(self, payload: memoryview | bytes, flags: int, deadline: float | None) -> None:
        """Wait for the consumer, then for room, in slices, checking the deadline and the consumer's presence."""
        if not self._started:
            self._rendezvous(deadline)
        self._send_when_room(payload, flags, deadline)

    def _send_when_room(self, payload: memoryview | bytes, flags: int, deadline: float | None) -> None:
        sock = self._sock
        while True:
            left = (
                LIVENESS_SLICE_SECONDS if deadline is None else min(LIVENESS_SLICE_SECONDS, deadline - time.monotonic())
            )
            try:
                if left > 0 and sock.poll(max(1, int(left * 1000)), zmq.POLLOUT):
                    sock.send(payload, flags | zmq.NOBLOCK)
                    return
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
            self._check_consumer(deadline, "room to send")

    def _check_attached(self) -> None:
        """PeerGone when the consumer this producer started with died, left, or was replaced by another."""
        tracker = self._tracker
        if not tracker.lost():
            return
        if tracker.state is PeerState.ALIVE:
            raise PeerGone(
                f"the consumer of {self._what} was replaced: the one this stream began with died or left "
                "and a new one attached (restarted at once?); what the old one held is lost, so the stream is broken"
            )
        raise PeerGone(f"the consumer of {self._what} is gone (it died or closed without ending the stream)")

    def _check_consumer(self, deadline: float | None, waiting_for: str) -> None:
        now = time.monotonic()
        if self._started:
            self._check_attached()
            state = self._tracker.state
        else:  # no stream yet: a consumer that came and went before it is no loss, wait for the next
            state = self._presence.peer_state()
            if state is not PeerState.ALIVE and self._presence.peer_seen:
                raise PeerGone(f"the consumer of {self._what} is gone (it died or closed without ending the stream)")
        if deadline is not None and now >= deadline:
            raise Timeout(f"{self._what}: no {waiting_for} within the timeout")
        if not self._started and state is not PeerState.ALIVE and now >= self.wait_deadline:
            raise PeerTimeout(
                f"no consumer appeared on {self._what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
            )

    def _close(self, deadline: float | None) -> None:
        """Send the two-frame end of stream, then wait for the consumer's acknowledgement."""
        try:
            self._send_blocked(END_OF_STREAM[0], zmq.SNDMORE, deadline)
            self._sock.send(END_OF_STREAM[1])
            while True:
                left = (
                    LIVENESS_SLICE_SECONDS
                    if deadline is None
                    else min(LIVENESS_SLICE_SECONDS, deadline - time.monotonic())
                )
                if left > 0 and self._wait_readable(left):
                    if tuple(self._sock.recv_multipart(zmq.NOBLOCK)) == END_OF_STREAM_ACK:
                        return
                    continue
                self._check_consumer(deadline, "acknowledgement of the end of stream")
        except zmq.ZMQError as exc:
            raise _translate(exc, self._what) from exc
        finally:
            self._abort()

    def _abort(self) -> None:
        self._started = False
        self._budget = 0  # send()'s shortcut is off: a closed producer raises ChannelClosed
        if getattr(self, "_monitor", None) is not None:
            self._close_monitor()
        self._release()


class ZMQConsumer(_ZMQEndpoint, Consumer):
    """Binds a PAIR socket and receives one frame per message."""

    options: ClassVar[tuple[Option, ...]] = OPTIONS
    max_message_source = LIMIT_SOURCE
    max_message_fix = LIMIT_FIX

    def __init__(self, address: Address, settings: Mapping[str, Any]) -> None:
        Consumer.__init__(self, address, settings)
        self.max_message_size = int(settings["max_message_size"])
        self._open_socket(address, settings, "consumer")
        sock = self._sock
        try:
            sock.setsockopt(zmq.LINGER, CONSUMER_LINGER_MS)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            sock.setsockopt(zmq.ZAP_DOMAIN, ZMTP3_ONLY_DOMAIN)
            sock.setsockopt(zmq.RCVTIMEO, int(LIVENESS_SLICE_SECONDS * 1000))
            if address.scheme == "zmq+ipc":
                self._bind_socket_file(address.path, int(settings["mode"]))
            else:
                sock.bind(endpoint_of(address))
        except zmq.ZMQError as exc:
            self._release()
            hint = "; another process uses this address" if exc.errno == errno.EADDRINUSE else ""
            raise ChannelUnavailable(f"cannot bind {self._what}: {exc.strerror}{hint}") from exc
        except BaseException:
            self._release()
            raise
        self._started = False
        self._recv_frame = sock.recv
        self._more = sock.get

    def _bind_socket_file(self, path: str, mode: int) -> None:
        """Bind the ipc socket file with `mode`; recover a stale file, refuse a live or foreign one."""
        _check_stale_socket_file(path)
        previous = os.umask(0o777 & ~mode)
        try:
            self._sock.bind(f"ipc://{path}")
        finally:
            os.umask(previous)
        self._socket_file = path
        os.chmod(path, mode)
        self._presence.record("path", path)

    def recv_view(self, timeout: float | None = None) -> memoryview:
        """Receive the next message as a read-only view of libzmq's own buffer, without copying it.

        The view keeps its frame alive, so it stays valid after later receives. Waiting
        (a timeout, the first message, an empty queue) falls back to a copying receive.
        """
        if self._closed:
            self._check_open()
        if self._ended:
            raise EndOfStream(f"{self._what}: the producer ended the stream")
        if timeout is None and self._started:
            try:
                frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
            else:
                if len(frame) != len(CONTROL_PREFIX) or frame.bytes != CONTROL_PREFIX or not frame.more:
                    return frame.buffer.toreadonly()
                try:
                    self._control(frame.bytes)
                except EndOfStream:
                    self._ended = True
                    raise
        return memoryview(self.recv(timeout))

    def _recv(self, deadline: float | None) -> bytes:
        if deadline is None and self._started:
            try:
                data = self._recv_frame()
                if data != CONTROL_PREFIX or not self._more(RCVMORE):  # asking RCVMORE costs 0.4 us
                    return data
                self._control(data)
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
        return self._recv_blocked(deadline)

    def _recv_blocked(self, deadline: float | None) -> bytes:
        """Wait for a message in slices, checking the deadline, the rendezvous and the producer's presence."""
        sock = self._sock
        while True:
            left = (
                LIVENESS_SLICE_SECONDS if deadline is None else min(LIVENESS_SLICE_SECONDS, deadline - time.monotonic())
            )
            try:
                if self._wait_readable(max(0.0, left)):  # a deadline already passed still tries once (timeout=0)
                    data = self._take()
                    if data is not None:
                        return data
                    continue
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                raise _translate(exc, self._what) from exc
            now = time.monotonic()
            state = self._presence.peer_state()
            if state is not PeerState.ALIVE and self._presence.peer_seen:
                if sock.poll(0, zmq.POLLIN):  # a clean producer put its end of stream in before leaving
                    data = self._take()
                    if data is not None:
                        return data
                    continue
                raise PeerGone(f"the producer of {self._what} is gone (it died or closed without ending the stream)")
            if deadline is not None and now >= deadline:
                raise Timeout(f"{self._what}: no message within the receive timeout")
            if not self._started and state is not PeerState.ALIVE and now >= self.wait_deadline:
                raise PeerTimeout(
                    f"no producer appeared on {self._what} within the wait timeout (start it, or allow longer with ?wait=SECONDS)"
                )

    def _take(self) -> bytes | None:
        """Receive a waiting message: its bytes, or None when it was a control message or skipped."""
        data = self._sock.recv(zmq.NOBLOCK)
        if data == CONTROL_PREFIX and self._more(RCVMORE):
            self._control(data)
            return None
        if not self._started:
            self._start_without_sos()
        return data

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
        """A multipart message: the start or end of stream (ack it, raise EndOfStream), or skipped garbage."""
        frames = [first]
        while self._more(RCVMORE):
            frames.append(self._sock.recv(zmq.NOBLOCK))
        if tuple(frames) == START_OF_STREAM:
            if self._started:
                raise PeerGone(
                    f"{self._what}: a new stream started before this one ended: its producer died "
                    "and another one (restarted at once?) attached; the stream is broken"
                )
            self._started = True
            self._presence.peer_state()  # a podipc producer holds its presence before it sends: seen
            return
        if not self._started:
            self._start_without_sos()
        if tuple(frames) == END_OF_STREAM:
            with contextlib.suppress(zmq.ZMQError):  # a producer gone already waits for nothing
                self._sock.send_multipart(END_OF_STREAM_ACK, zmq.NOBLOCK)
            self._finish()
            raise EndOfStream(f"{self._what}: the producer ended the stream")
        self.skipped += 1

    def _finish(self) -> None:
        self._release()

    def _close(self) -> None:
        self._finish()


class _SharedContext:
    """One zmq context (one I/O thread) per process for all its endpoints, terminated with the last.

    A second context would add a second I/O thread and about 10 us to every round trip;
    terminating with the last endpoint flushes what lingers (the end-of-stream ack) before exit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._owner_pid = 0
        self._users = 0

    def acquire(self) -> zmq.Context[zmq.Socket[bytes]]:
        """The process's context, created on first use (and anew in a forked child)."""
        with self._lock:
            if self._context is None or self._owner_pid != os.getpid():
                self._context = zmq.Context(io_threads=1)
                self._owner_pid = os.getpid()
                self._users = 0
            self._users += 1
            return self._context

    def release(self) -> None:
        """One endpoint fewer; the last one terminates the context (bounded by the sockets' linger)."""
        with self._lock:
            if self._owner_pid != os.getpid() or self._context is None:
                return
            self._users -= 1
            if self._users == 0:
                context, self._context = self._context, None
                context.term()


SHARED_CONTEXT = _SharedContext()


def _check_stale_socket_file(path: str) -> None:
    """libzmq unlinks whatever is at an ipc path before binding: allow that only for a dead socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ChannelUnavailable(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        _unlink_quietly(path)  # nobody listens: left by a killed consumer
        return
    finally:
        probe.close()
    raise ChannelUnavailable(f"{path} is a live socket of another process; a channel has one consumer")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
