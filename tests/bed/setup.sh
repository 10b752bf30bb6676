#!/usr/bin/env bash
# Installs the integration test bed: the Debian packages the tests need, two private
# containerd versions (1.7 from trixie, 2.1 from sid, unpacked under the cache, never
# installed system-wide), CRIU built from sid's source as /usr/local/sbin/criu, Go 1.26
# from sid unpacked under the cache, critest/crictl, checkpointctl and containerd 2.3
# built with it, the project's venv and the test images.
#
# Idempotent: every expensive step is skipped when its result is already in the cache
# (${STASIS_CACHE:-/var/cache/stasis-testbed}), so a second run takes seconds.
# Needs root and the Debian apt mirrors (plus PyPI for the venv); cri-tools and
# containerd 2.3 also need their source: the cached tarball, CRI_TOOLS_GIT and
# CONTAINERD_GIT, or the Go module proxy (see go_source_build).
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
# A current Go, unpacked under the cache (bookworm's golang-go 1.19 stays the system Go,
# for the Kubernetes 1.20 build): sid's golang-$GO_VERSION-go and -src.
GO_VERSION=1.26
GO_SUITE=sid
GO=$CACHE/go-$GO_VERSION/usr/lib/go-$GO_VERSION/bin/go
# critest and crictl (CRI validation), built with that Go from a release tree's vendor/.
CRI_TOOLS_VERSION=v1.34.0
CRI_TOOLS_MODULE=sigs.k8s.io/cri-tools
# containerd 2.3, built with that Go from its release tree's vendor/ (no Debian suite
# has 2.2 or later): its CRI asks any runtime type for its features, where 2.1's asks
# runc's only, so critest compares the stasis handler with runc spec for spec.
CONTAINERD_SOURCE_VERSION=v2.3.4
CONTAINERD_SOURCE_SHORT=2.3
CONTAINERD_MODULE=github.com/containerd/containerd/v2
# checkpointctl (checks checkpoint archives), built with that Go from Debian's source
# package and the Go library packages it builds against. sid's revision carries the
# patch dropping olekukonko/tablewriter; the libraries come from trixie, whose
# dependency closure is smaller (and moves less) than sid's.
CHECKPOINTCTL_VERSION=1.3.0
CHECKPOINTCTL_SOURCE=golang-github-checkpoint-restore-checkpointctl
CHECKPOINTCTL_SRC_SUITE=sid
CHECKPOINTCTL_LIBS_SUITE=trixie

