"""Shared memory with no podipc layer: a hand-written busy-poll ring (the baseline of shm://) and iceoryx2."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from podipc.bench.peers.sockets import CLOSE_WAIT_SECONDS, RawTCP, missing_package, wait_for
from podipc.bench.ring import SPIN_BEFORE_YIELD, RingReceiver, RingSender, ring_capacity_for
from podipc.bench.subjects import (
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    Receiver,
    Sender,
)
from podipc.errors import EndOfStream

# --- busy-poll ring -----------------------------------------------------------------


class RawRing(RawTCP):
    """A hand-written busy-poll mmap ring in /dev/shm: the raw baseline of shm://."""

    name, zero_copy_receive, baseline_of = "raw-ring", True, "shm"
    shared_places = frozenset({"dev_shm"})

    def availability(self) -> str | None:
        """Needs /dev/shm."""
        return None if os.path.isdir("/dev/shm") else "no /dev/shm here"

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A ring file name per link."""
        return {key: place.name(key) + ".ring" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Map the ring on the first send."""
        return RingSender(resources[key], PEER_WAIT_SECONDS)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Create the ring now."""
        return RingReceiver(resources[key], ring_capacity_for(size))

    def cleanup(self, resources: Mapping[str, str]) -> None:
        """Remove ring files left by a failed cell."""
        for name in resources.values():
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")


# --- iceoryx2 -----------------------------------------------------------------------

ICEORYX_BUFFER = 8
_ICEORYX_NODE: list[Any] = []


def _iceoryx_service(name: str, subscribers: int = 1) -> Any:
    """The publish-subscribe service `name` (one publisher, `subscribers` subscribers), opened or created."""
    import iceoryx2 as iox2

    if not _ICEORYX_NODE:
        iox2.set_log_level(iox2.LogLevel.Error)
        _ICEORYX_NODE.append(iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc))
    return (
        _ICEORYX_NODE[0]
        .service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .enable_safe_overflow(False)
        .subscriber_max_buffer_size(ICEORYX_BUFFER)
        .history_size(0)
        .max_publishers(1)
        .max_subscribers(subscribers)
        .open_or_create()
    )


class IceoryxSender:
    """A publisher that waits for its subscriber, copies each message into a loaned sample, and
    retries until delivered (no loss). A zero-length sample ends the stream. With `subscribers`
    above 1 the first send waits for all of them (a broadcast: every sample goes to each)."""

    def __init__(self, name: str, size: int, subscribers: int = 1) -> None:
        import iceoryx2 as iox2

        self.service = _iceoryx_service(name, subscribers)
        self.subscribers = subscribers
        self.publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(max(size, 1))
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.connected = False
        self.deadline = time.monotonic() + PEER_WAIT_SECONDS
        self.loan = self.publisher.loan_slice_uninit

    def _connect(self) -> None:
        while self.service.dynamic_config.number_of_subscribers < self.subscribers:
            wait_for(self.deadline, "iceoryx2 subscriber")
        self.publisher.update_connections()
        self.connected = True

    def send(self, data: Buffer) -> None:
        """Loan a sample, copy the message in, send it."""
        if not self.connected:
            self._connect()
        length = len(data) if type(data) is not memoryview else data.nbytes
        sample = self.loan(length)
        ctypes.memmove(sample.payload_ptr, _source(data), length)
        sample.assume_init().send()

    def close(self) -> None:
        """Send the end sample and wait (bounded) for the subscriber to leave."""
        if not self.connected:
            self._connect()
        self.loan(0).assume_init().send()
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while self.service.dynamic_config.number_of_subscribers and time.monotonic() < deadline:
            time.sleep(0.0005)
        self.abort()

    def abort(self) -> None:
        """Drop the publisher."""
        self.publisher.delete()


def _source(data: Buffer) -> Any:
    """What ctypes.memmove can copy from without an extra copy: bytes as they are, else the buffer's address."""
    if type(data) is bytes:
        return data
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return bytes(data)


class IceoryxReceiver:
    """A subscriber polled in a busy loop (the Python API has no blocking receive without an event service)."""

    def __init__(self, name: str, subscribers: int = 1) -> None:
        self.service = _iceoryx_service(name, subscribers)
        self.subscriber = self.service.subscriber_builder().buffer_size(ICEORYX_BUFFER).create()
        receive = self.subscriber.receive
        sched_yield = os.sched_yield
        holder: list[Any] = [None]

        def recv() -> memoryview:
            holder[0] = None
            sample = receive()
            spins = 0
            while sample is None:
                spins += 1
                if spins > SPIN_BEFORE_YIELD:
                    sched_yield()
                sample = receive()
            length = sample.header.number_of_elements
            if not length:
                raise EndOfStream("iceoryx2: end sample")
            holder[0] = sample
            return memoryview((ctypes.c_char * length).from_address(sample.payload_ptr)).cast("B")

        self.recv = recv
        self.holder = holder

    def idle(self, seconds: float) -> None:
        """Poll for a sample that should not come."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.subscriber.has_samples():
                raise RuntimeError("a message arrived during the idle probe")

    def close(self) -> None:
        """Drop the subscriber."""
        self.holder[0] = None
        self.subscriber.delete()


class Iceoryx2(RawTCP):
    """iceoryx2 publish-subscribe over shared memory (Slice[c_uint8], busy-polled)."""

    name, kind, zero_copy_receive = "iceoryx2", "library", True
    baseline_of = None  # a library doing shm://'s job differently, not its raw primitive
    shared_places = frozenset({"dev_shm", "iceoryx2"})

    def availability(self) -> str | None:
        """iceoryx2 installed."""
        return missing_package("iceoryx2")

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """A service name per link."""
        return {key: place.name(key) + "-iox" for key in ("a", "b")}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """A publisher."""
        return IceoryxSender(resources[key], size)

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """A subscriber."""
        return IceoryxReceiver(resources[key])
