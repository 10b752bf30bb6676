#!/usr/bin/env bash
# Fetch the reference .proto files that tests/unit/test_proto_conformance.py
# compares our protos/containerd/** against, and the CRI api.proto that
# tests/bed/cri.py compiles.
#
# Each reference Debian package is downloaded with `apt-get download` and
# unpacked with `dpkg-deb -x` into
#     ${STASIS_CACHE:-/var/cache/stasis-testbed}/proto-sources/<name>/
# and a <name>/.package file records what was extracted. A <name> that already
# has its .package file is left alone, so the script is idempotent; delete the
# directory to refresh it.
#
# Needs the bookworm, trixie and sid suites in the apt sources (tests/bed/setup.sh
# configures them, pinned low so nothing gets installed from trixie/sid).
set -euo pipefail

CACHE="${STASIS_CACHE:-/var/cache/stasis-testbed}/proto-sources"

# <name>  <package>/<suite>
SOURCES=(
	# containerd 1.6: runtime/v2/task/shim.proto, api/**, runtime/v2/runc/options
	"containerd-bookworm golang-github-containerd-containerd-dev/bookworm"
	# containerd 2.x: the api module (api/runtime/task/v2/shim.proto, api/types/**)
	# is packaged separately from the rest.
	"containerd-sid golang-github-containerd-containerd-dev/sid"
	"containerd-api-sid golang-github-containerd-containerd-api-dev/sid"
	# ttrpc request.proto (and its stub proto/status.proto)
	"ttrpc-trixie golang-github-containerd-ttrpc-dev/trixie"
	# cgroups 1.0 (stats/v1, v2/stats; gogo) and 3.x (cgroup1/stats, cgroup2/stats)
	"cgroups-bookworm golang-github-containerd-cgroups-dev/bookworm"
	"cgroups-sid golang-github-containerd-cgroups-dev/sid"
	# gogoproto/gogo.proto, imported by the 1.6 and cgroups 1.0 files
	"gogo-protobuf-bookworm golang-github-gogo-protobuf-dev/bookworm"
	# CRI runtime/v1 api.proto, for the CRI client of the Kubernetes tests
	# (tests/bed/cri.py; containerd 1.7 serves v1 beside kubelet 1.20's v1alpha2).
	# Not packaged in bookworm; trixie's 0.32 has v1 only. cri.py takes v1alpha2
	# from containerd-sid's third_party/k8s.io/cri-api.
	"cri-api-trixie golang-github-kubernetes-cri-api-dev/trixie"
)

updated=0
download() { # <pkg/suite> <dir>: download into <dir>, updating the lists once on failure
	local spec=$1 dir=$2
	if (cd "$dir" && apt-get -q -o APT::Sandbox::User=root download "$spec" >/dev/null); then
		return 0
	fi
	if [[ $updated -eq 0 ]]; then
		updated=1
		echo "proto_sources: apt-get download $spec failed; running apt-get update" >&2
		apt-get -q update >/dev/null
		(cd "$dir" && apt-get -q -o APT::Sandbox::User=root download "$spec" >/dev/null) && return 0
	fi
	echo "proto_sources: cannot download $spec (is the ${spec#*/} suite in the apt sources?)" >&2
	return 1
}

mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for entry in "${SOURCES[@]}"; do
	name=${entry%% *}
	spec=${entry#* }
	dest="$CACHE/$name"
	if [[ -f "$dest/.package" ]]; then
		echo "proto_sources: $name: have $(cat "$dest/.package")"
		continue
	fi
	work="$tmp/$name"
	mkdir -p "$work/dl" "$work/root"
	download "$spec" "$work/dl"
	deb=$(find "$work/dl" -maxdepth 1 -name '*.deb' -print -quit)
	dpkg-deb -x "$deb" "$work/root"
	basename "$deb" >"$work/root/.package"
	rm -rf "$dest"
	mv "$work/root" "$dest"
	echo "proto_sources: $name: extracted $(cat "$dest/.package")"
done
