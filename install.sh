#!/usr/bin/env bash
# Installs Stasis on this node (Debian bookworm, root) and runs its demo.
#
#   bash install.sh                       install (idempotent) and run `stasis demo`
#   bash install.sh --no-demo             install only
#   bash install.sh --uninstall [--purge] remove what install.sh added; --purge also
#                                         removes the checkpoints in /var/lib/stasis
#
# Options: --containerd-config PATH (default /etc/containerd/config.toml, env
# CONTAINERD_CONFIG), --address SOCK (default /run/containerd/containerd.sock, env
# CONTAINERD_ADDRESS); for the installer image (packaging/installer): --node (no
# packages, no CRIU build, no containerd install, start or demo), --wheels DIR (install
# from these wheels, offline), --shepherd FILE (a prebuilt exec shepherd),
# --restart-containerd auto|none. STASIS_PREFIX (/opt/stasis) and STASIS_BIN_DIR
# (/usr/local/bin) move the install.
#
# What it does: installs runc, iptables and (when no containerd is present)
# containerd 1.7 from Debian trixie; builds CRIU 4.2 from Debian's source when
# `criu check` does not pass; installs Stasis into its own venv under
# /opt/stasis with containerd-shim-stasis-v2 and stasis linked into
# /usr/local/bin; adds the `stasis` CRI runtime handler to containerd's config as a
# drop-in (/etc/containerd/conf.d/stasis.toml, imported from the config, which is
# backed up byte for byte into /opt/stasis/install/) and restarts containerd only when
# its config changed; starts containerd when it is not running; imports a small
# busybox image and runs the demo: a counting container checkpointed into the
# default store (/var/lib/stasis/checkpoints), stopped, and restored as a new
# container that goes on counting.
#
# Creates the node's checkpoint signing key, /etc/stasis/signing.key (env
# STASIS_SIGNING_KEY_FILE), when there is none; --uninstall keeps it unless --purge.
#
# Every file and link it adds is listed in /opt/stasis/install/manifest; a file whose
# content would not change is left alone, so a second run changes nothing. Packages
# installed through apt/dpkg are listed there too and stay at --uninstall.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${STASIS_PREFIX:-/opt/stasis}
BIN_DIR=${STASIS_BIN_DIR:-/usr/local/bin}
ADDRESS=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CHECKPOINTS=/var/lib/stasis/checkpoints
PIDFILE=/run/stasis-containerd.pid # containerd started by install.sh (no systemd)
DEMO=1 NODE=0 UNINSTALL=0 PURGE=0 WHEELS="" SHEPHERD="" RESTART=auto
while [ $# -gt 0 ]; do
    case $1 in
    --no-demo) DEMO=0 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --node) NODE=1 DEMO=0 ;;
    --wheels) WHEELS=$2; shift ;;
    --shepherd) SHEPHERD=$2; shift ;;
    --containerd-config) CONFIG=$2; shift ;;
    --address) ADDRESS=$2; shift ;;
    --restart-containerd) RESTART=$2; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
STATE=$PREFIX/install
MANIFEST=$STATE/manifest
DROPIN=$(dirname "$CONFIG")/conf.d/stasis.toml

