"""The same jobs with no podipc layer: raw primitives and the libraries people would use instead.

Each peer is written the way a careful person would by hand: length-prefixed frames
and MSG_WAITALL on stream sockets, one datagram per message on UDP, posix_ipc and
sysv_ipc queues used directly, a busy-poll mmap ring (podipc.bench.ring), pyzmq
PUSH/PULL (and zmq.asyncio PULL for `--api async`), multiprocessing Pipe and Queue,
faster-fifo, and iceoryx2 publish-subscribe and request-response (`iceoryx2-rpc`, latency cells only).
An empty message (or the peer's own marker) ends a stream, so bench messages are
never empty (they carry an 8-byte sequence number).

Optional peers (faster-fifo, iceoryx2: `pip install 'podipc[peers]'`) that are not
installed are listed as skipped with the reason. multiprocessing-based peers need a
parent and child process and are skipped across containers (pod mode).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from podipc.bench.peers.libraries import FasterFifo, LocalSubject, MPPipe, MPQueue, PyZMQ, PyZMQAsyncio
from podipc.bench.peers.queues import RawPosixMQ, RawSysVMQ
from podipc.bench.peers.shared_memory import Iceoryx2, Iceoryx2RequestResponse, RawRing
from podipc.bench.peers.sockets import RawTCP, RawUDP, RawUnix
from podipc.bench.subjects import Subject
from podipc.errors import Timeout


def peer_subjects() -> list[Subject]:
    """Every peer, in report order."""
    return [
        RawTCP(),
        RawUDP(),
        RawUnix(),
        RawPosixMQ(),
        RawSysVMQ(),
        RawRing(),
        PyZMQ("tcp"),
        PyZMQ("ipc"),
        PyZMQAsyncio("tcp"),
        PyZMQAsyncio("ipc"),
        Iceoryx2(),
        Iceoryx2RequestResponse(),
        MPPipe(),
        MPQueue(),
        FasterFifo(),
    ]


def local_context() -> Any:
    """The multiprocessing context used for parent/child peers."""
    return multiprocessing.get_context("forkserver")


__all__ = ["LocalSubject", "Timeout", "local_context", "peer_subjects"]
