"""POSIX and SysV message queues used directly (posix_ipc, sysv_ipc): the baselines of mq:// and sysvmq://."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from podipc.address import sysv_key_from_name
from podipc.bench.peers.sockets import CLOSE_WAIT_SECONDS, RawTCP, missing_package, wait_for
from podipc.bench.subjects import (
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    Receiver,
    Sender,
)
from podipc.errors import EndOfStream
from podipc.proc import read_int

# --- POSIX message queue -----------------------------------------------------------


class PosixMQSender:
    """Opens the receiver's queue on the first send; an empty message ends the stream."""

    def __init__(self, name: str) -> None:
        self.name = "/" + name
        self.queue: Any = None
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS

    def _open(self) -> Any:
        import posix_ipc

        while True:
            try:
                self.queue = posix_ipc.MessageQueue(self.name, read=False)
            except posix_ipc.ExistentialError:
                wait_for(self.deadline, f"mq {self.name}")
                continue
            self.send = self.queue.send  # type: ignore[method-assign]
            return self.queue

    def send(self, data: Buffer) -> None:
        """Send one message (blocks while the queue is full)."""
        (self.queue or self._open()).send(data)

    def close(self) -> None:
        """Send the end marker, wait (bounded) until the queue drained, close."""
        queue = self.queue or self._open()
        queue.send(b"")
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while queue.current_messages and time.monotonic() < deadline:
            time.sleep(0.0005)
        queue.close()

    def abort(self) -> None:
        """Close without the end marker."""
        if self.queue is not None:
            self.queue.close()


class PosixMQReceiver:
    """Creates the queue at open and unlinks it at close."""

    def __init__(self, name: str, size: int) -> None:
        import posix_ipc

        self.queue = posix_ipc.MessageQueue(
            "/" + name,
            posix_ipc.O_CREX,
            mode=0o600,
            # the kernel limits, as mq:// uses them by default, so both queues are alike
            max_messages=read_int("/proc/sys/fs/mqueue/msg_max") or 10,
            max_message_size=max(size, read_int("/proc/sys/fs/mqueue/msgsize_max") or size),
        )
        receive = self.queue.receive

        def recv() -> bytes:
            data: bytes = receive()[0]
            if not data:
                raise EndOfStream("mq: end marker")
            return data

        self.recv = recv
        self.busy_error = posix_ipc.BusyError

    def idle(self, seconds: float) -> None:
        """Wait for a message that should not come."""
        try:
            self.queue.receive(seconds)
        except self.busy_error:
            return
        raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Close and unlink the queue."""
        self.queue.close()
        with contextlib.suppress(Exception):
            self.queue.unlink()


class RawPosixMQ(RawTCP):
    """posix_ipc.MessageQueue used directly: the raw baseline of mq://."""

    name, baseline_of = "raw-posix-mq", "mq"

    def availability(self) -> str | None:
        """posix_ipc and /dev/mqueue support."""
        return missing_package("posix_ipc", "posix_ipc") or (
            None if os.path.exists("/proc/sys/fs/mqueue/msgsize_max") else "no POSIX message queues here"
        )

    def size_problem(self, size: int) -> str | None:
        """At most /proc/sys/fs/mqueue/msgsize_max bytes."""
        limit = read_int("/proc/sys/fs/mqueue/msgsize_max")
        if limit is not None and size > limit:
            return f"{size} bytes > /proc/sys/fs/mqueue/msgsize_max {limit}"
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A queue name per link."""
        return {key: place.name(key) + "r" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Open the queue on the first send."""
        return PosixMQSender(resources[key])

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the queue now."""
        return PosixMQReceiver(resources[key], size)

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Unlink queues left by a failed cell."""
        import posix_ipc

        for name in resources.values():
            with contextlib.suppress(posix_ipc.Error):
                posix_ipc.unlink_message_queue("/" + name)


# --- SysV message queue ------------------------------------------------------------

SYSV_DATA_TYPE, SYSV_END_TYPE = 1, 2
SYSV_MSGMAX = read_int("/proc/sys/kernel/msgmax") or 8192
"""sysv_ipc receives into a buffer of max_message_size bytes (default 2048): use the kernel's limit."""


class SysVSender:
    """Attaches to the receiver's queue on the first send; a message of type 2 ends the stream."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.queue: Any = None
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS

    def _open(self) -> Any:
        import sysv_ipc

        while True:
            try:
                self.queue = sysv_ipc.MessageQueue(self.key, max_message_size=SYSV_MSGMAX)
            except sysv_ipc.ExistentialError:
                wait_for(self.deadline, f"sysvmq {self.key}")
                continue
            self.send = self.queue.send  # type: ignore[method-assign]
            return self.queue

    def send(self, data: Buffer) -> None:
        """Send one message of type 1 (blocks while the queue is full)."""
        (self.queue or self._open()).send(data)

    def close(self) -> None:
        """Send the end marker, wait (bounded) until the queue drained."""
        import sysv_ipc

        queue = self.queue or self._open()
        queue.send(b"", type=SYSV_END_TYPE)
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        try:
            while queue.current_messages and time.monotonic() < deadline:
                time.sleep(0.0005)
        except sysv_ipc.ExistentialError:
            pass

    def abort(self) -> None:
        """Nothing to free: the receiver owns the queue."""


class SysVReceiver:
    """Creates the queue at open and removes it at close."""

    def __init__(self, key: int) -> None:
        import sysv_ipc

        self.queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=SYSV_MSGMAX)
        receive = self.queue.receive

        def recv() -> bytes:
            data, kind = receive()
            if kind == SYSV_END_TYPE:
                raise EndOfStream("sysvmq: end marker")
            return data  # type: ignore[no-any-return]

        self.recv = recv
        self.busy_error = sysv_ipc.BusyError

    def idle(self, seconds: float) -> None:
        """Poll without blocking for `seconds` (sysv_ipc has no receive timeout), 1 ms apart."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.queue.receive(block=False)
            except self.busy_error:
                time.sleep(0.001)
                continue
            raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Remove the queue."""
        with contextlib.suppress(Exception):
            self.queue.remove()


class RawSysVMQ(RawTCP):
    """sysv_ipc.MessageQueue used directly: the raw baseline of sysvmq://."""

    name, baseline_of = "raw-sysv-mq", "sysvmq"

    def availability(self) -> str | None:
        """sysv_ipc installed."""
        return missing_package("sysv_ipc", "sysv_ipc")

    def size_problem(self, size: int) -> str | None:
        """At most kernel.msgmax bytes per message."""
        limit = read_int("/proc/sys/kernel/msgmax")
        if limit is not None and size > limit:
            return f"{size} bytes > /proc/sys/kernel/msgmax {limit}"
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A queue key per link."""
        return {key: str(sysv_key_from_name(place.name(key) + "r")) for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Attach on the first send."""
        return SysVSender(int(resources[key]))

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the queue now."""
        return SysVReceiver(int(resources[key]))

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Remove queues left by a failed cell."""
        import sysv_ipc

        for key in resources.values():
            with contextlib.suppress(sysv_ipc.Error):
                sysv_ipc.MessageQueue(int(key)).remove()