log() { printf '[stasis-install] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# -- the manifest: what this install added ("KIND PATH" lines) -------------------------
declare -A ADDED=()
if [ -f "$MANIFEST" ]; then
    while IFS= read -r line; do [ -n "$line" ] && ADDED[$line]=1; done <"$MANIFEST"
fi
record() { ADDED["$1 $2"]=1; }
write_manifest() {
    local tmp
    mkdir -p "$STATE"
    tmp=$(mktemp "$STATE/.manifest.XXXXXX")
    printf '%s\n' "${!ADDED[@]}" | LC_ALL=C sort >"$tmp"
    if cmp -s "$tmp" "$MANIFEST"; then rm -f "$tmp"; else chmod 0644 "$tmp" && mv "$tmp" "$MANIFEST"; fi
}
# mkdir -p that records the directories it creates.
make_dir() {
    local d=$1 missing=()
    while [ ! -d "$d" ]; do missing+=("$d"); d=$(dirname "$d"); done
    for d in "${missing[@]}"; do mkdir -m 0755 "$d" 2>/dev/null || mkdir -p "$d"; record dir "$d"; done
}
# Copies src to dest (mode) unless dest holds the same bytes already.
put_file() {
    local src=$1 dest=$2 mode=$3
    [ -e "$dest" ] || record file "$dest"
    if ! cmp -s "$src" "$dest"; then install -m "$mode" "$src" "$dest"; fi
}
put_link() {
    local target=$1 link=$2
    record link "$link"
    [ "$(readlink "$link" 2>/dev/null)" = "$target" ] || ln -sfn "$target" "$link"
}

# -- containerd: ours is the one whose PID install.sh wrote ---------------------------
ctr_ok() { ctr --address "$ADDRESS" version >/dev/null 2>&1; }
our_containerd() { # prints the PID of the containerd install.sh started, if it runs
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" = containerd ] || return 1
    echo "$pid"
}
start_containerd() {
    if [ -d /run/systemd/system ]; then
        systemctl enable --now containerd >&2
    else
        log "starting containerd (no systemd here; log: /var/log/containerd.log)"
        local args=()
        [ "$CONFIG" = /etc/containerd/config.toml ] || args=(--config "$CONFIG")
        setsid nohup containerd "${args[@]}" >>/var/log/containerd.log 2>&1 </dev/null &
        echo $! >"$PIDFILE"
    fi
    for _ in $(seq 300); do ctr_ok && return 0; sleep 0.1; done
    log "containerd did not answer on $ADDRESS within 30 s (see /var/log/containerd.log)"
    return 1
}
restart_containerd() { # after a config change: only a containerd we may restart
    local pid
    ctr_ok || { log "containerd is not running: it reads the new config when it starts"; return 0; }
    if [ "$RESTART" = none ]; then
        log "containerd's config changed: restart containerd to load the stasis handler"
    elif [ -d /run/systemd/system ] && systemctl is-active -q containerd 2>/dev/null; then
        log "restarting containerd (systemd) to load its new config"
        systemctl restart containerd >&2
    elif pid=$(our_containerd); then
        log "restarting containerd (pid $pid, started by install.sh) to load its new config"
        kill -TERM "$pid"
        for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        start_containerd
    else
        log "containerd's config changed but this containerd was not started by systemd or"
        log "install.sh: restart it yourself to load the stasis handler"
    fi
}
configure_containerd() { # $1: configure | unconfigure
    "$PREFIX/venv/bin/python" "$REPO/packaging/containerd_config.py" "$1" \
        --config "$CONFIG" --dropin "$DROPIN" --state "$STATE"
}

# -- uninstall --------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    [ -f "$MANIFEST" ] || { log "nothing to uninstall ($MANIFEST not found)"; exit 0; }
    recorded=$(sed -n 's/^config //p' "$MANIFEST" | head -n1)
    if [ -n "$recorded" ]; then
        CONFIG=$recorded
        DROPIN=$(dirname "$CONFIG")/conf.d/stasis.toml
        if [ "$(configure_containerd unconfigure)" = changed ]; then restart_containerd; fi
    fi
    # Links and files first, then trees, then directories deepest first.
    for kind in link file key tree dir; do
        while IFS= read -r path; do
            case $kind in
            link) if [ -L "$path" ]; then rm -f "$path"; fi ;;
            # The signing key goes with the checkpoints it signed (--purge) only.
            key) if [ "$PURGE" = 1 ]; then rm -f "$path"; else log "kept $path (--purge removes it)"; fi ;;
            file) [ "$path" = "$STATE/containerd-config.orig" ] || rm -f "$path" ;;
            tree) rm -rf "$path" ;;
            dir) if [ -d "$path" ]; then rmdir "$path" 2>/dev/null || log "kept $path (not empty)"; fi ;;
            esac
        done < <(grep "^$kind " "$MANIFEST" | cut -d' ' -f2- | LC_ALL=C sort -r)
    done
    if grep -q '^package ' "$MANIFEST"; then
        log "packages installed by install.sh stay: $(grep '^package ' "$MANIFEST" | cut -d' ' -f2 | tr '\n' ' ')"
    fi
    rm -f "$MANIFEST" "$STATE/source.sha256"
    # Shim zygotes (shim/bootstrap/zygote.py) exit within 5 s once their socket is gone;
    # running shims are not theirs to stop and keep running.
    rm -rf /run/stasis/zygote
    rmdir /run/stasis 2>/dev/null || true
    [ -f "$STATE/containerd-config.orig" ] && log "kept $STATE/containerd-config.orig (see above)"
    rmdir "$STATE" 2>/dev/null || true
    rmdir "$PREFIX" 2>/dev/null || true
    if [ "$PURGE" = 1 ]; then
        log "removing the checkpoints in $CHECKPOINTS (--purge)"
        rm -rf "$CHECKPOINTS" /var/lib/stasis/spool /var/lib/stasis/cache
        rmdir /var/lib/stasis 2>/dev/null || true
    elif [ -d "$CHECKPOINTS" ]; then
        log "checkpoints kept in $CHECKPOINTS (--purge removes them)"
    fi
    log "uninstalled"
    exit 0
