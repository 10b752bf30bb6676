#!/bin/sh
# The installer image's entrypoint (busybox sh): copies the payload into the host
# (hostPath / at $HOST_ROOT) and runs install.sh --node there, in the host's root,
# with the host's own python3, then stays up; /tmp/stasis-installed marks it Ready.
set -eu
HOST=${HOST_ROOT:-/host}
PREFIX=${STASIS_PREFIX:-/opt/stasis}
STAGE=$PREFIX/installer
log() { echo "[stasis-installer] $*" >&2; }

[ -x "$HOST/bin/sh" ] || { log "the host's root is not mounted at $HOST"; exit 1; }
# The payload, copied only when it differs from what the host has (keeps reruns no-ops).
if ! cmp -s /stasis/payload.sha256 "$HOST$STAGE/payload.sha256" 2>/dev/null; then
    log "copying the payload to $STAGE on the host"
    rm -rf "$HOST$STAGE.new"
    mkdir -p "$HOST$STAGE.new"
    cp -a /stasis/. "$HOST$STAGE.new/"
    rm -rf "$HOST$STAGE"
    mv "$HOST$STAGE.new" "$HOST$STAGE"
fi
# A cluster's shared checkpoint signing key (a Secret mounted at $SIGNING_SECRET_DIR):
# installed as the host's key, 0600 in a 0700 directory, when it differs from it.
SIGNING_KEY=/etc/stasis/signing.key
if [ -n "${SIGNING_SECRET_DIR:-}" ] && [ -f "$SIGNING_SECRET_DIR/signing.key" ]; then
    if ! cmp -s "$SIGNING_SECRET_DIR/signing.key" "$HOST$SIGNING_KEY" 2>/dev/null; then
        log "installing the cluster's signing key as $SIGNING_KEY on the host"
        mkdir -p "$HOST/etc/stasis"
        chmod 0700 "$HOST/etc/stasis"
        (umask 077 && cp "$SIGNING_SECRET_DIR/signing.key" "$HOST$SIGNING_KEY.new")
        chmod 0600 "$HOST$SIGNING_KEY.new"
        mv "$HOST$SIGNING_KEY.new" "$HOST$SIGNING_KEY"
        rm -f "$HOST$SIGNING_KEY.pub" # derived from the old key; `stasis keygen` made it
    fi
fi
chroot "$HOST" /usr/bin/env \
    STASIS_PREFIX="$PREFIX" STASIS_BIN_DIR="${STASIS_BIN_DIR:-/usr/local/bin}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash "$STAGE/install.sh" --node \
    --wheels "$STAGE/wheels" --shepherd "$STAGE/stasis-exec-shepherd" \
    --containerd-config "${CONTAINERD_CONFIG:-/etc/containerd/config.toml}" \
    --address "${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}" \
    --restart-containerd "${STASIS_RESTART_CONTAINERD:-auto}"
touch /tmp/stasis-installed
log "installed; waiting (the pod stays up so that the DaemonSet keeps nodes installed)"
trap 'exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $! || true
done
