"""Batches of numbered messages for the batch cells, written and checked at a few nanoseconds a message.

A bench message starts with its sequence number (little-endian u64, stats.SEQUENCE); the
rest of it is zeros. A batch is `count` such messages of `size` bytes back to back in one
bytearray. Numbering a batch message by message (array('Q', range(...))) costs more per
message than shm's send_many itself, so a batch of whole runs of RUN messages starting at a
multiple of RUN is written by byte planes: within such a run the low byte of the numbers is
0..255 (written once) and the seven high bytes are one value, rewritten only where the
number's high part changed since the buffer was last numbered (one strided slice
assignment per changed byte). Anything else is numbered the plain way.
"""

from __future__ import annotations

from array import array

from podipc.bench.stats import SEQUENCE, SEQUENCE_SIZE

RUN = 256
"""Messages whose numbers share their seven high bytes when the first is a multiple of RUN."""
LOW_BYTES = bytes(range(RUN))
FILLED = tuple(bytes([value]) * RUN for value in range(256))
"""FILLED[value]: RUN bytes of `value`, the source of one high byte plane of a run."""
HIGH_PLACES = range(1, SEQUENCE_SIZE)

assert SEQUENCE.format == "<Q"  # byte planes: the low byte first


class NumberedBatch:
    """`count` messages of `size` bytes in one bytearray, renumbered in place for each send or check."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.count = count
        self.data = bytearray(size * count)
        memory = memoryview(self.data)
        self.buffers = [memory[index * size : (index + 1) * size] for index in range(count)]
        self.numbers = memory.cast("Q")[:: size // SEQUENCE_SIZE] if size % SEQUENCE_SIZE == 0 else None
        self._highs = [-1] * (count // RUN)
        """Per whole run of the buffer: the high part (number >> 8) it holds, -1 when not numbered by planes."""

    def number(self, first: int, count: int) -> list[memoryview]:
        """Number the first `count` buffers first, first + 1, ...; those buffers."""
        if count == self.count and self._by_planes(first):
            return self.buffers
        numbers = self.numbers
        if numbers is not None and count == self.count:
            numbers[:] = array("Q", range(first, first + count))
        else:
            pack_into = SEQUENCE.pack_into
            for index in range(count):
                pack_into(self.buffers[index], 0, first + index)
        self._highs = [-1] * len(self._highs)
        return self.buffers if count == self.count else self.buffers[:count]

    def holds(self, first: int) -> bytearray | None:
        """The whole batch numbered from `first` (to compare a received batch with), or None when not by planes."""
        return self.data if self._by_planes(first) else None

    def _by_planes(self, first: int) -> bool:
        """Number the whole buffer from `first` by byte planes; False when it can't be (first or count unaligned)."""
        size = self.size
        if first % RUN or self.count % RUN or size < SEQUENCE_SIZE:
            return False
        data, highs = self.data, self._highs
        span = RUN * size
        for run, high in enumerate(range(first >> 8, (first >> 8) + len(highs))):
            held = highs[run]
            if held == high:
                continue
            start = run * span
            stop = start + span
            if held < 0:
                data[start:stop:size] = LOW_BYTES
                changed = -1
            else:
                changed = held ^ high
            shifted = high
            for place in HIGH_PLACES:
                if changed & 0xFF:
                    data[start + place : stop : size] = FILLED[shifted & 0xFF]
                changed >>= 8
                shifted >>= 8
            highs[run] = high
        return True
