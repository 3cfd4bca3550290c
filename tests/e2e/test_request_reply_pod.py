"""Request/reply in a real pod: an app container calls its native sidecar (`podipc call` -> `podipc reply`).

k8s/request-reply/request-reply.yaml: the app's one call must come back answered by the sidecar's
command, and the sidecar must stop the way the manifest says once the app has exited (SIGTERM,
its summary line, exit 143, within 2 s).
"""

from __future__ import annotations

import pytest

from .pods import K8S_DIR, play

MANIFEST = K8S_DIR / "request-reply" / "request-reply.yaml"
EXIT_TIMEOUT_SECONDS = 120
STOP_SECONDS = 2.0
SIGTERM_EXIT = 143


@pytest.mark.timeout(240)
def test_the_app_gets_its_sidecars_reply_and_the_sidecar_stops_on_the_kubelets_sigterm(podipc_image: str) -> None:
    with play(MANIFEST) as pods:
        assert pods.sidecars == {"podipc-request-reply": ["responder"]}
        assert pods.wait("app", EXIT_TIMEOUT_SECONDS) == 0, pods.describe()[-3000:]
        assert pods.logs("app").strip() == "HELLO FROM THE APP", pods.describe()[-3000:]
        assert pods.state("responder")["Status"] == "running", "a native sidecar outlives the app"

        taken = pods.stop_sidecars()  # what the kubelet does once every app container has exited

        assert taken["podipc-request-reply/responder"] < STOP_SECONDS, taken
        assert pods.wait("responder", 10) == SIGTERM_EXIT
        summary = pods.summary("responder")
        assert summary["role"] == "server" and summary["stopped_by"] == "SIGTERM", summary
        assert (summary["clients"], summary["calls"], summary["replied"], summary["failed"]) == (1, 1, 1, 0), summary
