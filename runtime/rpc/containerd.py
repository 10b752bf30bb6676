"""A small client of containerd's gRPC API: what the stasis CLI needs to find a
container's shim (its spec and runtime) and image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runtime.errors import Code, InvalidArgument, NotFound, StasisError, Unavailable

NAMESPACE_KEY = "containerd-namespace"


@dataclass(frozen=True)
class ContainerInfo:
    """What containerd records of a container."""

    id: str
    image: str
    runtime: str
    spec: dict[str, Any]

    @property
    def annotations(self) -> dict[str, str]:
        """The OCI spec's annotations."""
        return dict(self.spec.get("annotations") or {})


def get_container(address: str, namespace: str, id: str, timeout: float = 10.0) -> ContainerInfo:
    """Containers.Get through containerd's socket (runtime.rpc.grpclite: no grpcio, whose
    import would cost the CLI more than the rest of a checkpoint's bookkeeping; and
    runtime.rpc.pbwire: no protobuf either)."""
    from runtime.rpc import grpclite
    from runtime.rpc.pbwire import Message, encode

    try:
        raw = grpclite.call(
            address,
            "/containerd.services.containers.v1.Containers/Get",
            encode([(1, id)]),  # GetContainerRequest{id}
            {NAMESPACE_KEY: namespace},
            timeout,
        )
    except grpclite.CallError as e:
        if e.code == Code.NOT_FOUND:
            raise NotFound(f"container {id!r} not found in namespace {namespace!r}") from e
        if e.code == Code.UNAVAILABLE:
            raise Unavailable(f"cannot reach containerd at {address}: {e.message}") from e
        raise StasisError(f"containerd Containers.Get {id}: {e.message}") from e
    try:
        # GetContainerResponse{container: Container{id 1, image 3, runtime 4
        # {name 1}, spec 5 (google.protobuf.Any{value 2}: the OCI spec's JSON)}}
        c = Message(raw).message(1)
        info_id, image = c.string(1), c.string(3)
        runtime = c.message(4).string(1)
        spec_json = c.message(5).bytes(2)
    except ValueError as e:
        raise StasisError(f"containerd Containers.Get {id}: malformed answer: {e}") from e
    try:
        spec = json.loads(spec_json or b"{}")
    except ValueError as e:
        raise InvalidArgument(f"container {id}: spec is not JSON: {e}") from e
    return ContainerInfo(id=info_id, image=image, runtime=runtime, spec=spec)
