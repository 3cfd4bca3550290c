#!/usr/bin/env bash
# Set up podipc on a fresh Debian 12 machine: Debian packages, a virtualenv in .venv, podipc with its extras.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "all"; the tests use "all,test,dev")
#
# Every Python package comes in at the version scripts/constraints.txt pins, so ruff, mypy and
# pytest answer the same on every machine (its header says how to move the pins).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# For the tests: util-linux (unshare, nsenter, ipcs), iproute2 (ip), libcap2-bin (capsh, the reference
# for the doctor's capability names), git (which files the repository tracks).
packages=(python3-venv python3-dev gcc util-linux iproute2 procps libcap2-bin git)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# POSIX message queues are listed under /dev/mqueue only when it is mounted (pods mount it).
if [ ! -d /dev/mqueue ] || ! mountpoint -q /dev/mqueue; then
  as_root mkdir -p /dev/mqueue && as_root mount -t mqueue none /dev/mqueue || echo "note: could not mount /dev/mqueue" >&2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --constraint scripts/constraints.txt --upgrade pip setuptools
.venv/bin/python -m pip install -q --constraint scripts/constraints.txt -e ".[${extras}]"
