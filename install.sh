#!/usr/bin/env bash
# Installs Stasis on this node (Debian bookworm, root) and runs its demo.
#
#   bash install.sh            install (idempotent) and run `stasis demo`
#   bash install.sh --no-demo  install only
#
# What it does: installs runc, iptables and (when no containerd is present)
# containerd 1.7 from Debian trixie; builds CRIU 4.2 from Debian's source when
# `criu check` does not pass; installs Stasis into its own venv under
# /opt/stasis with containerd-shim-stasis-v2 and stasis linked into
# /usr/local/bin; starts containerd when it is not running; imports a small
# busybox image and runs the demo: a counting container checkpointed into the
# default store (/var/lib/stasis/checkpoints), stopped, and restored as a new
# container that goes on counting.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${STASIS_PREFIX:-/opt/stasis}
ADDRESS=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
DEMO=1
for arg in "$@"; do
    case $arg in
    --no-demo) DEMO=0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[stasis-install] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

missing=()
# gcc + libc6-dev: the static exec shepherd (shim/shepherd.c) is compiled at install.
for pkg in runc iptables iproute2 util-linux busybox-static python3-venv gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q >&2
    apt-get install -y -q "${missing[@]}" >&2
fi

# Newer Debian suites, pinned low: containerd 1.7 and CRIU's source come from there.
add_newer_suites() {
    local src=/etc/apt/sources.list.d/stasis-newer.sources
    [ -f "$src" ] && return 0
    printf 'Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: trixie sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
    printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n\nPackage: *\nPin: release n=sid\nPin-Priority: 50\n' \
        >/etc/apt/preferences.d/stasis-newer
    apt-get update -q >&2
}

criu_ok() {
    command -v criu >/dev/null || return 1
    criu --version 2>/dev/null | grep -Eq 'Version: (4\.([2-9]|[1-9][0-9])|[5-9])' || return 1
    criu check 2>&1 | grep -q "Looks good"
}

if ! criu_ok; then
    # Debian bookworm's CRIU 3.17 fails on current kernels: build 4.2 from Debian's source.
    log "building CRIU 4.2 (criu check does not pass with the installed one)"
    add_newer_suites
    apt-get install -y -q build-essential pkg-config libprotobuf-dev libprotobuf-c-dev \
        protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev \
        libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev libaio-dev >&2
    build=$PREFIX/src/criu
    rm -rf "$build" && mkdir -p "$build"
    (cd "$PREFIX/src" && apt-get source -q --download-only criu/sid >&2) || true
    tar -xf "$(ls "$PREFIX"/src/criu_*.orig.tar.* | tail -n1)" -C "$build" --strip-components=1
    make -C "$build" -j"$(nproc)" criu >"$build/build.log" 2>&1 || { tail -n 30 "$build/build.log" >&2; exit 1; }
    install -D -m 0755 "$build/criu/criu" /usr/local/sbin/criu
    criu_ok || { log "CRIU built but criu check still fails: see 'criu check'"; exit 1; }
fi

if ! command -v containerd >/dev/null; then
    # bookworm ships containerd 1.6; Stasis is tested on 1.7 and 2.1.
    add_newer_suites
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q containerd/trixie >&2)
    log "installing containerd 1.7 from trixie"
    dpkg -i "$tmp"/containerd_*.deb >&2
    rm -rf "$tmp"
fi

log "installing Stasis into $PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check "$REPO" >&2
"$PREFIX/venv/bin/python" -m shim.launcher "$PREFIX/venv/bin" >/dev/null
ln -sf "$PREFIX/venv/bin/containerd-shim-stasis-v2" /usr/local/bin/containerd-shim-stasis-v2
ln -sf "$PREFIX/venv/bin/stasis" /usr/local/bin/stasis

if ! ctr --address "$ADDRESS" version >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        systemctl enable --now containerd >&2
    else
        log "starting containerd (no systemd here; log: /var/log/containerd.log)"
        setsid nohup containerd >/var/log/containerd.log 2>&1 </dev/null &
        echo $! >/run/stasis-containerd.pid
    fi
    for _ in $(seq 100); do
        ctr --address "$ADDRESS" version >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

if [ "$DEMO" = 1 ]; then
    tmp=$(mktemp -d)
    "$PREFIX/venv/bin/python" "$REPO/tests/bed/images.py" "$tmp" >/dev/null
    ctr --address "$ADDRESS" -n default images import "$tmp/busybox.tar" >/dev/null
    rm -rf "$tmp"
    stasis --address "$ADDRESS" -n default demo --image docker.io/stasis/busybox:test
fi
log "done"
