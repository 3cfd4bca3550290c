"""Bench subjects for patterns beyond one pair: the request/reply round trip (podipc.client, podipc.server).

`rpc-unix` (over unix://@name), `rpc-tcp` (over tcp://127.0.0.1:PORT) and `rpc-shm` (over
shm:///name, a pair ring each way) are measured in latency cells only, against the raw
ping-pong of the same primitive (raw-unix, raw-tcp, raw-ring): one round trip is one
`call()`. rpc-shm's library peer is `iceoryx2-rpc` (iceoryx2 request-response, in the same
cell shape: podipc.bench.peers.shared_memory). They fit the bench's two links this way: the
client's sender "a" calls and keeps the reply, which its receiver "b" hands out; the
server's receiver "a" takes the next call and its sender "b" answers it. Both links name
the same URL (one connection carries both ways). The client's close makes one last call
with an empty request, which the server answers and takes as the end of stream (bench
messages are never empty).

Ask for them by name: `podipc bench --channels rpc-unix,raw-unix --sizes 64 --modes latency`,
`podipc bench --channels rpc-shm,iceoryx2-rpc --sizes 64 --modes latency`.

Fan-in (`fanin-unix-N`, `fanin-tcp-N`) is podipc.bench.fanin's: N producer processes into one consumer.

`broadcast-shm-N` and `broadcast-unix-N` (N = 1, 2, 4) are shm://?pattern=broadcast&subscribers=N
and the same over unix:// (podipc.stream_broadcast), measured in throughput cells: the bench's
receiver is one subscriber (shm: recv_view, in place) and N - 1 more subscriber processes drain
the same stream beside it, so its msg/s is the per-subscriber rate, to set against the
single-consumer figure of the same scheme
(`podipc bench --channels broadcast-shm-4,shm --sizes 1048576 --mode throughput`).

Their peers (pyzmq-fanin-N, pyzmq-broadcast-N, iceoryx2-broadcast-N) and the work-queue
cells (queue-mq-N, queue-sysvmq-N, pyzmq-queue-N) are podipc.bench.pattern_peers'.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import podipc
from podipc.bench.fanin import fanin_subjects
from podipc.bench.pattern_peers import pattern_peer_subjects
from podipc.bench.subjects import (
    PEER_WAIT_SECONDS,
    Buffer,
    CellPlace,
    ChannelSubject,
    Receiver,
    Sender,
    Subject,
)
from podipc.errors import EndOfStream

END_OF_CALLS = b""
"""The request a bench client's close() sends last; the bench server answers it and ends."""
CLOSE_CALL_SECONDS = 5.0


class _ClientEnds:
    """One client shared by a cell's two client ends, and the reply of the last call."""

    def __init__(self, url: str) -> None:
        self.client = podipc.client(url, wait=PEER_WAIT_SECONDS)
        self.call = self.client.call
        self.reply: bytes | None = None


class CallSender:
    """Link "a" on the client's side: each send is a call; its reply waits for the receiver of link "b"."""

    def __init__(self, ends: _ClientEnds) -> None:
        self.ends = ends

    def send(self, data: Buffer) -> None:
        """Call with `data`; keep the reply."""
        self.ends.reply = self.ends.call(data)

    def close(self) -> None:
        """Tell the server the calls are over (an empty request), then close the client."""
        try:
            self.ends.call(END_OF_CALLS, CLOSE_CALL_SECONDS)
        finally:
            self.ends.client.close()

    def abort(self) -> None:
        """Close the client."""
        self.ends.client.close()


class ReplyReceiver:
    """Link "b" on the client's side: the reply of the last call (EndOfStream when there is none)."""

    def __init__(self, ends: _ClientEnds) -> None:
        self.ends = ends

    def recv(self) -> Buffer:
        """The last call's reply."""
        reply, self.ends.reply = self.ends.reply, None
        if reply is None:
            raise EndOfStream("no call waits for its reply")
        return reply

    def idle(self, seconds: float) -> None:
        """A client between calls waits for nothing: it sleeps."""
        time.sleep(seconds)

    def close(self) -> None:
        """Nothing of its own to free (the sender closes the client)."""


class _ServerEnds:
    """One server shared by a cell's two server ends, and the call being answered."""

    def __init__(self, url: str) -> None:
        self.server = podipc.server(url)
        self.calls: Iterator[podipc.Call] = iter(self.server)
        self.call: podipc.Call | None = None


class CallReceiver:
    """Link "a" on the server's side: the next call's request (EndOfStream at the client's empty last call)."""

    def __init__(self, ends: _ServerEnds) -> None:
        self.ends = ends

    def recv(self) -> Buffer:
        """The next request."""
        call = next(self.ends.calls, None)
        if call is None:
            raise EndOfStream("the server was closed")
        if call.request == END_OF_CALLS:
            call.reply(END_OF_CALLS)
            raise EndOfStream("the client's calls are over")
        self.ends.call = call
        return call.request

    def idle(self, seconds: float) -> None:
        """Not used on the server's side."""
        time.sleep(seconds)

    def close(self) -> None:
        """Close the server."""
        self.ends.server.close()


