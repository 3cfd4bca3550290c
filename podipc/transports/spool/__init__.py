"""file:// — messages as files in a spool directory on a shared emptyDir.

Address
    file:///ABSOLUTE/DIRECTORY[?option=value&...]

    The directory is the channel: both containers mount the same emptyDir (at any
    mount path; nothing in the spool depends on the path). Query options:

    max_message_size  largest message in bytes (default 64 MiB); a consumer skips and
                      counts (Consumer.skipped) message files larger than its own limit
    depth             messages in the spool at most before send() waits (default 1024)
    max_bytes         bytes of messages in the spool at most before send() waits
                      (default 256 MiB; one message larger than this is still written
                      into an empty spool)
    restart_wait      seconds a side waits for a restarted peer before PeerGone (default 0)
    fsync             fsync every message file and the directory (default off)
    wait, mode        as on every channel (mode applies to files; the directory, when
                      podipc creates it, gets mode plus the matching x bits)

Requires
    Nothing but a directory both sides can write (an emptyDir, medium Memory or disk).

Semantics
    Boundaries: one message = one file, so boundaries and order are kept; a zero-length
    file is a zero-length message. Every message file is written under a temporary name
    and renamed into place, so a consumer never sees half a message.

    Wire format (docs/wire/file.md): ``podipc.msg.<20-digit sequence>`` holds message
    number <sequence> (0-based) and nothing else; ``podipc.end.<N>`` (empty) ends a
    stream of N messages; ``podipc.done.<sequence>`` is the last committed message (the
    consumer renames a message file to it, then unlinks the previous one);
    ``podipc.part.*`` are temporaries; ``podipc.presence.spool.*`` are the liveness
    files of podipc.presence.

    Reliability: the stream belongs to the spool, not to a process. A restarted producer
    finds the next sequence number in the spool (``resumed_at`` = messages already in
    the stream) and removes half-written temporaries; a restarted consumer continues
    after its last committed message. A message is committed (renamed to done) inside
    recv() before it is returned: a consumer killed between recv() calls loses and
    repeats nothing (exactly once); killed inside recv() after the commit, it loses
    that one message (at most once). With fsync off (the default) the spool survives
    container restarts, not a node crash — like the emptyDir itself.

    Garbage: a message file larger than max_message_size, not a regular file, a symlink,
    or with a malformed ``podipc.msg.*``/``done``/``end`` name is skipped, removed and
    counted in Consumer.skipped; other names are never touched; a gap before the end marker raises ProtocolError. Sizes are taken
    from fstat and checked before a byte is read.

    Liveness: podipc.presence files in the spool directory itself (no /dev/shm needed).
    A side that saw its peer alive raises PeerGone within a second of its death when it
    has to wait for it (empty or full spool, or the end of stream not yet taken), unless
    restart_wait allows a restarted peer to take over. Messages already in the spool are
    still delivered after the producer died.

    Max message: 64 MiB by default, this channel's own option (no kernel limit applies).

    Who creates and who removes: either side creates the directory when missing (and
    removes it again at a clean end); the producer creates message files and the end
    marker; the consumer commits and removes them, and at the end of stream removes
    every spool file (the directory stays if it existed before). Files of an unfinished
    stream stay in the spool: that is what lets a restarted side resume it.

Modules: `wire` (file names and reading a message file), `side` (what both sides
share: the directory, backoff, the peer's liveness, the options), `producer`,
`consumer`; this one holds the descriptor.
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
    capabilities=frozenset({Capability.RESUMABLE}),
    availability=availability,
    temporaries=Temporaries(presence_token=PRESENCE_TOKEN, role="producer", prefix=PART_PREFIX),
    rank=70,
)
