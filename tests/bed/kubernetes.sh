#!/usr/bin/env bash
# Builds a single-node Kubernetes 1.20 for the integration tests, without downloads
# from outside Debian: kube-apiserver, kubelet, kube-controller-manager and
# kube-scheduler from bookworm's `kubernetes` source package (1.20.5+really1.20.2,
# full tree with vendor/) built with bookworm's golang-go (1.19), plus etcd 3.4 from
# bookworm's etcd-server .deb (unpacked, so no etcd service is ever installed), all
# into $CACHE/kubernetes-1.20/bin/. Installs what the cluster needs at run time
# (containernetworking-plugins for the CNI bridge, iptables, conntrack, socat).
#
# Called by tests/bed/setup.sh (step "kubernetes"); runs alone too (as root).
# Idempotent: skips the build when the binaries are in the cache (first run ~8 min
# on 2 cores, then seconds).
set -euo pipefail

CACHE=${STASIS_CACHE:-/var/cache/stasis-testbed}
K8S_SUITE=bookworm
K8S_UPSTREAM=1.20.5+really1.20.2 # Debian's upstream version; the code is 1.20.2
K8S_GIT_VERSION=v1.20.2
DEST=$CACHE/kubernetes-1.20
BIN=$DEST/bin
SRCDIR=$CACHE/src
BUILD=$CACHE/kubernetes-build
COMPONENTS=(kube-apiserver kubelet kube-controller-manager kube-scheduler)

# Needed when the cluster runs (the CNI plugins land in /usr/lib/cni, the bin_dir
# containerd 1.7's CRI plugin uses).
RUNTIME_PACKAGES=(containernetworking-plugins iptables conntrack socat iproute2 openssl jq)
# Needed only to build.
BUILD_PACKAGES=(golang-go rsync jq make dpkg-dev golang-github-modern-go-reflect2-dev)

export DEBIAN_FRONTEND=noninteractive

log() { printf '[kubernetes] %s\n' "$*" >&2; }
die() { printf '[kubernetes] ERROR: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -q >&2
        APT_UPDATED=1
    fi
}

install_packages() {
    local missing=() p
    for p in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$p")
        fi
    done
    [ "${#missing[@]}" = 0 ] && return 0
    log "installing: ${missing[*]}"
    apt_update_once
    # -t bookworm: the bed also lists trixie and sid (low pins); the build wants
    # bookworm's Go 1.19 and reflect2 1.0.2, whatever the pins say.
    apt-get install -y -q --no-install-recommends -t "$K8S_SUITE" "${missing[@]}" >&2
}

binaries_cached() {
    local c
    for c in "${COMPONENTS[@]}" etcd etcdctl; do
        [ -x "$BIN/$c" ] || return 1
    done
    [ -f "$DEST/.version" ]
}

