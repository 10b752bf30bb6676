#!/usr/bin/env bash
# Installs the integration test bed: the Debian packages the tests need, two private
# containerd versions (1.7 from trixie, 2.1 from sid, unpacked under the cache, never
# installed system-wide), CRIU built from sid's source as /usr/local/sbin/criu, the
# project's venv and the test images.
#
# Idempotent: every expensive step is skipped when its result is already in the cache
# (${STASIS_CACHE:-/var/cache/stasis-testbed}), so a second run takes seconds.
# Needs root and the Debian apt mirrors (plus PyPI for the venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${STASIS_CACHE:-/var/cache/stasis-testbed}
PYTHON=${PYTHON:-python3}

# What the bed pins. The directory names (containerd-1.7, containerd-2.1, criu-4.2.1)
# are the contract with tests/bed/containerd.py; a suite moving to another release
# makes the step fail loudly rather than fill the directory with something else.
CONTAINERD_VERSIONS=("1.7:trixie" "2.1:sid")
CRIU_VERSION=4.2.1
CRIU_SUITE=sid
# checkpointctl (checks checkpoint archives): the newest tag whose go.mod (go 1.18) and
# vendor/ build offline with bookworm's Go 1.19; later tags need Go >= 1.21.
CHECKPOINTCTL_VERSION=v1.1.0
CHECKPOINTCTL_URL=https://github.com/checkpoint-restore/checkpointctl

APT_PACKAGES=(
    runc iptables busybox-static tmux util-linux procps
    build-essential pkg-config xz-utils dpkg-dev python3 python3-venv
    # CRIU build deps (ENVIRONMENT.md's list, plus libprotobuf-dev for descriptor.proto)
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
    libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev
    uuid-dev libaio-dev
    # a local registry for the CRI restore tests; Go and git for checkpointctl
    docker-registry golang-go git
)

SOURCES_FILE=/etc/apt/sources.list.d/stasis-testbed.sources
PREFS_FILE=/etc/apt/preferences.d/stasis-testbed

SOURCES_CONTENT='Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'

PREFS_CONTENT='Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=sid
Pin-Priority: 50'

export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%7.1fs", b - a }'; }

TIMINGS=()
# step NAME FUNCTION: runs FUNCTION and records how long it took and what it did
# (FUNCTION sets STEP_RESULT to "skipped" when the cache already had its result).
step() {
    local name=$1 fn=$2 t0
    STEP_RESULT=done
    t0=$(date +%s.%N)
    log "== $name"
    "$fn"
    TIMINGS+=("$(printf '%-18s %s  %s' "$name" "$(elapsed "$t0" "$(date +%s.%N)")" "$STEP_RESULT")")
}

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -q >&2
        APT_UPDATED=1
    fi
}

# --- steps -----------------------------------------------------------------------

# Writes FILE with CONTENT (plus a final newline) unless it already holds exactly that.
# Returns 0 when it wrote.
write_if_changed() {
    local file=$1 content=$2
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then
        return 1
    fi
    mkdir -p "$(dirname "$file")"
    printf '%s\n' "$content" >"$file.tmp"
    mv "$file.tmp" "$file"
    log "wrote $file"
    return 0
}

step_apt_sources() {
    local wrote=0
    write_if_changed "$SOURCES_FILE" "$SOURCES_CONTENT" && wrote=1
    write_if_changed "$PREFS_FILE" "$PREFS_CONTENT" && wrote=1
    if [ "$wrote" = 1 ]; then
        apt_update_once
    else
        STEP_RESULT=skipped
    fi
}

step_apt_install() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" = 0 ]; then
        STEP_RESULT=skipped
        return
    fi
    log "installing: ${missing[*]}"
    apt_update_once
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# True when apt's lists have PACKAGE from SUITE (else they predate the sources file).
# (Output captured first: `grep -q` closing the pipe early would fail it under pipefail.)
apt_knows() {
    local pkg=$1 suite=$2 policy
    policy=$(apt-cache policy "$pkg" 2>/dev/null)
    grep -qE "^ +[0-9]+ .* $suite/main " <<<"$policy"
}

# True when apt's source lists have source PACKAGE at upstream VERSION.
apt_knows_source() {
    local pkg=$1 version=$2 srcs
    srcs=$(apt-cache showsrc "$pkg" 2>/dev/null)
    grep -qF "Version: $version-" <<<"$srcs"
}

