"""shm:// - a single-producer single-consumer ring of variable-size messages in /dev/shm.

Address
    shm:///NAME   the ring is the file /dev/shm/NAME (what shm_open("/NAME") names)

    Query options (or keyword arguments):
      capacity=8MiB         ring bytes (consumer; the producer adopts the ring's); the pod's
                            /dev/shm is 64 MiB by default and shared by every container
      max_message_size=...  largest message in bytes; default capacity // 2; at most capacity - 8
      spin=0.0005           seconds to poll an empty (or full) ring before sleeping on a semaphore
                            (the first 5 us spin, the rest yields the CPU between polls)
      wait=30, mode=0600    common options (see podipc.channel)

Requires
    A writable /dev/shm shared by both containers (a pod's containers share it through
    the IPC namespace), large enough for the ring; the Python package posix_ipc (named
    semaphores for the wake-ups).

Semantics
    Boundaries and order kept, reliable, no copies on the way but the producer's write
    into the ring (recv_view() hands out the ring itself; loan()/commit() writes in place).
    Max message: the max_message_size option (default capacity // 2), fixed by the
    consumer when it creates the ring; the producer takes the ring's value on attach.
    The consumer creates the segment /dev/shm/NAME and the semaphores /NAME.data and
    /NAME.space (files sem.NAME.* in /dev/shm), all with `mode`, and unlinks them at the
    end of stream or when it closes. A segment left by a killed consumer (its lock is
    free) is replaced on open. Both sides hold a podipc.presence file, so a peer killed
    with SIGKILL is noticed (PeerGone) within a quarter of a second while blocked.
    A killed producer's presence file is removed by the consumer when it leaves. A
    consumer that leaves early makes the producer fail with PeerGone once the ring is
    full, or at close (the end of stream is never taken).
    Wire format and plain-script peers: docs/wire/shm.md.

Zero copy
    ShmConsumer.recv_view(timeout) returns a read-only memoryview into the ring; the
    next recv/recv_view/close releases it (later use raises ValueError) and hands the
    bytes back to the producer. ShmProducer.loan(size, timeout) returns a writable view
    of `size` bytes in the ring; commit(length=None) sends it as one message.

The package, one job per module
    layout     the wire layout: header and record encoding, checked decoding (fuzzed alone)
    fence      memory ordering: when this CPU needs a fence, and the fence
    waiter     Doorbell (a named semaphore) and Waiter, used by both sides: the one place
               a side spins (after take()'s few inline polls), sleeps and wakes its peer
    segment    the objects in /dev/shm: create, replace stale, attach, unlink; the mapping
    ring       RingWriter and RingReader: index arithmetic, fences, the hot paths; one
               receive path (RingReader.take) behind recv and recv_view
    options    the URL options and the ring geometry they give
    endpoints  ShmProducer and ShmConsumer: presence, attach/create, liveness, closing

Where what comes next goes (seams, not built yet)
    Shutdown from any thread (issue 11). Waking: Waiter gets interrupt(), which sets a
    flag its spin loop reads with the clock and its sleep loop reads every round, and
    rings the waiter's own doorbell (one store and a sem_post: safe from any thread or a
    signal handler), so a blocked call leaves with ChannelClosed at once; take()'s
    inline polls are bounded and need no check. Freeing: Segment.close() is the only
    unmap and the only close of the semaphores a sleeper may be blocked in (sem_close
    under a sleeping sem_timedwait is today's SIGSEGV), so it must run once no call is
    inside: the endpoint counts calls in, and the last one out frees. The endpoints'
    _teardown/_abort already do the protocol steps (end record, closed flag, unlink) and
    then Segment.close() last; `_reader`/`_writer` set to None is already the closed
    test of the hot paths, so none of this adds a check per message. A non-blocking
    attempt (timeout=0, try_recv) is take() stopping where it would call the waiter;
    threads sharing an endpoint need a call lock around write()/take().
    An awaitable wake-up (issue 12). Doorbell is the only thing that sleeps and rings.
    A doorbell with a file descriptor both containers can open (a FIFO in /dev/shm, or an
    abstract socket) replaces the semaphore behind the same ring()/sleep(); Waiter then
    gives fileno() and a poll (set the waiting word, fence, re-check, do not sleep) for
    selectors and podipc.aio, which then retry the non-blocking attempt. The waiting-word
    protocol, and with it the wire format, stay as they are.
    Batches (issue 13). RingWriter separates reserving and writing a record (_reserve)
    from publishing it (_publish): send_many writes records back to back and publishes
    the write index once (one fence, one wake check). recv_many loads the write index
    once, takes the records up to it with take()'s record check, and publishes the read
    index once.
    Broadcast, one writer and N readers (issue 14). Each reader owns a read-index word
    and a waiting word (a reader table, in a new layout version); RingWriter's write
    limit becomes the slowest reader's index + capacity (_wait_for_room waits for their
    minimum), it rings each reader whose waiting word is set, and each RingReader has
    its own Waiter and doorbell. Readers hand out views (take(in_place=True)), and a
    reader's release frees room only when it was the slowest.
"""

