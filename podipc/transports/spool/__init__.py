"""file:// — a stream of messages in a spool directory on a shared emptyDir: survives container restarts.

Address
    file:///ABSOLUTE/DIRECTORY[?option=value&...]

    The directory is the channel: both containers mount the same emptyDir (at any
    mount path; nothing in the spool depends on the path). Query options:

    max_message_size  largest message in bytes (default 64 MiB, at most 4 GiB - 1); a
                      consumer skips and counts (Consumer.skipped) records larger than its own
    depth             messages in the spool at most before send() waits (default 1024)
    max_bytes         bytes of records in the spool at most before send() waits (default
                      256 MiB; one record larger than this still goes into an empty spool)
    segment_size      bytes per segment file before the producer starts the next (default 1 MiB)
    sync              always | batch | none: what a crash of the node (power loss) keeps
                      (default batch; see Durability)
    sync_delay        sync=batch: seconds at most from a send to its fsync (default 0.05)
    restart_wait      seconds a side waits for a restarted peer before PeerGone (default 0)
    wait, mode        as on every channel (mode applies to files; the directory, when
                      podipc creates it, gets mode plus the matching x bits)

Requires
    Nothing but a directory both sides can write (an emptyDir, medium Memory or disk).

Semantics
    Wire format (docs/wire/file.md): the producer appends records (a 20-byte header with
    a CRC-32, then the message) to segment files ``podipc.seg.<first sequence>``; a full
    segment ends with a NEXT record and the stream goes on in the next one; an END record
    ends the stream. The consumer keeps its position (next sequence, segment, offset) in
    ``podipc.position``, two checksummed slots written alternately through a shared
    mapping, and removes a segment once it has taken it whole.

    Reliability: the stream belongs to the spool, not to a process. A process crash (kill
    -9, OOM) of either side loses nothing whose send() returned, at every sync level: a
    restarted producer finds the end of the stream in the last segment (``resumed_at`` =
    messages already in the stream; a record torn by the crash is cut off), and a
    restarted consumer continues after its last committed position. A message is
    committed inside recv() before it is returned: a consumer killed between recv() calls
    loses and repeats nothing (exactly once); killed inside recv() after the commit, it
    loses that one message (at most once).

    Durability (a crash of the node, a power loss): sync=always fdatasyncs every record
    before send() returns (and the directory when a segment is created), so nothing sent
    is lost; sync=batch (the default) fdatasyncs on a helper thread at most sync_delay
    seconds after a send, so a power loss loses at most the messages of the last
    sync_delay (plus the time the volume takes to sync); sync=none leaves it to the
    kernel's writeback (~30 s). The consumer's position follows the same level; a
    position that a power loss set back delivers again what it had taken since, a
    position ahead of what survived skips the records it already took when the producer
    sends them again from its resumed_at. On a memory-backed emptyDir a node crash loses
    the volume anyway.

    Garbage and other users: the directory and every file of the spool are opened without
    following links and without blocking, and must belong to this user (or, with mode=0660,
    to a common group) and grant nothing to other users; anything else is refused with
    ChannelUnavailable naming its owner (a directory every user may write in too). A
    record whose checksum fails is never delivered: at the end of a segment it is the torn
    tail of a crash (waited on until the producer resumes and cuts it off); elsewhere, once
    the producer lived 2 s without repairing it, ProtocolError. A gap in the sequence is a
    ProtocolError. Names the spool does not use are never touched.

    Readiness: fileno() is an epoll descriptor over an inotify watch of the spool
    directory (inotify sees writes from every container of the pod: they share the
    kernel) and an eventfd the peer monitor kicks when the peer is lost; no helper
    thread. Where inotify is unavailable (fs.inotify.max_user_instances reached) a side
    polls at a backoff from 1 to 50 ms. Endpoints are thread-safe (one call at a time
    per side, as on every channel).

    Liveness: podipc.presence files in the spool directory itself (no /dev/shm needed),
    watched by the process's peer monitor: a side that needs its peer (empty spool, full
    spool, the end of stream not yet taken) raises PeerGone within about 0.2 s of its death,
    unless restart_wait allows a restarted peer to take over. Messages already in the
    spool are still delivered after the producer died.

    Who creates and who removes: either side creates the directory when missing (and
    removes it again at a clean end); the producer creates segments; the consumer creates
    its position file, removes segments it has taken and, at the end of stream, every
    file of the stream, the segment holding the END record last (the producer's ack).
    Files of an unfinished stream stay in the spool: that is what lets a restarted side
    resume it.

Modules: `wire` (the format), `notify` (inotify readiness), `side` (what both sides share),
`producer`, `consumer`; this one holds the descriptor.
"""

from __future__ import annotations

from podipc.transport import AddressForm, Capability, Example, Temporaries, Transport, option_limit
from podipc.transports.spool.side import SPOOL_OPTIONS
from podipc.transports.spool.wire import DEFAULT_MAX_MESSAGE_SIZE, PART_PREFIX, PRESENCE_TOKEN


def availability() -> str | None:
    """file:// works wherever a directory can be written: always usable."""
    return None


def host_max_message_size() -> int:
    """The default max_message_size (64 MiB); file:// has no kernel limit."""
    return DEFAULT_MAX_MESSAGE_SIZE


TRANSPORT = Transport(
    name="spool",
    title="spool directory",
    schemes={"file": AddressForm.DIRECTORY},
    producer="podipc.transports.spool.producer:SpoolProducer",
    consumer="podipc.transports.spool.consumer:SpoolConsumer",
    examples=(Example("file:///shared/spool", "spool directory on an emptyDir", "survives container restarts"),),
    reliable=True,
    ordered=True,
    limit=option_limit(DEFAULT_MAX_MESSAGE_SIZE),
    options=SPOOL_OPTIONS,
    capabilities=frozenset({Capability.RESUMABLE, Capability.READINESS_FD}),
    availability=availability,
    temporaries=Temporaries(presence_token=PRESENCE_TOKEN, role="producer", prefix=PART_PREFIX),
    rank=70,
)
