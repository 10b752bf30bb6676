"""A minimal CRI client for the Kubernetes tests: the RuntimeService of the cluster's
containerd over gRPC, with message classes compiled at test time from Debian's .proto.

tests/bed/proto_sources.sh unpacks the reference sources under
$STASIS_CACHE/proto-sources/:

- runtime.v1 (served by containerd 1.7 beside v1alpha2): k8s.io/cri-api's api.proto,
  from trixie's golang-github-kubernetes-cri-api-dev (bookworm has no such package);
  it imports gogoproto/gogo.proto (golang-github-gogo-protobuf-dev, bookworm);
- runtime.v1alpha2 (what kubelet 1.20 speaks): the copy containerd keeps in
  third_party/k8s.io/cri-api (golang-github-containerd-containerd-dev, sid).

grpc_tools' protoc compiles one of them into a directory of the caller's choosing;
the generated api_pb2 module is loaded under a private name. Calls go through
`channel.unary_unary` with the generated request/response classes (no stubs).

    with CriClient(containerd.address, workdir) as cri:
        stats = cri.call("ContainerStats", container_id=cid).stats
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

_GOCODE = "usr/share/gocode/src"
# version -> (proto-sources entry, path of api.proto under its gocode tree)
API_PROTOS: dict[str, tuple[str, str]] = {
    "v1": ("cri-api-trixie", "k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"),
    "v1alpha2": (
        "containerd-sid",
        "github.com/containerd/containerd/third_party/k8s.io/cri-api/pkg/apis/runtime/v1alpha2/api.proto",
    ),
}
GOGO_PROTO = ("gogo-protobuf-bookworm", "github.com/gogo/protobuf/gogoproto/gogo.proto")
PROTO_HINT = "run `bash tests/bed/proto_sources.sh` (tests/bed/setup.sh does) as root"

_loaded: dict[str, ModuleType] = {}  # version -> api_pb2, once per process


def proto_sources() -> Path:
    return Path(os.environ.get("STASIS_CACHE", "/var/cache/stasis-testbed")) / "proto-sources"


def cri_missing(version: str = "v1") -> str | None:
    """Why the CRI client cannot be built (a sentence), or None."""
    if importlib.util.find_spec("grpc_tools") is None:
        return "grpc_tools (grpcio-tools) is not installed in this interpreter"
    entry, rel = API_PROTOS[version]
    for name, path in ((entry, rel), GOGO_PROTO):
        if not (source := proto_sources() / name / _GOCODE / path).is_file():
            return f"CRI proto sources missing ({source}): {PROTO_HINT}"
    return None


def load_api(version: str, workdir: Path) -> ModuleType:
    """runtime.<version>'s api_pb2, compiled into workdir on first use in this process.

    The protos are copied as stasis_cri/<version>/api.proto and gogoproto/gogo.proto
    (import rewritten): the package paths Go uses (github.com/...) are not Python names.
    """
    if version in _loaded:
        return _loaded[version]
    if why := cri_missing(version):
        raise RuntimeError(why)
    entry, rel = API_PROTOS[version]
    src = workdir / f"cri-{version}-src"
    out = workdir / f"cri-{version}-py"
    (src / "stasis_cri" / version).mkdir(parents=True, exist_ok=True)
    (src / "gogoproto").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    text = (proto_sources() / entry / _GOCODE / rel).read_text()
    text = re.sub(
        r'import\s+"github\.com/gogo/protobuf/gogoproto/gogo\.proto";',
        'import "gogoproto/gogo.proto";',
        text,
    )
    (src / "stasis_cri" / version / "api.proto").write_text(text)
    gogo = (proto_sources() / GOGO_PROTO[0] / _GOCODE / GOGO_PROTO[1]).read_text()
    (src / "gogoproto" / "gogo.proto").write_text(gogo)

    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv))",
            f"-I{src}",
            f"-I{well_known}",
            f"--python_out={out}",
            "gogoproto/gogo.proto",
            f"stasis_cri/{version}/api.proto",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed on the CRI {version} api.proto:\n{proc.stderr}")
    # api_pb2 imports gogoproto.gogo_pb2 when the proto does: make it importable.
    gogo_mod = _load_module("gogoproto.gogo_pb2", out / "gogoproto" / "gogo_pb2.py")
    package = sys.modules.setdefault("gogoproto", ModuleType("gogoproto"))
    package.gogo_pb2 = gogo_mod  # type: ignore[attr-defined]
    api = _load_module(f"stasis_cri_{version}_api_pb2", out / "stasis_cri" / version / "api_pb2.py")
    _loaded[version] = api
    return api


def _load_module(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class CriClient:
    """RuntimeService calls to a CRI endpoint (a containerd's grpc socket)."""

    def __init__(self, address: Path | str, workdir: Path, version: str = "v1") -> None:
        self.version = version
        self.api = load_api(version, Path(workdir))
        self.service = f"/runtime.{version}.RuntimeService"
        self.channel = grpc.insecure_channel(f"unix://{address}")

    def call(self, method: str, timeout: float = 10.0, **fields: Any) -> Any:
        """RuntimeService/<method> with a <method>Request built from fields; the reply."""
        request_cls = getattr(self.api, f"{method}Request")
        response_cls = getattr(self.api, f"{method}Response")
        rpc = self.channel.unary_unary(
            f"{self.service}/{method}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return rpc(request_cls(**fields), timeout=timeout)

    def image_call(self, method: str, timeout: float = 60.0, **fields: Any) -> Any:
        """ImageService/<method> (PullImage, ImageStatus, ...) with a request built from
        fields; the reply."""
        request_cls = getattr(self.api, f"{method}Request")
        response_cls = getattr(self.api, f"{method}Response")
        rpc = self.channel.unary_unary(
            f"/runtime.{self.version}.ImageService/{method}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return rpc(request_cls(**fields), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pods:
    """Pod sandboxes made through CRI v1 on one runtime handler; remove_all() stops and
    removes them (and so their containers). Pod logs go under ``logs``."""

    def __init__(self, cri: CriClient, logs: Path, handler: str, timeout: float = 90.0) -> None:
        self.cri = cri
        self.api = cri.api
        self.logs = Path(logs)
        self.handler = handler
        self.timeout = timeout  # a busy machine; a restore pulls the base image
        self.ids: list[str] = []

    def run(
        self, name: str, host_pid: bool = False, annotations: dict[str, str] | None = None
    ) -> tuple[str, Any]:
        """A new pod: (sandbox id, its PodSandboxConfig); ``host_pid``: in the host's
        PID namespace (a pod's ``hostPID: true``); ``annotations``: the pod's."""
        import uuid

        uid = uuid.uuid4().hex
        logs = self.logs / uid
        logs.mkdir(parents=True)
        config = self.api.PodSandboxConfig(
            metadata=self.api.PodSandboxMetadata(
                name=f"{name}-{uid[:6]}", uid=uid, namespace="default", attempt=0
            ),
            log_directory=str(logs),
            hostname=name,
            annotations=annotations or {},
        )
        if host_pid:
            config.linux.security_context.namespace_options.pid = self.api.NODE
        reply = self.cri.call(
            "RunPodSandbox", config=config, runtime_handler=self.handler, timeout=self.timeout
        )
        self.ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id, config

    def container(
        self,
        sandbox: str,
        config: Any,
        image: str,
        command: list[str],
        name: str = "counter",
        own_pid_ns: bool = False,
        host_pid: bool = False,
    ) -> str:
        """Create and start a container in the pod (an archive path as ``image``
        restores it on containerd 2.1); its id.

        ``own_pid_ns``: a PID namespace of its own (NamespaceMode CONTAINER, what the
        kubelet asks for unless the pod shares its process namespace) instead of the
        CRI default, the pod's. ``host_pid``: the host's (the pod must be ``host_pid``).
        """
        spec = self.api.ContainerConfig(
            metadata=self.api.ContainerMetadata(name=name, attempt=0),
            image=self.api.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
        )
        if own_pid_ns or host_pid:
            mode = self.api.NODE if host_pid else self.api.CONTAINER
            namespaces = self.api.NamespaceOption(pid=mode)
            spec.linux.security_context.namespace_options.CopyFrom(namespaces)
        cid = self.cri.call(
            "CreateContainer",
            pod_sandbox_id=sandbox,
            config=spec,
            sandbox_config=config,
            timeout=self.timeout,
        ).container_id
        self.cri.call("StartContainer", container_id=cid, timeout=self.timeout)
        return str(cid)

    def remove_all(self) -> None:
        """Stop and remove every pod made here, newest first."""
        for sandbox in reversed(self.ids):
            self.cri.call("StopPodSandbox", pod_sandbox_id=sandbox, timeout=self.timeout)
            self.cri.call("RemovePodSandbox", pod_sandbox_id=sandbox, timeout=self.timeout)
        self.ids.clear()
