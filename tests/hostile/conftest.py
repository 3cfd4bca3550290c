"""Fixtures of the hostile-co-tenant tests: `tenants` (users made once) and `pod` (a fresh pod per test).

See tests/hostile/cotenant.py for what they give and how to use them. Every test in this
directory is marked `hostile` and `namespaces`, and is skipped where the harness cannot run
(not root, or util-linux/passwd tools missing).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .cotenant import Pod, Tenants, ensure_tenants, missing_requirement


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/hostile as `hostile` and `namespaces`; skip them where the harness cannot run."""
    reason = missing_requirement()
    for item in items:
        if "tests/hostile/" in str(item.fspath):
            item.add_marker(pytest.mark.hostile)
            item.add_marker(pytest.mark.namespaces)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tenants() -> Tenants:
    """alice and bob (common group podipc-pod) and mallory (outside it), created once and reused."""
    return ensure_tenants()


@pytest.fixture
def pod(tenants: Tenants) -> Iterator[Pod]:
    """A fresh pod in miniature for one test; checks that a tenant can run podipc in it."""
    pod = Pod()
    try:
        check = pod.python("import podipc", user=tenants.mallory, timeout=30)
        assert check.returncode == 0, f"a tenant cannot run podipc in the pod: {check.stderr}"
        yield pod
    finally:
        pod.close()
