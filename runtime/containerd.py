"""A small client of containerd's gRPC API: what the stasis CLI needs to find a
container's shim (its spec and runtime) and image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidArgument, NotFound, StasisError, Unavailable

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
    """Containers.Get through containerd's socket."""
    import grpc

    from protos.containerd.services.containers.v1 import containers_pb2 as pb

    target = address if address.startswith("unix:") else f"unix://{address}"
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(
            "/containerd.services.containers.v1.Containers/Get",
            request_serializer=pb.GetContainerRequest.SerializeToString,
            response_deserializer=pb.GetContainerResponse.FromString,
        )
        try:
            resp = get(
                pb.GetContainerRequest(id=id),
                metadata=[(NAMESPACE_KEY, namespace)],
                timeout=timeout,
            )
        except grpc.RpcError as e:
            code = e.code()
            detail = e.details() or str(code)
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"container {id!r} not found in namespace {namespace!r}") from e
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"cannot reach containerd at {address}: {detail}") from e
            raise StasisError(f"containerd Containers.Get {id}: {detail}") from e
    c = resp.container
    try:
        spec = json.loads(c.spec.value or b"{}")
    except ValueError as e:
        raise InvalidArgument(f"container {id}: spec is not JSON: {e}") from e
    return ContainerInfo(id=c.id, image=c.image, runtime=c.runtime.name, spec=spec)
