#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, podman for real pods, the image), then run the test suite.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -m "not e2e"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all,test,dev
if [ -f .ci/podman-setup.sh ]; then bash .ci/podman-setup.sh; fi
exec .venv/bin/python -m pytest "$@"
