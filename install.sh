#!/usr/bin/env bash
# Installs Stasis on this node (Debian bookworm, root) and runs its demo.
#
#   bash install.sh            install (idempotent) and run `stasis demo`
#   bash install.sh --no-demo  install only
#
# What it does: installs runc, iptables and (when no containerd is present)
# containerd 1.7 from Debian trixie; installs Stasis into its own venv under
# /opt/stasis with containerd-shim-stasis-v2 and stasis linked into
# /usr/local/bin; starts containerd when it is not running; imports a small
# busybox image and runs a container on the io.containerd.stasis.v2 runtime.
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
for pkg in runc iptables busybox-static python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q >&2
    apt-get install -y -q "${missing[@]}" >&2
fi

if ! command -v containerd >/dev/null; then
    # bookworm ships containerd 1.6; Stasis is tested on 1.7 and 2.1.
    src=/etc/apt/sources.list.d/stasis-trixie.sources
    if [ ! -f "$src" ]; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
        printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' >/etc/apt/preferences.d/stasis-trixie
        apt-get update -q >&2
    fi
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
    stasis --address "$ADDRESS" -n default demo
fi
log "done"