APT_PACKAGES=(
    runc iptables busybox-static tmux util-linux procps
    build-essential pkg-config xz-utils dpkg-dev python3 python3-venv
    # CRIU build deps (ENVIRONMENT.md's list, plus libprotobuf-dev for descriptor.proto)
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
    libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev
    uuid-dev libaio-dev
    # a local registry for the CRI restore tests; git for CRI_TOOLS_GIT; bookworm's
    # Go for Kubernetes 1.20
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

# Go $GO_VERSION from $GO_SUITE's packages, unpacked (not installed) into
# $CACHE/go-$GO_VERSION; only the steps below use it, by its path.
step_go() {
    local dest=$CACHE/go-$GO_VERSION debdir=$CACHE/debs/go-$GO_VERSION deb version
    if [ -x "$GO" ] && [ -f "$dest/.version" ]; then
        STEP_RESULT=skipped
        return
    fi
    apt_knows "golang-$GO_VERSION-go" "$GO_SUITE" || apt_update_once
    rm -rf "$debdir"
    mkdir -p "$debdir"
    (cd "$debdir" && apt-get download -q "golang-$GO_VERSION-go/$GO_SUITE" \
        "golang-$GO_VERSION-src/$GO_SUITE" >&2) \
        || die "golang-$GO_VERSION-go/-src not in $GO_SUITE (has it moved on? update GO_VERSION)"
    rm -rf "$dest.tmp" "$dest"
    for deb in "$debdir"/*.deb; do
        dpkg-deb -x "$deb" "$dest.tmp"
    done
    version=$(dpkg-deb -f "$debdir"/golang-"$GO_VERSION"-go_*.deb Version)
    "$dest.tmp/usr/lib/go-$GO_VERSION/bin/go" version | grep -q " go$GO_VERSION" \
        || die "$dest.tmp/usr/lib/go-$GO_VERSION/bin/go does not run or is not Go $GO_VERSION"
    echo "$version" >"$dest.tmp/.version"
    mv "$dest.tmp" "$dest"
    rm -rf "$debdir"
    log "Go $version unpacked into $dest"
}

# Runs the cached Go offline, whatever the caller's Go settings (go.env says auto).
go_offline() {
    env -u GOFLAGS -u GOROOT GOTOOLCHAIN=local GOPROXY=off GOENV=off \
        GOTELEMETRY=off CGO_ENABLED=0 "$GO" "$@"
}

# Builds critest and crictl in the cri-tools tree DIR as its Makefile does (GOFLAGS
# -trimpath, CGO off, the version linked in); MODE is vendor (offline) or mod.
cri_tools_build() {
    local dir=$1 mode=$2 ldflags="-X $CRI_TOOLS_MODULE/pkg/version.Version=${CRI_TOOLS_VERSION#v}"
    (cd "$dir" && GO111MODULE=on GOCACHE="$dir/.gocache" \
        go_offline test -mod="$mode" -trimpath -c -o critest -ldflags "$ldflags" ./cmd/critest \
        && GO111MODULE=on GOCACHE="$dir/.gocache" \
            go_offline build -mod="$mode" -trimpath -o crictl -ldflags "$ldflags" ./cmd/crictl) \
        >"$dir/build.log" 2>&1
}

# Builds containerd, ctr and containerd-shim-runc-v2 in the containerd tree DIR as its
# Makefile does (the version and revision linked in, the shim without gRPC); CGO off,
# which leaves out only the btrfs snapshotter the bed does not use.
containerd_build() {
    local dir=$1 mode=$2 pkg=$CONTAINERD_MODULE/version ldflags
    ldflags="-X $pkg.Version=$CONTAINERD_SOURCE_VERSION -X $pkg.Revision=$CONTAINERD_SOURCE_VERSION"
    ldflags+=" -X $pkg.Package=$CONTAINERD_MODULE"
    (cd "$dir" && GO111MODULE=on GOCACHE="$dir/.gocache" \
        go_offline build -mod="$mode" -trimpath -tags urfave_cli_no_docs -ldflags "$ldflags" \
            -o bin/ ./cmd/containerd ./cmd/ctr \
        && GO111MODULE=on GOCACHE="$dir/.gocache" \
            go_offline build -mod="$mode" -trimpath -tags "urfave_cli_no_docs no_grpc" \
                -ldflags "$ldflags" -o bin/ ./cmd/containerd-shim-runc-v2) \
        >"$dir/build.log" 2>&1
}

# Module mode through the Go module proxy ($GOPROXY, else proxy.golang.org): MODULE at
# VERSION and its dependencies into the temporary BUILD (module zips leave out vendor/,
# so nothing here goes into the cache's source tarball), built there by BUILD_FN DIR
# mod. Fails quietly when the proxy is unreachable.
go_from_proxy() {
    local build=$1 module=$2 version=$3 build_fn=$4 proxy=${GOPROXY:-https://proxy.golang.org}
    local json= dir=
    # (the read-only module cache goes with $build: root's rm -rf removes it)
    local -x GOMODCACHE=$build/modcache
    # (its errors are in the JSON it prints)
    json=$(cd "$build" && timeout 600 env GOPROXY="$proxy" GOFLAGS=-mod=mod \
        GOTOOLCHAIN=local GOENV=off "$GO" mod download -json \
        "$module@$version" 2>>"$build/proxy.log") \
        || { printf '%s\n' "$json" >>"$build/proxy.log"; return 1; }
    dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<<"$json")
    [ -n "$dir" ] && [ -d "$dir" ] || return 1
    cp -r "$dir" "$build/tree"
    chmod -R u+w "$build/tree"
    # The dependencies, through the proxy (go_offline says GOPROXY=off).
    (cd "$build/tree" && timeout 600 env -u GOFLAGS GOPROXY="$proxy" GOTOOLCHAIN=local \
        GOENV=off "$GO" mod download) >>"$build/proxy.log" 2>&1 || return 1
    "$build_fn" "$build/tree" mod
}

# Builds NAME at tag VERSION of Go module MODULE with BUILD_FN DIR MODE, from the first
# source there is: the cached source tarball $CACHE/src/NAME-VERSION.tar.gz, the git
# dir in GIT_VAR (the tag archived into that tarball), the Go module proxy. Sets
# BUILT_TREE to the built tree, under a temporary directory the caller removes with its
# parent; on no source at all, warns (naming the variable that would help), returns 1.
go_source_build() {
    local name=$1 version=$2 module=$3 git_var=$4 build_fn=$5
    local git_dir=${!git_var:-} src=$CACHE/src/$1-$2.tar.gz build tree
    mkdir -p "$CACHE/src"
    if [ ! -f "$src" ] && [ -n "$git_dir" ]; then
        if git -C "$git_dir" archive --format=tar.gz --prefix="$name-$version/" \
            -o "$src.tmp" "$version" >&2; then
            mv "$src.tmp" "$src"
            log "archived $version of $git_dir into $src"
        else
            rm -f "$src.tmp"
            log "WARNING: $git_var=$git_dir has no tag $version"
        fi
    fi
    build=$(mktemp -d)
    if [ -f "$src" ]; then
        tar -xzf "$src" -C "$build"
        tree=$build/$name-$version
        [ -d "$tree/vendor" ] || die "$src has no $name-$version/vendor/: remove it and rerun"
        log "building $name $version from $src"
        if ! "$build_fn" "$tree" vendor; then
            tail -n 20 "$tree/build.log" >&2
            rm -rf "$build"
            die "$name $version did not build from $src"
        fi
    else
        log "no $src and no $git_var: trying the Go module proxy"
        tree=$build/tree
        if ! go_from_proxy "$build" "$module" "$version" "$build_fn"; then
            tail -n 5 "$build/proxy.log" "$tree/build.log" >&2 2>/dev/null || true
            rm -rf "$build"
            log "WARNING: $name $version NOT BUILT: no source tarball $src, no $git_var," \
                "and no module-mode build through the Go module proxy" \
                "(${GOPROXY:-https://proxy.golang.org}; its log's tail is above)." \
                "Rerun with $git_var=<a git dir of $module holding tag $version>, or put" \
                "its release source tree (with vendor/) at $src (top directory" \
                "$name-$version/). The tests that need it FAIL until then."
            return 1
        fi
    fi
    BUILT_TREE=$tree
}

# critest and crictl $CRI_TOOLS_VERSION into $CACHE/cri-tools-$CRI_TOOLS_VERSION
# (sources: go_source_build, CRI_TOOLS_GIT).
step_cri_tools() {
    local dest=$CACHE/cri-tools-$CRI_TOOLS_VERSION tree
    if [ -x "$dest/critest" ] && [ -x "$dest/crictl" ]; then
        STEP_RESULT=skipped
        return
    fi
    if ! go_source_build cri-tools "$CRI_TOOLS_VERSION" "$CRI_TOOLS_MODULE" CRI_TOOLS_GIT \
        cri_tools_build; then
        STEP_RESULT=failed
        return
    fi
    tree=$BUILT_TREE
    "$tree/critest" --help >/dev/null 2>&1 || die "the built critest does not run (--help)"
    "$tree/crictl" --version | grep -qF "${CRI_TOOLS_VERSION#v}" \
        || die "the built crictl is not ${CRI_TOOLS_VERSION#v}"
    rm -rf "$dest.tmp" "$dest"
    mkdir -p "$dest.tmp"
    install -m 0755 "$tree/critest" "$tree/crictl" "$dest.tmp/"
    rm -rf "$(dirname "$tree")"
    mv "$dest.tmp" "$dest"
    log "critest and crictl $CRI_TOOLS_VERSION built into $dest"
}

# containerd $CONTAINERD_SOURCE_VERSION into $CACHE/containerd-$CONTAINERD_SOURCE_SHORT,
# laid out as the .debs are (usr/bin/, .version); sources: go_source_build,
# CONTAINERD_GIT.
step_containerd_source() {
    local dest=$CACHE/containerd-$CONTAINERD_SOURCE_SHORT tree
    local version=${CONTAINERD_SOURCE_VERSION#v}
    if [ -x "$dest/usr/bin/containerd" ] && [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ]; then
        STEP_RESULT=skipped
        return
    fi
    if ! go_source_build containerd "$CONTAINERD_SOURCE_VERSION" "$CONTAINERD_MODULE" \
        CONTAINERD_GIT containerd_build; then
        STEP_RESULT=failed
        return
    fi
    tree=$BUILT_TREE
    "$tree/bin/containerd" --version | grep -qF "$CONTAINERD_SOURCE_VERSION" \
        || die "the built containerd is not $CONTAINERD_SOURCE_VERSION"
    rm -rf "$dest.tmp" "$dest"
    mkdir -p "$dest.tmp/usr/bin"
    install -m 0755 "$tree/bin/containerd" "$tree/bin/ctr" "$tree/bin/containerd-shim-runc-v2" \
        "$dest.tmp/usr/bin/"
    echo "$version" >"$dest.tmp/.version"
    rm -rf "$(dirname "$tree")"
    mv "$dest.tmp" "$dest"
    log "containerd $version built into $dest"
}

# checkpointctl $CHECKPOINTCTL_VERSION into $CACHE/checkpointctl-$CHECKPOINTCTL_VERSION,
# as dh-golang builds Debian's package: the source package's orig tarball with its
# debian/patches applied, in a GOPATH (GO111MODULE=off) made of the golang-*-dev
# packages its Build-Depends need (tests/bed/debian_go_deps.py), unpacked, not
# installed. The source files are kept in $CACHE/src.
step_checkpointctl() {
    local dest=$CACHE/checkpointctl-$CHECKPOINTCTL_VERSION srcdir=$CACHE/src
    local orig debian build gopath tree index indexes=() patch deb
    if [ -x "$dest/checkpointctl" ]; then
        STEP_RESULT=skipped
        return
    fi
    mkdir -p "$srcdir"
    orig=$srcdir/${CHECKPOINTCTL_SOURCE}_$CHECKPOINTCTL_VERSION+ds1.orig.tar.xz
    debian=$(ls "$srcdir/${CHECKPOINTCTL_SOURCE}_$CHECKPOINTCTL_VERSION"+ds1-*.debian.tar.xz \
        2>/dev/null | tail -n1 || true)
    if [ ! -f "$orig" ] || [ -z "$debian" ]; then
        apt_knows_source "$CHECKPOINTCTL_SOURCE" "$CHECKPOINTCTL_VERSION+ds1" || apt_update_once
        # The .dsc may 404; the two tarballs are all the build needs.
        (cd "$srcdir" && apt-get source -q --download-only \
            "$CHECKPOINTCTL_SOURCE/$CHECKPOINTCTL_SRC_SUITE" >&2) || true
        rm -f "$srcdir/$CHECKPOINTCTL_SOURCE"_*.dsc
        debian=$(ls "$srcdir/${CHECKPOINTCTL_SOURCE}_$CHECKPOINTCTL_VERSION"+ds1-*.debian.tar.xz \
            2>/dev/null | tail -n1 || true)
        [ -f "$orig" ] && [ -n "$debian" ] || die "no $CHECKPOINTCTL_SOURCE" \
            "$CHECKPOINTCTL_VERSION+ds1 orig and debian tarballs from $CHECKPOINTCTL_SRC_SUITE" \
            "(has it moved on? update CHECKPOINTCTL_VERSION; ls $srcdir)"
    fi
    build=$(mktemp -d)
    gopath=$build/usr/share/gocode
    tree=$gopath/src/github.com/checkpoint-restore/checkpointctl
    mkdir -p "$tree"
    tar -xf "$orig" -C "$tree" --strip-components=1
    tar -xf "$debian" -C "$tree"
    if [ -f "$tree/debian/patches/series" ]; then
        while read -r patch; do
            case "$patch" in '' | '#'*) continue ;; esac
            patch -d "$tree" -p1 -s <"$tree/debian/patches/$patch" \
                || die "debian/patches/$patch does not apply to $orig"
        done <"$tree/debian/patches/series"
    fi
    apt_knows golang-github-containers-storage-dev "$CHECKPOINTCTL_LIBS_SUITE" || apt_update_once
    while read -r index; do
        /usr/lib/apt/apt-helper cat-file "$index" >"$build/Packages.${#indexes[@]}"
        indexes+=("$build/Packages.${#indexes[@]}")
    done < <(apt-get indextargets --format '$(FILENAME)' 'Identifier: Packages' \
        "Codename: $CHECKPOINTCTL_LIBS_SUITE" "Architecture: $(dpkg --print-architecture)")
    [ "${#indexes[@]}" -gt 0 ] || die "no $CHECKPOINTCTL_LIBS_SUITE Packages index (apt-get update?)"
    "$PYTHON" "$REPO/tests/bed/debian_go_deps.py" "$tree/debian/control" "${indexes[@]}" \
        >"$build/libs.txt" || die "the Build-Depends of $CHECKPOINTCTL_SOURCE do not resolve"
    mkdir -p "$build/debs"
    log "downloading $(wc -l <"$build/libs.txt") Go library packages from $CHECKPOINTCTL_LIBS_SUITE"
    # shellcheck disable=SC2046 # one NAME=VERSION per line, no spaces
    (cd "$build/debs" && apt-get download -q $(cat "$build/libs.txt") >&2) \
        || die "apt-get download of $CHECKPOINTCTL_SOURCE's Go libraries failed"
    for deb in "$build"/debs/*.deb; do
        dpkg-deb -x "$deb" "$build"
    done
    if ! (cd "$tree" && GO111MODULE=off GOPATH="$gopath" GOCACHE="$build/.gocache" \
        go_offline build -o checkpointctl \
        -ldflags "-X main.name=checkpointctl -X main.version=$CHECKPOINTCTL_VERSION" . \
        >"$build/build.log" 2>&1); then
        tail -n 20 "$build/build.log" >&2
        rm -rf "$build"
        die "checkpointctl $CHECKPOINTCTL_VERSION did not build"
    fi
    "$tree/checkpointctl" --version | grep -qF "version $CHECKPOINTCTL_VERSION" \
        || die "the built checkpointctl does not say version $CHECKPOINTCTL_VERSION"
    rm -rf "$dest.tmp" "$dest"
    mkdir -p "$dest.tmp"
    install -m 0755 "$tree/checkpointctl" "$dest.tmp/checkpointctl"
    rm -rf "$build"
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
    "$venv/bin/python" -m shim.bootstrap.launcher "$venv/bin" >/dev/null
}

step_images() {
    local out=$CACHE/images stamp want
    stamp=$out/.stamp
    want=$(cat "$REPO/tests/bed/images.py" "$REPO/packaging/installer/ociimage.py" /bin/busybox \
        | sha256sum | cut -d' ' -f1)
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
step "go" step_go
step "cri-tools" step_cri_tools
step "containerd source" step_containerd_source
step "checkpointctl" step_checkpointctl
step "proto sources" step_proto_sources
step "venv" step_venv
step "images" step_images
step "critest images" step_critest_images
step "kubernetes" step_kubernetes
log "test bed ready in $CACHE"
