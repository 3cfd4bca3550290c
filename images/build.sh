#!/usr/bin/env bash
# Build the podipc image with podman, with no container registry.
#
#   images/build.sh            # quiet; a re-run with nothing changed takes about a second
#   images/build.sh --force    # rebuild the podipc image even when its inputs did not change
#
# Steps:
#   1. the base image (images/base.sh: localhost/podipc-base:bookworm via mmdebstrap), when missing;
#   2. wheels of podipc and its dependencies, on the host, for the base's Python version;
#   3. localhost/podipc:dev from images/podipc/Containerfile.
# The image carries a label with a digest of its inputs (podipc/, pyproject.toml, the Containerfile,
# the base image's id); when the existing image has the same digest, nothing is rebuilt.
#
# Environment:
#   PODIPC_IMAGE        the image to build (default localhost/podipc:dev)
#   PODIPC_BASE_IMAGE   the base (default localhost/podipc-base:bookworm; e.g. python:3.12-slim
#                       when a registry is reachable: then only step 2 and 3 run)
#   PYTHON              the host's Python with pip, for building wheels (default .venv/bin/python, else python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${PODIPC_IMAGE:-localhost/podipc:dev}
BASE_IMAGE=${PODIPC_BASE_IMAGE:-localhost/podipc-base:bookworm}
if [ -z "${PYTHON:-}" ]; then
    # The project's virtualenv (scripts/setup.sh) has pip; Debian's python3 may not.
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
CONTAINERFILE=$ROOT/images/podipc/Containerfile
INPUTS_LABEL=io.github.podipc.build-inputs
FORCE=${1:-}

log() { printf 'build.sh: %s\n' "$*" >&2; }

run_quietly() {
    # Run a command; show its output only when it fails.
    local output
    if ! output=$("$@" 2>&1); then
        printf '%s\n' "$output" >&2
        log "failed: $*"
        return 1
    fi
}

ensure_base() {
    if [[ "$BASE_IMAGE" == localhost/podipc-base:* ]]; then
        PODIPC_BASE_IMAGE=$BASE_IMAGE "$ROOT/images/base.sh"
    elif ! podman image exists "$BASE_IMAGE"; then
        log "pulling $BASE_IMAGE"
        run_quietly podman pull "$BASE_IMAGE"
    fi
}

inputs_digest() {
    # Everything that goes into the image: the package's sources, its metadata, the Containerfile, the base.
    {
        podman image inspect --format '{{.Id}}' "$BASE_IMAGE"
        cd "$ROOT"
        find podipc pyproject.toml images/podipc -type f \
            -not -name '*.pyc' -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 |
            sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}

python_version_of_base() {
    podman run --rm --entrypoint python3 "$BASE_IMAGE" -c 'import sys; print("%d.%d" % sys.version_info[:2])'
}

build_wheels() {
    # Into $1/wheels: podipc's own wheel, then its dependencies with every extra (podipc[all]) for Python $2.
    local wheels=$1/wheels version=$2 host_version
    mkdir -p "$wheels"
    rm -f "$wheels"/podipc-*.whl
    host_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    run_quietly "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps "$ROOT" -w "$wheels"
    local project_wheel
    project_wheel="$(ls "$wheels"/podipc-*.whl)[all]"
    # Dependencies already there from an earlier run are reused without asking the index.
    if "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
        --only-binary=:all: --python-version "$version" -d "$wheels" "$project_wheel" >/dev/null 2>&1; then
        return 0
    fi
    if [ "$host_version" = "$version" ]; then
        run_quietly "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --find-links "$wheels" \
            "$project_wheel" -w "$wheels"
    else
        # Another Python than the host's: take the manylinux wheels built for it from the index.
        run_quietly "$PYTHON" -m pip download --quiet --disable-pip-version-check --find-links "$wheels" \
            --only-binary=:all: --python-version "$version" --implementation cp \
            --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d "$wheels" "$project_wheel"
    fi
}

project_version() {
    # The one place the version lives: pyproject.toml's [project] version.
    "$PYTHON" -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$ROOT/pyproject.toml"
}

build_image() {
    local context=$1 digest=$2
    run_quietly podman build --quiet --layers \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg VERSION="$(project_version)" \
        --build-arg REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --label "$INPUTS_LABEL=$digest" \
        -f "$CONTAINERFILE" -t "$IMAGE" "$context"
}

main() {
    command -v podman >/dev/null || { log "podman is not installed: run .ci/podman-setup.sh"; exit 1; }
    "$PYTHON" -m pip --version >/dev/null 2>&1 || {
        log "$PYTHON has no pip: set PYTHON to a Python 3 with pip (e.g. .venv/bin/python after scripts/setup.sh)"
        exit 1
    }
    ensure_base
    local digest current
    digest=$(inputs_digest)
    current=$(podman image inspect --format "{{index .Labels \"$INPUTS_LABEL\"}}" "$IMAGE" 2>/dev/null || true)
    if [ "$FORCE" != --force ] && [ "$current" = "$digest" ]; then
        return 0
    fi
    local started=$SECONDS version context previous
    previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    version=$(python_version_of_base)
    context=$ROOT/build/podipc-image-py$version
    build_wheels "$context" "$version"
    build_image "$context" "$digest"
    # The install stage of this and earlier builds, and the image this build replaced, are now
    # untagged: remove them (only them; other images are not ours).
    podman image prune --force --filter label=io.github.podipc.stage=install >/dev/null 2>&1 || true
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
    log "built $IMAGE (Python $version, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes) in $((SECONDS - started)) s"
}

main