# etcd 3.4 from bookworm's etcd-server, unpacked (installing it would add a system
# etcd service listening on 2379).
fetch_etcd() {
    local debdir=$CACHE/debs/$K8S_SUITE deb
    mkdir -p "$debdir"
    deb=$(ls "$debdir"/etcd-server_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        apt_update_once
        (cd "$debdir" && apt-get download -q "etcd-server/$K8S_SUITE" >&2)
        deb=$(ls "$debdir"/etcd-server_*.deb | head -n1)
    fi
    rm -rf "$BUILD/etcd"
    mkdir -p "$BUILD"
    dpkg-deb -x "$deb" "$BUILD/etcd"
    install -m 0755 "$BUILD/etcd/usr/bin/etcd" "$BIN.tmp/etcd"
    # etcdctl comes from etcd-client; a small convenience, not needed by the cluster.
    deb=$(ls "$debdir"/etcd-client_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        (cd "$debdir" && apt-get download -q "etcd-client/$K8S_SUITE" >&2)
        deb=$(ls "$debdir"/etcd-client_*.deb | head -n1)
    fi
    dpkg-deb -x "$deb" "$BUILD/etcd"
    install -m 0755 "$BUILD/etcd/usr/bin/etcdctl" "$BIN.tmp/etcdctl"
}

# Vendored modern-go/reflect2 1.0.1 breaks on Go >= 1.18 (kube-apiserver dies with a
# SIGSEGV in map iteration): swap in Debian's 1.0.2 and keep go.mod/modules.txt in
# step so `-mod=vendor` still accepts the tree.
fix_reflect2() {
    local tree=$1 src=/usr/share/gocode/src/github.com/modern-go/reflect2
    [ -f "$src/reflect2.go" ] || die "$src missing (golang-github-modern-go-reflect2-dev)"
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
    cp -a "$src"/. "$tree/vendor/github.com/modern-go/reflect2/"
    rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod" \
        "$tree/vendor/github.com/modern-go/reflect2/go.sum"
    find "$tree/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete
    sed -i 's#^\(\# github.com/modern-go/reflect2 v1.0.1 => github.com/modern-go/reflect2\) v1.0.1$#\1 v1.0.2#' \
        "$tree/vendor/modules.txt"
    sed -i 's#^\(\s*github.com/modern-go/reflect2 =>\s*github.com/modern-go/reflect2\) v1.0.1$#\1 v1.0.2#' \
        "$tree/go.mod"
    grep -q 'reflect2 v1.0.1 => github.com/modern-go/reflect2 v1.0.2' "$tree/vendor/modules.txt" \
        || die "reflect2 fix: vendor/modules.txt not as expected"
    grep -qE 'github.com/modern-go/reflect2 =>\s*github.com/modern-go/reflect2 v1.0.2' "$tree/go.mod" \
        || die "reflect2 fix: go.mod not as expected"
}

build_kubernetes() {
    local orig tree t0 srcs
    orig=$SRCDIR/kubernetes_$K8S_UPSTREAM.orig.tar.gz
    if [ ! -f "$orig" ]; then
        # (Captured first: `grep -q` closing the pipe early would fail it under pipefail.)
        srcs=$(apt-cache showsrc kubernetes 2>/dev/null || true)
        grep -qF "Version: $K8S_UPSTREAM-" <<<"$srcs" || apt_update_once
        mkdir -p "$SRCDIR"
        # Only the orig tarball matters; the Debian part may fail to arrive.
        (cd "$SRCDIR" && apt-get source -q --download-only "kubernetes/$K8S_SUITE" >&2) || true
        [ -f "$orig" ] || die "no $orig from $K8S_SUITE's deb-src (is the bookworm deb-src entry there? see setup.sh)"
    fi
    rm -rf "$BUILD"
    mkdir -p "$BUILD/.go/src/k8s.io"
    tree=$BUILD/kubernetes
    mkdir -p "$tree"
    tar -xzf "$orig" -C "$tree" --strip-components=1
    [ -f "$tree/go.mod" ] && [ -d "$tree/vendor" ] || die "$orig has no go.mod/vendor/"
    fix_reflect2 "$tree"
    ln -s "$tree" "$BUILD/.go/src/k8s.io/kubernetes"
    # No .git in the tarball: give hack/lib/version.sh the version by file.
    cat >"$BUILD/version.env" <<EOF
KUBE_GIT_COMMIT=''
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$K8S_GIT_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
    log "building ${COMPONENTS[*]} (several minutes; log: $BUILD/build.log)"
    t0=$SECONDS
    (
        cd "$BUILD/.go/src/k8s.io/kubernetes"
        export GOPATH=$BUILD/.go GOCACHE=$BUILD/.gocache CGO_ENABLED=0 \
            GOPROXY=off KUBE_GIT_VERSION_FILE=$BUILD/version.env
        make WHAT="${COMPONENTS[*]/#/cmd/}"
    ) >"$BUILD/build.log" 2>&1 || { tail -n 40 "$BUILD/build.log" >&2; die "build failed (log: $BUILD/build.log)"; }
    log "built in $((SECONDS - t0))s"
    for c in "${COMPONENTS[@]}"; do
        install -m 0755 "$tree/_output/local/bin/linux/"*/"$c" "$BIN.tmp/$c" 2>/dev/null \
            || install -m 0755 "$tree/_output/bin/$c" "$BIN.tmp/$c"
    done
}

main() {
    [ "$(id -u)" = 0 ] || die "run as root"
    mkdir -p "$CACHE"
    # Not setup.sh's lock (.lock): setup.sh holds it while it runs this script.
    exec 8>"$CACHE/.lock-kubernetes"
    flock 8

    install_packages "${RUNTIME_PACKAGES[@]}"
    if binaries_cached; then
        log "cached: $(cat "$DEST/.version") in $BIN"
        exit 0
    fi
    install_packages "${BUILD_PACKAGES[@]}"
    rm -rf "$BIN.tmp"
    mkdir -p "$BIN.tmp"
    fetch_etcd
    build_kubernetes
    "$BIN.tmp/kube-apiserver" --version >&2
    # sed reads all of it: with `head -n1` etcd could die of SIGPIPE (pipefail: 141)
    "$BIN.tmp/etcd" --version | sed -n 1p >&2
    rm -rf "$BIN"
    mkdir -p "$DEST"
    mv "$BIN.tmp" "$BIN"
    echo "kubernetes $K8S_GIT_VERSION (debian $K8S_UPSTREAM), $(go version | cut -d' ' -f3)" >"$DEST/.version"
    # The tree and Go cache are ~3 GB; only the binaries are kept.
    rm -rf "$BUILD"
    log "installed into $BIN"
}

main "$@"
