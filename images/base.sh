#!/usr/bin/env bash
# Build the local base image localhost/podipc-base:bookworm with mmdebstrap, without any registry.
#
# Debian 12 minbase + python3 + python3-venv (Python 3.11), docs/man pages/locales left out.
# Does nothing when the image exists already (pass --force to rebuild).
#
#   images/base.sh [--force]
#
# Environment: PODIPC_BASE_IMAGE (default localhost/podipc-base:bookworm),
#              PODIPC_DEBIAN_MIRROR (default: mmdebstrap's choice, from the host's apt sources).
set -euo pipefail

BASE_IMAGE=${PODIPC_BASE_IMAGE:-localhost/podipc-base:bookworm}
SUITE=bookworm
PATH_IN_IMAGE=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf 'base.sh: %s\n' "$*" >&2; }

if [ "${1:-}" != --force ] && podman image exists "$BASE_IMAGE"; then
    exit 0
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/podipc-base.XXXXXX")
trap 'rm -rf "$workdir"' EXIT

log "building $BASE_IMAGE with mmdebstrap (about 30 s)"
mirror=()
if [ -n "${PODIPC_DEBIAN_MIRROR:-}" ]; then mirror=("$PODIPC_DEBIAN_MIRROR"); fi
# shellcheck disable=SC2016  # "$1" is expanded by mmdebstrap's hook, not here
mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv \
    --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    "$SUITE" "$workdir/base.tar" "${mirror[@]}" >"$workdir/mmdebstrap.log" 2>&1 || {
    cat "$workdir/mmdebstrap.log" >&2
    log "mmdebstrap failed"
    exit 1
}

# An imported tarball has no PATH: without it every command fails with "executable file not found".
podman import --quiet \
    --change "ENV=PATH=$PATH_IN_IMAGE" \
    --change 'LABEL org.opencontainers.image.title=podipc-base' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase, python3 and python3-venv, by mmdebstrap\"" \
    --change 'CMD ["/bin/bash"]' \
    "$workdir/base.tar" "$BASE_IMAGE" >/dev/null
log "built $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