step_containerd() {
    local did=0 entry short suite dest debdir deb version
    for entry in "${CONTAINERD_VERSIONS[@]}"; do
        short=${entry%%:*}
        suite=${entry#*:}
        dest=$CACHE/containerd-$short
        if [ -x "$dest/usr/bin/containerd" ] && [ -f "$dest/.version" ]; then
            log "containerd $short: cached ($(cat "$dest/.version"))"
            continue
        fi
        did=1
        apt_knows containerd "$suite" || apt_update_once
        debdir=$CACHE/debs/$suite
        rm -rf "$debdir"
        mkdir -p "$debdir"
        (cd "$debdir" && apt-get download -q "containerd/$suite" >&2)
        deb=$(ls "$debdir"/containerd_*.deb)
        version=$(dpkg-deb -f "$deb" Version)
        case "$version" in
            "$short".*) ;;
            *) die "containerd in $suite is $version, not $short.x: update CONTAINERD_VERSIONS" ;;
        esac
        rm -rf "$dest.tmp" "$dest"
        dpkg-deb -x "$deb" "$dest.tmp"
        echo "$version" >"$dest.tmp/.version"
        mv "$dest.tmp" "$dest"
        log "containerd $short: $version unpacked into $dest"
        "$dest/usr/bin/containerd" --version >&2
    done
    [ "$did" = 1 ] || STEP_RESULT=skipped
}

criu_looks_good() {
    local out
    out=$(/usr/local/sbin/criu check 2>&1) || true
    if ! grep -q 'Looks good.' <<<"$out"; then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

step_criu() {
    local src=$CACHE/criu-$CRIU_VERSION srcdir=$CACHE/src orig did=0
    if [ ! -x "$src/criu/criu" ]; then
        did=1
        orig=$(ls "$srcdir"/criu_"$CRIU_VERSION".orig.tar.* 2>/dev/null | head -n1 || true)
        if [ -z "$orig" ]; then
            apt_knows_source criu "$CRIU_VERSION" || apt_update_once
            mkdir -p "$srcdir"
            # The .debian.tar.xz may 404; the orig tarball is all the build needs.
            (cd "$srcdir" && apt-get source -q --download-only "criu/$CRIU_SUITE" >&2) || true
            orig=$(ls "$srcdir"/criu_"$CRIU_VERSION".orig.tar.* 2>/dev/null | head -n1 || true)
            [ -n "$orig" ] || die "no criu_$CRIU_VERSION.orig tarball from $CRIU_SUITE (has $CRIU_SUITE moved on? ls $srcdir)"
        fi
        rm -rf "$src" "$src.tmp"
        mkdir -p "$src.tmp"
        tar -xf "$orig" -C "$src.tmp" --strip-components=1
        mv "$src.tmp" "$src"
        log "building CRIU $CRIU_VERSION in $src"
        make -C "$src" -j"$(nproc)" criu >"$src/build.log" 2>&1 \
            || { tail -n 40 "$src/build.log" >&2; die "CRIU build failed (log: $src/build.log)"; }
    fi
    if ! cmp -s "$src/criu/criu" /usr/local/sbin/criu; then
        did=1
        install -D -m 0755 "$src/criu/criu" /usr/local/sbin/criu
        log "installed /usr/local/sbin/criu"
    fi
    /usr/local/sbin/criu --version | grep -q "Version: $CRIU_VERSION" \
        || die "/usr/local/sbin/criu is not $CRIU_VERSION"
    criu_looks_good || die "criu check does not say 'Looks good.'"
    [ "$did" = 1 ] || STEP_RESULT=skipped
}

# Kept in the cache only (not installed into /usr/lib/criu) for the GPU work to carry.
step_criu_cuda_plugin() {
    local src=$CACHE/criu-$CRIU_VERSION
    if [ -f "$src/plugins/cuda/cuda_plugin.so" ]; then
        STEP_RESULT=skipped
        return
    fi
    if ! make -C "$src" -j"$(nproc)" cuda_plugin >"$src/cuda_plugin.log" 2>&1; then
        tail -n 20 "$src/cuda_plugin.log" >&2
        log "WARNING: CRIU cuda_plugin did not build (log: $src/cuda_plugin.log); not needed without a GPU"
        STEP_RESULT=failed
    fi
}

# checkpointctl from its own vendor/ (no module downloads): the source tarball is kept
# in the cache ($CACHE/src/checkpointctl-<tag>.tar.gz). Without it, a git clone of
# $CHECKPOINTCTL_GIT (a local clone or mirror, if set) or of GitHub provides it. Not
# fatal: the tests that need checkpointctl skip, saying why, when it is missing.
step_checkpointctl() {
    local dest=$CACHE/checkpointctl-$CHECKPOINTCTL_VERSION
    local src=$CACHE/src/checkpointctl-$CHECKPOINTCTL_VERSION.tar.gz build
    if [ -x "$dest/checkpointctl" ]; then
        STEP_RESULT=skipped
        return
    fi
    mkdir -p "$CACHE/src"
    if [ ! -f "$src" ]; then
        local git_dir=${CHECKPOINTCTL_GIT:-} clone=
        if [ -z "$git_dir" ]; then
            clone=$(mktemp -d)
            git_dir=$clone/checkpointctl
            git clone -q --bare --depth 1 --branch "$CHECKPOINTCTL_VERSION" \
                "$CHECKPOINTCTL_URL" "$git_dir" >&2 || true
        fi
        git -C "$git_dir" archive --format=tar.gz --prefix=checkpointctl/ \
            -o "$src.tmp" "$CHECKPOINTCTL_VERSION" >&2 && mv "$src.tmp" "$src" || rm -f "$src.tmp"
        [ -z "$clone" ] || rm -rf "$clone"
        if [ ! -f "$src" ]; then
            log "WARNING: no checkpointctl $CHECKPOINTCTL_VERSION source (offline? set CHECKPOINTCTL_GIT to a clone); its tests will skip"
            STEP_RESULT=failed
            return
        fi
    fi
    build=$(mktemp -d)
    tar -xzf "$src" -C "$build" --strip-components=1
    if ! (cd "$build" && GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 \
        GOCACHE="$build/.gocache" go build -o checkpointctl . >"$build/build.log" 2>&1); then
        tail -n 20 "$build/build.log" >&2
        rm -rf "$build"
        die "checkpointctl $CHECKPOINTCTL_VERSION did not build"
    fi
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    install -m 0755 "$build/checkpointctl" "$dest.tmp/checkpointctl"
    rm -rf "$build" "$dest"
    mv "$dest.tmp" "$dest"
    log "checkpointctl $CHECKPOINTCTL_VERSION built into $dest"
}

step_proto_sources() {
    if [ -f "$REPO/tests/bed/proto_sources.sh" ]; then
        bash "$REPO/tests/bed/proto_sources.sh"
    else
        STEP_RESULT=absent
    fi
}

step_venv() {
    local venv=$REPO/.venv stamp want
    if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c '' 2>/dev/null; then
        log "$venv is broken (its interpreter does not run): recreating"
        rm -rf "$venv"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    # Reinstall only when pyproject.toml changed since the last install into this venv.
    stamp=$venv/.stasis-setup-stamp
    want=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        STEP_RESULT=skipped
    else
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test]" >&2
        echo "$want" >"$stamp"
    fi
    # containerd runs the shim binary twice per container: replace pip's console
    # script with the isolated launcher (cheap, so always rewritten).
    "$venv/bin/python" -m shim.launcher "$venv/bin" >/dev/null
}

