"""Run a producer and a consumer in separate processes and report what each saw.

Payloads are a pure function of (seed, index, size) and carry their index, so the
consumer checks order as it goes and both sides digest exactly the same bytes.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import multiprocessing
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import podipc
from podipc.address import parse_address
from podipc.transport import AddressForm, schemes, transport_for

ABSTRACT_SUFFIX = "-abstract"
"""A scheme with this suffix (unix-abstract) is its abstract socket form: unix://@name."""


def _with_abstract_variants() -> tuple[str, ...]:
    listed: list[str] = []
    for scheme in schemes():
        listed.append(scheme)
        if transport_for(scheme).schemes[scheme] is AddressForm.SOCKET_PATH_OR_ABSTRACT:
            listed.append(scheme + ABSTRACT_SUFFIX)
    return tuple(listed)


SCHEMES = _with_abstract_variants()
"""Every scheme (from the transports' descriptors), with unix-abstract after unix."""
RELIABLE = tuple(scheme for scheme in SCHEMES if transport_for(scheme.removesuffix(ABSTRACT_SUFFIX)).reliable)


def creates_no_file(scheme: str) -> bool:
    """True for a socket the kernel alone holds (tcp, unix-abstract): no file, IPC object or presence file."""
    if scheme.endswith(ABSTRACT_SUFFIX):
        return True
    transport = transport_for(scheme)
    return transport.schemes[scheme] is AddressForm.HOST_PORT and not transport.needs_dev_shm


SOCKETS_ONLY = tuple(scheme for scheme in SCHEMES if creates_no_file(scheme))
"""The schemes whose channels leave nothing to clean and have no permissions (tcp, unix-abstract)."""
PORTS = itertools.count(18000 + (os.getpid() % 200) * 10)
NAMES = itertools.count()
INDEX = struct.Struct(">Q")
BLOCK = random.Random(1).randbytes(1 << 20)
UDP_MESSAGES_PER_SECOND = 4000
CONTEXT = multiprocessing.get_context("fork")


def short_directory() -> str:
    """A fresh directory with a short path (Unix socket paths hold at most 107 bytes), removed at exit."""
    path = tempfile.mkdtemp(prefix="pi", dir="/tmp")
    atexit.register(shutil.rmtree, path, True)
    return path


def url_for(scheme: str, **options: object) -> str:
    """A fresh, unique URL of a scheme (unix-abstract: unix://@name), with query options."""
    unique = f"podipc-contract-{os.getpid()}-{next(NAMES)}"
    if scheme.endswith(ABSTRACT_SUFFIX):
        base = f"{scheme.removesuffix(ABSTRACT_SUFFIX)}://@{unique}"
    else:
        base = transport_for(scheme).fresh_url(
            scheme, unique, lambda: os.path.join(short_directory(), "c"), lambda protocol: next(PORTS)
        )
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"{base}?{query}" if query else base


def payload(index: int, size: int) -> bytes:
    """Message `index` of `size` bytes: its index (when it fits) then bytes of a fixed random block."""
    if size < INDEX.size:
        return INDEX.pack(index)[-size:] if size else b""
    body = size - INDEX.size
    offset = index % 997
    if offset + body <= len(BLOCK):
        return INDEX.pack(index) + BLOCK[offset : offset + body]
    repeats = body // len(BLOCK) + 1
    return INDEX.pack(index) + (BLOCK * repeats)[:body]


