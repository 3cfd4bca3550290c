#!/usr/bin/env bash
# Make this Debian 12 machine able to run podipc's pods with `podman kube play`.
#
# Idempotent: installs podman, runc and mmdebstrap from Debian's packages when missing,
# writes the two containers.conf settings these machines need, and mounts /dev/mqueue.
# Safe to run on every CI run; a second run changes nothing and takes well under a second.
#
#   runtime = "runc"      crun (Podman's default) fails here: "cgroups in hybrid mode not supported"
#   default_ulimits       Podman's defaults exceed the machine's hard limits
#                         ("setrlimit RLIMIT_NOFILE: Operation not permitted"); these fit under them
set -euo pipefail

log() { printf 'podman-setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    local package
    for package in podman runc mmdebstrap; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # With recommends: catatonit (the pod's infra container), netavark, buildah come along.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" catatonit >/dev/null
}

nofile_limit() {
    # The soft=hard nofile limit for containers: 20000, or the machine's hard limit when lower.
    local hard
    hard=$(ulimit -Hn)
    if [ "$hard" = unlimited ] || [ "$hard" -ge 20000 ]; then echo 20000; else echo "$hard"; fi
}

nproc_limit() {
    local hard
    hard=$(ulimit -Hu)
    if [ "$hard" = unlimited ] || [ "$hard" -ge 4096 ]; then echo 4096; else echo "$hard"; fi
}

write_containers_conf() {
    local conf=/etc/containers/containers.conf
    local nofile nproc wanted
    nofile=$(nofile_limit)
    nproc=$(nproc_limit)
    wanted=$(cat <<EOF
# Written by podipc's .ci/podman-setup.sh (see docs/pods.md).
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
EOF
)
    if [ -f "$conf" ] && [ "$(cat "$conf")" = "$wanted" ]; then
        return 0
    fi
    if [ -f "$conf" ] && ! grep -q "podipc's .ci/podman-setup.sh" "$conf"; then
        as_root cp "$conf" "$conf.before-podipc"
        log "kept the previous $conf as $conf.before-podipc"
    fi
    as_root mkdir -p /etc/containers
    printf '%s\n' "$wanted" | as_root tee "$conf" >/dev/null
    log "wrote $conf (runtime runc, ulimits nofile=$nofile nproc=$nproc)"
}

mount_mqueue() {
    # POSIX message queues (mq://) need the mqueue filesystem on the host for podipc's own tests;
    # inside pods the runtime mounts it in each container.
    if mountpoint -q /dev/mqueue 2>/dev/null; then
        return 0
    fi
    as_root mkdir -p /dev/mqueue
    if as_root mount -t mqueue mqueue /dev/mqueue 2>/dev/null; then
        log "mounted /dev/mqueue"
    else
        log "warning: could not mount /dev/mqueue (mq:// tests on the host will be skipped)"
    fi
}

install_packages
write_containers_conf
mount_mqueue