step_images() {
    local out=$CACHE/images stamp want
    stamp=$out/.stamp
    want=$(cat "$REPO/tests/bed/images.py" /bin/busybox | sha256sum | cut -d' ' -f1)
    if [ -f "$out/busybox.tar" ] && [ -f "$out/pause.tar" ] && [ -f "$stamp" ] \
        && [ "$(cat "$stamp")" = "$want" ]; then
        STEP_RESULT=skipped
        return
    fi
    "$REPO/.venv/bin/python" "$REPO/tests/bed/images.py" "$out"
    echo "$want" >"$stamp"
}

# The images the CRI conformance suite (critest) pulls, rebuilt offline by
# tests/bed/critest_images.py from Debian's busybox and nginx binaries (their .debs kept
# in the cache, never installed: nginx would start a server) and procps/util-linux tools.
step_critest_images() {
    local debdir=$CACHE/debs/critest out=$CACHE/images/critest pkg before
    local -A debs=()
    for pkg in nginx busybox; do
        debs[$pkg]=$(ls "$debdir/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        if [ -z "${debs[$pkg]}" ]; then
            apt_knows "$pkg" bookworm || apt_update_once
            mkdir -p "$debdir"
            (cd "$debdir" && apt-get download -q "$pkg/bookworm" >&2)
            debs[$pkg]=$(ls "$debdir/${pkg}"_*.deb | head -n1)
        fi
    done
    before=$(cat "$out/.stamp" 2>/dev/null || true)
    "$REPO/.venv/bin/python" "$REPO/tests/bed/critest_images.py" "$out" \
        --nginx-deb "${debs[nginx]}" --busybox-deb "${debs[busybox]}" >/dev/null
    [ "$before" != "$(cat "$out/.stamp")" ] || STEP_RESULT=skipped
}

# A single-node Kubernetes 1.20 (tests/bed/kube.py): its own script, cached the same way.
step_kubernetes() {
    [ -f "$CACHE/kubernetes-1.20/.version" ] && STEP_RESULT=skipped
    bash "$REPO/tests/bed/kubernetes.sh"
}

# --- main --------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and /usr/local/sbin/criu)"
mkdir -p "$CACHE"
# One setup at a time per cache (two CI jobs on one machine would race otherwise).
exec 9>"$CACHE/.lock"
flock 9

T_START=$(date +%s.%N)
print_timings() {
    local t
    log "timings:"
    for t in "${TIMINGS[@]}"; do log "  $t"; done
    log "$(printf '  %-18s %s' total "$(elapsed "$T_START" "$(date +%s.%N)")")"
}
trap print_timings EXIT
step "apt sources" step_apt_sources
step "apt install" step_apt_install
step "containerd" step_containerd
step "criu" step_criu
step "criu cuda_plugin" step_criu_cuda_plugin
step "checkpointctl" step_checkpointctl
step "proto sources" step_proto_sources
step "venv" step_venv
step "images" step_images
step "critest images" step_critest_images
step "kubernetes" step_kubernetes
log "test bed ready in $CACHE"