def mixed_sizes(count: int, max_size: int, seed: int = 0) -> list[int]:
    """Sizes from 0 to max_size: mostly small, some medium, a few large, 0 and max_size several times."""
    generator = random.Random(seed)
    sizes = []
    for _ in range(count):
        draw = generator.random()
        if draw < 0.70:
            sizes.append(generator.randint(0, min(max_size, 256)))
        elif draw < 0.99:
            sizes.append(generator.randint(0, min(max_size, 65536)))
        else:
            sizes.append(generator.randint(0, min(max_size, 1 << 20)))
    for position in (0, 1, count // 2, count - 1):
        sizes[position] = 0 if position % 2 == 0 else max_size
    sizes[2] = max_size
    return sizes


@dataclass
class SideResult:
    """What one side reported: ok or the error it raised, and what it sent or received."""

    ok: bool
    messages: int = 0
    bytes: int = 0
    sha256: str = ""
    error: str = ""
    error_type: str = ""
    lost: int = 0
    out_of_order: int = 0
    seconds: float = 0.0
    peak_rss_kib: int = 0


def peak_rss() -> int:
    """This process's peak resident memory in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_producer(url: str, sizes: Sequence[int], results: Any, pace: float, close_timeout: float | None) -> None:
    """Send one message per size, then close; put a SideResult on `results`."""
    digest, count, total = hashlib.sha256(), 0, 0
    started = time.monotonic()
    try:
        with podipc.producer(url) as channel:
            for index, size in enumerate(sizes):
                message = payload(index, size)
                channel.send(message)
                digest.update(message)
                count += 1
                total += size
                if pace:
                    time.sleep(pace)
            channel.close(close_timeout)
        results.put(
            SideResult(
                True, count, total, digest.hexdigest(), seconds=time.monotonic() - started, peak_rss_kib=peak_rss()
            )
        )
    except podipc.PodIPCError as error:
        results.put(SideResult(False, count, total, digest.hexdigest(), str(error), type(error).__name__))


def run_consumer(url: str, results: Any, recv_timeout: float | None) -> None:
    """Receive until the end of stream, checking order; put a SideResult on `results`."""
    digest, count, total, out_of_order = hashlib.sha256(), 0, 0, 0
    started = time.monotonic()
    channel = None
    try:
        with podipc.consumer(url) as channel:
            while True:
                try:
                    message = channel.recv(recv_timeout)
                except podipc.EndOfStream:
                    break
                if len(message) >= INDEX.size and INDEX.unpack_from(message)[0] < count:
                    out_of_order += 1
                digest.update(message)
                count += 1
                total += len(message)
        results.put(
            SideResult(
                True,
                count,
                total,
                digest.hexdigest(),
                lost=channel.lost,
                out_of_order=out_of_order,
                seconds=time.monotonic() - started,
                peak_rss_kib=peak_rss(),
            )
        )
    except podipc.PodIPCError as error:
        lost = channel.lost if channel is not None else 0
        results.put(SideResult(False, count, total, digest.hexdigest(), str(error), type(error).__name__, lost=lost))


@dataclass
class Pair:
    """A producer process and a consumer process on one URL, started in a chosen order."""

    url: str
    sizes: Sequence[int]
    consumer_first: bool = True
    delay: float = 0.3
    pace: float = 0.0
    recv_timeout: float | None = None
    close_timeout: float | None = None

    def run(self, timeout: float = 180) -> tuple[SideResult, SideResult]:
        """Run both sides to the end; return (producer result, consumer result)."""
        producer_results, consumer_results = CONTEXT.Queue(), CONTEXT.Queue()
        producer = CONTEXT.Process(
            target=run_producer, args=(self.url, self.sizes, producer_results, self.pace, self.close_timeout)
        )
        consumer = CONTEXT.Process(target=run_consumer, args=(self.url, consumer_results, self.recv_timeout))
        first, second = (consumer, producer) if self.consumer_first else (producer, consumer)
        first.start()
        time.sleep(self.delay)
        second.start()
        try:
            produced = producer_results.get(timeout=timeout)
            consumed = consumer_results.get(timeout=timeout)
        finally:
            for process in (producer, consumer):
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
        return produced, consumed


def pace_for(scheme: str) -> float:
    """Seconds between sends: only UDP, which has no flow control, is paced."""
    return 1.0 / UDP_MESSAGES_PER_SECOND if scheme == "udp" else 0.0


def object_names(url: str) -> list[str]:
    """Names that identify a channel's IPC objects: its token and, for named channels, its name."""
    address = parse_address(url)
    return [name for name in (address.token, address.name) if name]


def leftovers(url: str) -> list[str]:
    """IPC objects of this channel still present: /dev/shm and /dev/mqueue entries, SysV queues, files."""
    address = parse_address(url)
    names = object_names(url)
    found = []
    for directory in ("/dev/shm", "/dev/mqueue"):
        if os.path.isdir(directory):
            found += [f"{directory}/{entry}" for entry in os.listdir(directory) if any(n in entry for n in names)]
    if address.scheme == "sysvmq":
        listing = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=False).stdout
        if re.search(rf"0x{address.key:08x}\s", listing):
            found.append(f"SysV queue 0x{address.key:08x}")
    if address.path and os.path.exists(address.path):
        if os.path.isdir(address.path):
            found += [f"{address.path}/{entry}" for entry in os.listdir(address.path)]
        else:
            found.append(address.path)
    return found


def wait_until(predicate: Any, timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