from __future__ import annotations

from podipc.transport import DEV_SHM_FIX, AddressForm, Capability, Example, MessageLimit, ObjectKind, Transport
from podipc.transports.shm.endpoints import ShmConsumer, ShmProducer
from podipc.transports.shm.options import (
    DEFAULT_CAPACITY,
    DEFAULT_SPIN_SECONDS,
    OPTIONS,
    availability,
    default_max_message_size,
    host_max_message_size,
)
from podipc.transports.shm.segment import (
    FIFO_KIND,
    SHM_DIRECTORY,
    availability_for,
    channel_objects,
    free_bytes,
    segment_path,
)

TRANSPORT = Transport(
    name="shm",
    title="shared-memory ring",
    schemes={"shm": AddressForm.NAME},
    producer="podipc.transports.shm:ShmProducer",
    consumer="podipc.transports.shm:ShmConsumer",
    examples=(Example("shm:///name", "shared-memory ring in /dev/shm"),),
    reliable=True,
    ordered=True,
    limit=MessageLimit(
        host_max_message_size,
        "half the default ring (capacity option)",
        f"raise the capacity option (or max_message_size) on both sides; the ring lives in /dev/shm: {DEV_SHM_FIX}",
        "half the ring's capacity",
    ),
    options=OPTIONS,
    capabilities=frozenset(
        {Capability.ZERO_COPY_RECEIVE, Capability.ZERO_COPY_SEND, Capability.PRESENCE_FILES, Capability.DATA_IN_DEV_SHM}
    ),
    availability=availability,
    unusable_fix=f"{DEV_SHM_FIX}; or open both sides with a smaller capacity= that fits /dev/shm",
    objects=(
        ObjectKind(
            "posix_shm",
            "POSIX shared-memory segment",
            "podipc.transports.shm.segment:remove_leftover_segment",
            "podipc.transports.shm.segment:leftover_segment_owner",
        ),
        ObjectKind(
            "posix_sem",
            "POSIX named semaphore",
            "podipc.transports.shm.segment:remove_leftover_semaphore",
            "podipc.transports.shm.segment:leftover_semaphore_owner",
        ),
        ObjectKind(
            FIFO_KIND,
            "wake-up FIFO of a shm ring",
            "podipc.transports.shm.segment:remove_leftover_fifo",
            "podipc.transports.shm.segment:leftover_fifo_owner",
        ),
    ),
    channel_objects=channel_objects,
    rank=60,
)


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SPIN_SECONDS",
    "OPTIONS",
    "SHM_DIRECTORY",
    "TRANSPORT",
    "ShmConsumer",
    "ShmProducer",
    "availability",
    "availability_for",
    "default_max_message_size",
    "free_bytes",
    "host_max_message_size",
    "segment_path",
]
