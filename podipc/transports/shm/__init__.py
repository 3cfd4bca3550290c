"""shm:// - a single-producer single-consumer ring of variable-size messages in /dev/shm.

Address
    shm:///NAME   the ring is the file /dev/shm/NAME (what shm_open("/NAME") names)

    Query options (or keyword arguments):
      capacity=8MiB         ring bytes (consumer; the producer adopts the ring's); the pod's
                            /dev/shm is 64 MiB by default and shared by every container
      max_message_size=...  largest message in bytes; default capacity // 2; at most
                            capacity - 8 and 4 GiB - 1 (a record's length is a u32)
      spin=0.0005           seconds to poll an empty (or full) ring before waiting on a FIFO
                            (the first 5 us spin, the rest yields the CPU between polls)
      wait=30, mode=0600    common options (see podipc.options); wait=none waits forever
      pattern=pair          pair (this docstring) or broadcast: one producer, N subscribers each
                            get every message (podipc.transports.shm.broadcast says how)
      subscribers=N, slow=wait|drop   broadcast only: the ring's subscriber slots (the producer
                            waits for N before its first send); wait for a slow subscriber or
                            overwrite it, the subscriber counting its loss

Requires
    A writable /dev/shm shared by both containers (a pod's containers share it through
    the IPC namespace), large enough for the ring; the Python package posix_ipc (named
    semaphores, which plain peers may sleep on).

Semantics
    Boundaries and order kept, reliable, no copies on the way but the producer's write
    into the ring (recv_view() hands out the ring itself; loan()/commit() writes in place).
    Max message: the max_message_size option (default capacity // 2), fixed by the
    consumer when it creates the ring; the producer takes the ring's value on attach and
    checks each message against it (MessageTooLarge names the ring).
    The consumer creates the segment /dev/shm/NAME, the semaphores /NAME.data and
    /NAME.space (files sem.NAME.* in /dev/shm) and the wake-up FIFOs
    /dev/shm/podipc.wake.TOKEN.data and .space, all with `mode`, and unlinks them at the
    end of stream or when it closes. Objects left by a killed consumer (its lock is free)
    are replaced on open. Both sides hold a podipc.presence file; the process's peer
    monitor (presence.watch) sees a peer killed with SIGKILL within about 0.2 s, while
    blocked and while sending at full speed: a consumer then takes what is in the ring and
    raises PeerGone, a producer raises PeerGone at its next call. A consumer that leaves
    early makes the producer fail with PeerGone the same way.
    Trust: every object found instead of created (the peer's presence file, the segment,
    semaphores, FIFOs) must be this user's, or with mode=0660 a common group's, and of
    the right kind; otherwise ChannelUnavailable names its owner and nothing of it is
    read, written or removed. A segment truncated under a side is a ProtocolError where
    the side can tell (attach, after each wait, the monitor's check every 0.2 s); a side
    touching the ring in between dies with SIGBUS (docs/wire/shm.md says what remains).
    Wire format and plain-script peers: docs/wire/shm.md.

Lifecycle (the endpoint contract of podipc.endpoint)
    Threads: send/loan/commit (producer) and recv/recv_view (consumer) take the side's
    call gate, so an endpoint shared by threads writes and reads the single-producer
    ring one call at a time: each message whole and once, in order per thread.
    Shutdown from anywhere: close()/abort() from any thread, a signal handler or a loop
    callback wakes every blocked call within milliseconds (a spinning wait sees an alert,
    a waiting one its waker); the mapping, semaphores and FIFOs are freed only once no
    call is inside. Signals: a blocked call waits in poll(), so a handler that only sets a
    flag leaves it waiting, and one that raises (sys.exit) gets through at once.
    timeout=0 tries once; wait=None waits for the peer forever; fork: an inherited
    endpoint raises ChannelClosed and the child closes only its copies (its copy of the
    segment's descriptor above all, whose lock says the consumer lives).
    Readiness: the side's FIFO. An attempt that finds no message (no room) stores 2 in
    the side's waiting word, and the peer writes the FIFO once it moves: fileno(),
    poll(), podipc.wait() and podipc.aio wait on it with no helper thread. The peer makes
    no system call while this side is not waiting. Waits are bounded (at most 0.25 s), so
    a wake-up lost to a race, or a plain peer that only posts the semaphore, costs at most
    that; a selector on fileno() should use a timeout for the same reason.

Zero copy
    ShmConsumer.recv_view(timeout) returns a read-only memoryview into the ring; the
    next recv/recv_view/close releases it (later use raises ValueError) and hands the
    bytes back to the producer. ShmProducer.loan(size, timeout) returns a writable view
    of `size` bytes in the ring; commit(length=None) sends it as one message.

The package, one job per module
    layout     the wire layout: header and record encoding, checked decoding (fuzzed alone)
    fence      memory ordering: when this CPU needs a fence, and the fence
    waiter     Doorbell (a plain peer's semaphore), WakeFifo, and Waiter, used by both
               sides: the one place a side spins, arms its FIFO, waits and wakes its peer
    segment    the objects in /dev/shm: trust, create, replace stale, attach, size check,
               unlink; the mapping
    ring       RingWriter and RingReader: index arithmetic, fences, the hot paths, the
               non-blocking attempts; one blocking receive path (RingReader.take)
    options    the URL options and the ring geometry they give
    endpoints  ShmProducer and ShmConsumer: the call gate on the hot paths, presence and
               the peer monitor, attach/create, readiness, closing and freeing
    broadcast_layout, broadcast   pattern=broadcast: the version-2 header with a slot per
               subscriber; BroadcastProducer (creates the ring) and BroadcastSubscriber (claims
               a slot), which ShmProducer/ShmConsumer return for pattern=broadcast

Where what comes next goes (seams, not built yet)
    Batches (issue 13). RingWriter separates reserving and writing a record (_reserve)
    from publishing it (_publish): send_many writes records back to back and publishes
    the write index once (one fence, one wake check). recv_many loads the write index
    once, takes the records up to it with take()'s record check, and publishes the read
    index once.
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
        {
            Capability.ZERO_COPY_RECEIVE,
            Capability.ZERO_COPY_SEND,
            Capability.PRESENCE_FILES,
            Capability.DATA_IN_DEV_SHM,
            Capability.READINESS_FD,
        }
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
