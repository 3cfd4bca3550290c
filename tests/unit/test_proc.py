"""Reading kernel integers from /proc."""

from __future__ import annotations

import pytest

from podipc.proc import read_int, read_int_or


def test_reads_the_first_integer_or_falls_back(tmp_path: pytest.TempPathFactory) -> None:
    limits = tmp_path / "limits"  # type: ignore[operator]
    limits.write_text("8192\n")
    assert read_int(str(limits)) == 8192
    assert read_int("/proc/sys/fs/mqueue/msg_max") is not None
    assert read_int(str(tmp_path / "missing")) is None  # type: ignore[operator]
    limits.write_text("not a number\n")
    assert read_int_or(str(limits), 10) == 10
    limits.write_text("0\n")
    assert read_int_or(str(limits), 10) == 0