class ReplySender:
    """Link "b" on the server's side: each send answers the call the receiver took."""

    def __init__(self, ends: _ServerEnds) -> None:
        self.ends = ends

    def send(self, data: Buffer) -> None:
        """Reply to the current call."""
        call = self.ends.call
        assert call is not None, "a reply before any call"
        call.reply(data)

    def close(self) -> None:
        """Nothing of its own to free (the receiver closes the server)."""

    def abort(self) -> None:
        """Close the server."""
        self.ends.server.close()


RAW_BASELINES = {"unix": "raw-unix", "tcp": "raw-tcp", "shm": "raw-ring"}
"""The raw ping-pong each request/reply subject is set beside (its report ratios)."""


class RequestReply(Subject):
    """podipc request/reply over a stream socket or shm://, measured as round trips (latency cells only)."""

    kind = "channel"
    modes = ("latency",)

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.shared_places = frozenset({"dev_shm"}) if scheme == "shm" else frozenset()
        self.name = f"rpc-{scheme}"
        self.baseline = RAW_BASELINES[scheme]
        self._client_ends: dict[str, _ClientEnds] = {}
        self._server_ends: dict[str, _ServerEnds] = {}

    def availability(self) -> str | None:
        """Request/reply over sockets needs nothing beyond the standard library; over shm:// a /dev/shm."""
        if self.scheme == "shm" and not os.path.isdir("/dev/shm"):
            return "no /dev/shm here"
        return None

    def size_problem(self, size: int) -> str | None:
        """Any size up to the default max_message_size (64 MiB) fits."""
        return None

    def resources(self, place: CellPlace, free_port: Callable[[str], int]) -> dict[str, str]:
        """One URL for both links: one connection carries requests and replies."""
        if self.scheme == "tcp":
            url = f"tcp://127.0.0.1:{free_port('tcp')}"
        elif self.scheme == "shm":
            url = f"shm:///{place.name('rpc')}"
        else:
            url = f"unix://@{place.name('rpc')}"
        return {"a": url, "b": url}

    def open_sender(self, resources: Mapping[str, str], key: str, size: int) -> Sender:
        """Client "a" (opens the client; no I/O yet), or server "b" (the server opened by its receiver "a")."""
        url = resources[key]
        if key == "a":
            ends = self._client_ends[url] = _ClientEnds(url)
            return CallSender(ends)
        return ReplySender(self._server_ends.pop(url))

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Server "a" (opens the server: it listens at once), or client "b" (the client opened by its sender "a")."""
        url = resources[key]
        if key == "a":
            ends = self._server_ends[url] = _ServerEnds(url)
            return CallReceiver(ends)
        return ReplyReceiver(self._client_ends.pop(url))


BROADCAST_SUBSCRIBERS = (1, 2, 4)
BROADCAST_SCHEMES = ("shm", "unix")
SUBSCRIBER_HELPER = """
import sys
import podipc
with podipc.consumer(sys.argv[1], wait=float(sys.argv[2])) as inbox:
    try:
        while True:
            inbox.recv_view()
    except podipc.EndOfStream:
        pass
"""
"""The other subscribers of a broadcast cell: each drains the stream in place, in its own process."""
HELPER_EXIT_SECONDS = 10.0


class BroadcastReceiver:
    """The measured subscriber of a broadcast cell, and the helper subscribers it started."""

    def __init__(self, receiver: Receiver, helpers: list[subprocess.Popen[bytes]]) -> None:
        self.receiver = receiver
        self.recv = receiver.recv
        self.helpers = helpers

    def idle(self, seconds: float) -> None:
        """Not measured for broadcast (throughput cells only)."""
        self.receiver.idle(seconds)

    def close(self) -> None:
        """Close the measured subscriber, then wait for the helpers to take the end (kill them after a while)."""
        try:
            self.receiver.close()
        finally:
            for helper in self.helpers:
                try:
                    helper.wait(HELPER_EXIT_SECONDS)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()


class Broadcast(ChannelSubject):
    """Broadcast to N subscribers (shm://, unix://): one of them is the bench's receiver (throughput cells only)."""

    modes = ("throughput",)

    def __init__(self, subscribers: int, scheme: str = "shm") -> None:
        super().__init__(scheme, f"pattern=broadcast&subscribers={subscribers}", baseline=scheme)
        self.name = f"broadcast-{scheme}-{subscribers}"
        self.subscribers = subscribers

    def open_receiver(self, resources: Mapping[str, str], key: str, size: int) -> Receiver:
        """Start the N - 1 helper subscribers, then open the measured one (none of them waits for the producer)."""
        command = [sys.executable, "-c", SUBSCRIBER_HELPER, resources[key], str(PEER_WAIT_SECONDS)]
        helpers = [subprocess.Popen(command) for _ in range(self.subscribers - 1)]
        try:
            return BroadcastReceiver(super().open_receiver(resources, key, size), helpers)
        except BaseException:
            for helper in helpers:
                helper.kill()
                helper.wait()
            raise


def pattern_subjects() -> list[Subject]:
    """Every pattern subject, in report order (measured when named in --channels)."""
    return [
        RequestReply("unix"),
        RequestReply("tcp"),
        RequestReply("shm"),
        *fanin_subjects(),
        *(Broadcast(count, scheme) for scheme in BROADCAST_SCHEMES for count in BROADCAST_SUBSCRIBERS),
        *pattern_peer_subjects(),
    ]
