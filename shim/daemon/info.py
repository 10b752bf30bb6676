"""``containerd-shim-stasis-v2 -info``: the answer containerd's runtime introspection reads.

containerd runs the shim binary with ``-info``, the runtime's options (a protobuf Any,
possibly empty) on stdin, and reads a ``containerd.types.RuntimeInfo`` from stdout.
Like containerd's runc shim, the answer carries the shim's name and version, the
options echoed back, and the OCI runtime's features (``runc features``, JSON, in an Any
under runtime-spec's type URL): containerd checks them before it creates containers
with idmapped mounts, and CRI reads them for recursive read-only mounts and user
namespaces. Both the options and runc's answer are read with a size bound; a runc
without ``features`` gives an answer without features, as with the runc shim.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import BinaryIO

from protos.containerd.types import introspection_pb2
from runtime.errors import InvalidArgument
from shim.daemon import runtimeoptions

NAME = "io.containerd.stasis.v2"
# containerd's typeurl registration of runtime-spec's features.Features (JSON-encoded).
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
MAX_OPTIONS = 1 << 20  # runc Options are a few hundred bytes
MAX_FEATURES = 1 << 20  # runc 1.1's `features` prints about 2 KiB
FEATURES_TIMEOUT_S = 10.0


def read_options(stdin: BinaryIO) -> introspection_pb2.RuntimeRequest:
    """The options on stdin (an Any's bytes; empty: none), as a RuntimeRequest."""
    raw = stdin.read(MAX_OPTIONS + 1)
    if len(raw) > MAX_OPTIONS:
        raise InvalidArgument(f"-info: runtime options on stdin exceed {MAX_OPTIONS} bytes")
    req = introspection_pb2.RuntimeRequest()
    if raw:
        try:
            req.options.ParseFromString(raw)
        except Exception as e:  # protobuf's DecodeError
            raise InvalidArgument(
                f"-info: runtime options on stdin are not a protobuf Any: {e}"
            ) from e
    return req


def runc_binary(req: introspection_pb2.RuntimeRequest) -> str:
    """The OCI runtime the options name (BinaryName, read as Create reads it), else runc."""
    name = runtimeoptions.decode(req.options.type_url, req.options.value).binary_name or "runc"
    found = shutil.which(name)
    if found is None:
        raise InvalidArgument(f"-info: OCI runtime {name!r} not found in PATH")
    return found


def features(binary: str) -> bytes | None:
    """``BINARY features`` as compact JSON, or None when the runtime has no such command."""
    try:
        done = subprocess.run(
            [binary, "features"],
            capture_output=True,
            timeout=FEATURES_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"-info: {binary} features: {e}", file=sys.stderr)
        return None
    if done.returncode != 0 or len(done.stdout) > MAX_FEATURES:
        print(f"-info: {binary} features gave no answer", file=sys.stderr)
        return None
    try:
        parsed = json.loads(done.stdout)
    except ValueError as e:
        print(f"-info: {binary} features printed no JSON: {e}", file=sys.stderr)
        return None
    if not isinstance(parsed, dict):
        return None
    return json.dumps(parsed, separators=(",", ":")).encode()


def runtime_info(req: introspection_pb2.RuntimeRequest, version: str) -> bytes:
    """The serialized RuntimeInfo for ``req``."""
    info = introspection_pb2.RuntimeInfo(name=NAME)
    info.version.version = version
    if req.HasField("options"):
        info.options.CopyFrom(req.options)
    feat = features(runc_binary(req))
    if feat is not None:
        info.features.type_url = FEATURES_TYPE_URL
        info.features.value = feat
    return info.SerializeToString()


def main(version: str) -> int:
    """Answer ``-info`` on stdout; a clear error on stderr (exit 1) otherwise."""
    try:
        out = runtime_info(read_options(sys.stdin.buffer), version)
    except InvalidArgument as e:
        print(e, file=sys.stderr)
        return 1
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0
