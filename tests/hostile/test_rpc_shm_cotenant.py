"""A co-tenant against request/reply over shm:// (issue 14): another user's object at either ring's name is
refused with one line naming it and its owner, and left untouched; the rings are shm:// rings, checked by the
shm transport's rules."""

from __future__ import annotations

import sys

import pytest

from .cotenant import Pod, Tenants, assert_one_line_error

pytestmark = pytest.mark.timeout(120)

EXIT_CHANNEL_UNAVAILABLE = 3
PLANT = "printf 'PODIPCSH a forged ring' > {path}; chmod 0666 {path}"


def planted(pod: Pod, tenants: Tenants, path: str) -> str:
    """Mallory's regular file at `path`; its owner, mode and bytes (to see it untouched)."""
    assert pod.run(["sh", "-c", PLANT.format(path=path)], user=tenants.mallory).returncode == 0
    return fingerprint(pod, path)


def fingerprint(pod: Pod, path: str) -> str:
    status = pod.run(["sh", "-c", f"stat -c '%U %a %s %Y' {path} && sha256sum {path}"])
    assert status.returncode == 0, status.stderr
    return status.stdout


def test_another_users_object_at_the_request_ring_is_refused_by_the_server(pod: Pod, tenants: Tenants) -> None:
    before = planted(pod, tenants, "/dev/shm/app.request")
    served = pod.podipc("reply", "shm:///app", "--echo", user=tenants.alice)
    line = assert_one_line_error(served, exit_code=EXIT_CHANNEL_UNAVAILABLE)
    assert "/dev/shm/app.request" in line and "podipc-mallory" in line, line
    assert fingerprint(pod, "/dev/shm/app.request") == before


def test_another_users_object_at_the_reply_ring_is_refused_by_the_client(pod: Pod, tenants: Tenants) -> None:
    before = planted(pod, tenants, "/dev/shm/app.reply")
    server, pid = pod.spawn([sys.executable, "-m", "podipc", "reply", "shm:///app", "--echo"], user=tenants.alice)
    try:
        called = pod.podipc("call", "shm:///app?wait=5", "--data", "x", "--timeout", "5", user=tenants.alice)
        line = assert_one_line_error(called, exit_code=EXIT_CHANNEL_UNAVAILABLE)
        assert "/dev/shm/app.reply" in line and "podipc-mallory" in line, line
        assert fingerprint(pod, "/dev/shm/app.reply") == before
        assert server.poll() is None, "the server goes on serving"
    finally:
        pod.kill(pid)