fi

# -- packages, CRIU, containerd (not in --node mode) -----------------------------------
if [ "$NODE" = 0 ]; then
    missing=()
    # gcc + libc6-dev: the static exec shepherd (shim/bootstrap/shepherd.c) is compiled at install.
    for pkg in runc iptables iproute2 util-linux busybox-static python3-venv gcc libc6-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -q >&2
        apt-get install -y -q "${missing[@]}" >&2
        for pkg in "${missing[@]}"; do record package "$pkg"; done
    fi

    # Newer Debian suites, pinned low: containerd 1.7 and CRIU's source come from there.
    add_newer_suites() {
        local src=/etc/apt/sources.list.d/stasis-newer.sources pin=/etc/apt/preferences.d/stasis-newer
        [ -f "$src" ] && return 0
        printf 'Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: trixie sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
        printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n\nPackage: *\nPin: release n=sid\nPin-Priority: 50\n' >"$pin"
        record file "$src"
        record file "$pin"
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
        make_dir "$PREFIX/src"
        build=$PREFIX/src/criu
        record tree "$PREFIX/src"
        rm -rf "$build" && mkdir -p "$build"
        (cd "$PREFIX/src" && apt-get source -q --download-only criu/sid >&2) || true
        tar -xf "$(ls "$PREFIX"/src/criu_*.orig.tar.* | tail -n1)" -C "$build" --strip-components=1
        make -C "$build" -j"$(nproc)" criu >"$build/build.log" 2>&1 || { tail -n 30 "$build/build.log" >&2; exit 1; }
        [ -e /usr/local/sbin/criu ] || record file /usr/local/sbin/criu
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
        record package containerd
        rm -rf "$tmp"
    fi
else
    command -v runc >/dev/null || log "warning: no runc on this node: containers cannot start"
    criu check 2>&1 | grep -q "Looks good" ||
        log "warning: 'criu check' does not pass on this node: checkpoints will fail (CRIU >= 4.2 needed)"
fi

# -- Stasis itself ----------------------------------------------------------------------
make_dir "$PREFIX"
make_dir "$STATE"
make_dir "$BIN_DIR"
# What is being installed, as one hash: the package sources, or the wheels.
if [ -n "$WHEELS" ]; then
    source_id=$(cd "$WHEELS" && sha256sum -- *.whl | sha256sum | cut -d' ' -f1)
else
    source_id=$(cd "$REPO" && find pyproject.toml shim runtime protos -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z |
        xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
fi
case $REPO in "$PREFIX"/*) record tree "$REPO" ;; esac # the installer image's payload
venv=$PREFIX/venv
record tree "$venv" # Stasis's own, even when an older install.sh made it
if [ "$(cat "$STATE/source.sha256" 2>/dev/null)" = "$source_id" ] &&
    "$venv/bin/python" -c 'import shim.main, runtime.cli.main' 2>/dev/null; then
    log "Stasis in $PREFIX is up to date"
else
    log "installing Stasis into $PREFIX"
    "$venv/bin/python" -c '' 2>/dev/null || python3 -m venv --clear "$venv"
    if [ -n "$WHEELS" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index \
            --find-links "$WHEELS" stasis >&2
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index \
            --find-links "$WHEELS" --force-reinstall --no-deps stasis >&2
    else
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$REPO" >&2
        # The same version number with other sources: pip would keep the old files.
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall \
            --no-deps "$REPO" >&2
    fi
    # The fast shim launcher and the static exec shepherd, built beside the venv's python.
    "$venv/bin/python" -m shim.bootstrap.launcher "$venv/bin" >/dev/null
    printf '%s\n' "$source_id" >"$STATE/source.sha256"
fi
record file "$STATE/source.sha256"
if [ ! -x "$venv/bin/stasis-exec-shepherd" ] && [ -n "$SHEPHERD" ] && [ -f "$SHEPHERD" ]; then
    install -m 0755 "$SHEPHERD" "$venv/bin/stasis-exec-shepherd" # no compiler on this node
fi
put_link "$venv/bin/containerd-shim-stasis-v2" "$BIN_DIR/containerd-shim-stasis-v2"
put_link "$venv/bin/stasis" "$BIN_DIR/stasis"

# -- the node's checkpoint signing key (runtime/store/signing.py) -----------------------------
# Made once; an existing key (a cluster's shared one, say) is never touched or listed.
SIGNING_KEY=${STASIS_SIGNING_KEY_FILE:-/etc/stasis/signing.key}
if [ ! -e "$SIGNING_KEY" ]; then
    keydir=$(dirname "$SIGNING_KEY")
    if [ ! -d "$keydir" ]; then
        make_dir "$(dirname "$keydir")"
        mkdir -m 0700 "$keydir"
        record dir "$keydir"
    fi
    "$venv/bin/stasis" keygen --signing "$SIGNING_KEY" >/dev/null 2>&1
    record key "$SIGNING_KEY"
    record key "$SIGNING_KEY.pub"
    log "created the checkpoint signing key $SIGNING_KEY"
fi

# -- containerd's CRI: the `stasis` runtime handler -------------------------------------
make_dir "$(dirname "$CONFIG")"
confd_existed=0
[ -d "$(dirname "$DROPIN")" ] && confd_existed=1
result=$(configure_containerd configure)
case $result in
present) log "$CONFIG already has a stasis runtime handler: left as it is" ;;
changed | unchanged)
    record config "$CONFIG"
    record file "$DROPIN"
    if [ "$confd_existed" = 0 ]; then record dir "$(dirname "$DROPIN")"; fi
    for f in containerd-config.orig containerd-config.absent containerd-config.written; do
        [ -e "$STATE/$f" ] && record file "$STATE/$f"
    done
    ;;
esac
write_manifest
if [ "$result" = changed ]; then restart_containerd; fi

if [ "$NODE" = 0 ] && ! ctr_ok; then
    start_containerd
fi

if [ "$DEMO" = 1 ]; then
    tmp=$(mktemp -d)
    "$venv/bin/python" "$REPO/tests/bed/images.py" "$tmp" >/dev/null
    ctr --address "$ADDRESS" -n default images import "$tmp/busybox.tar" >/dev/null
    rm -rf "$tmp"
    stasis --address "$ADDRESS" -n default demo --image docker.io/stasis/busybox:test
fi
log "done"
