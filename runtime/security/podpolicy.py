"""What a restored pod may ask for: no more than its container checkpoints recorded.

A pod checkpoint's ``pod.json`` is the pod spec ``stasis kube restore`` creates
again, with the restorer's (usually an administrator's) rights; whoever can write
a checkpoint could make it ask for anything. Each member container checkpoint
holds ``spec.dump``, the OCI spec the container really ran with, written by the
shim: that is the authority. ``check_pod`` refuses (PermissionDenied, one line
naming the pod, the container and the field) a pod spec that asks for more than
its members recorded: privileged, capabilities, privilege escalation, root, host
namespaces, hostPath mounts, unmasked /proc, no seccomp; members that are not of
this pod's containers; and a namespace other than the recorded one unless the
caller allows it. A container with no checkpoint in the pod (an init container, one
that was not running) may ask for no more than a default container. Asking for less
is always allowed. Pure functions: no I/O, no Kubernetes client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import DataLoss, PermissionDenied
from runtime.security.ceiling import CAPABILITIES

# containerd's CRI annotations on every Kubernetes container's OCI spec.
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SECCOMP_POD_ANNOTATION = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_ANNOTATION = "container.seccomp.security.alpha.kubernetes.io/"

# Capabilities 0..37 (CAP_CHOWN .. CAP_AUDIT_READ): every kernel Stasis runs on has
# them, so a container holding all of them had "all capabilities".
CLASSIC_CAPS = frozenset(CAPABILITIES[: CAPABILITIES.index("CAP_AUDIT_READ") + 1])
ALL_CAPS = CLASSIC_CAPS | {"CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"}
# What containerd (1.7 and 2.x, oci.defaultUnixCaps) gives an unprivileged container
# before the pod's add and drop.
DEFAULT_CAPS = frozenset(
    (
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    )
)
_HOST_NAMESPACES = (("hostNetwork", "network"), ("hostPID", "pid"), ("hostIPC", "ipc"))


@dataclass(frozen=True)
class Bind:
    """One bind mount of a recorded spec."""

    source: str
    destination: str
    readonly: bool


@dataclass(frozen=True)
class Recorded:
    """What one container checkpoint's ``spec.dump`` says its container ran with.

    ``checkpoint`` is None for the ceiling of a container the pod checkpoint holds
    no checkpoint of (``default_ceiling``).
    """

    checkpoint: str | None
    container: str  # the CRI container name (annotation), "" when none
    sandbox_namespace: str
    sandbox_name: str
    caps: frozenset[str]  # the bounding set: no process of the container exceeded it
    privileged: bool  # no seccomp, /sys writable, every device, /proc unmasked
    seccomp: bool
    no_new_privs: bool
    uid: int | None
    masked: bool  # /proc paths masked (maskedPaths)
    # OCI namespace types it had (its own or its pod's): the host's are absent. CRI
    # joins the pod sandbox's network, IPC and UTS namespaces by path, also when the
    # sandbox is in the host's: the spec cannot tell, so a pod asking for them is
    # refused unless the recorded spec lacks the namespace.
    own_namespaces: frozenset[str] = frozenset()
    binds: tuple[Bind, ...] = field(default=())


def _obj(value: Any, what: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataLoss(f"{where}: spec.dump: {what} is not an object")
    return value


def _list(value: Any, what: str, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataLoss(f"{where}: spec.dump: {what} is not a list")
    return value


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def recorded(spec: Any, checkpoint: str) -> Recorded:
    """The ``Recorded`` of container checkpoint ``checkpoint`` from its ``spec.dump``
    (an OCI runtime spec); DataLoss when it is not one."""
    where = f"checkpoint {checkpoint}"
    spec = _obj(spec, "the spec", where)
    process = _obj(spec.get("process"), "process", where)
    linux = _obj(spec.get("linux"), "linux", where)
    annotations = _obj(spec.get("annotations"), "annotations", where)
    capabilities = _obj(process.get("capabilities"), "process.capabilities", where)
    sets = [capabilities.get("bounding")]
    if sets[0] is None:  # no bounding set: the union of the others bounds it
        sets = [capabilities.get(k) for k in ("effective", "permitted", "inheritable", "ambient")]
    caps: set[str] = set()
    for s in sets:
        caps.update(_cap(c) for c in _list(s, "process.capabilities", where))
    user = _obj(process.get("user"), "process.user", where)
    uid = user.get("uid")
    namespaces = {
        _str(_obj(n, "linux.namespaces[]", where).get("type"))
        for n in _list(linux.get("namespaces"), "linux.namespaces", where)
    }
    binds: list[Bind] = []
    sys_writable = False
    for m in _list(spec.get("mounts"), "mounts", where):
        m = _obj(m, "mounts[]", where)
        options = _list(m.get("options"), "mounts[].options", where)
        dest = os.path.normpath(_str(m.get("destination")) or "/")
        if dest == "/sys" and "ro" not in options:
            sys_writable = True
        if m.get("type") == "bind" or "bind" in options or "rbind" in options:
            source = _str(m.get("source"))
            if source.startswith("/"):
                binds.append(Bind(os.path.normpath(source), dest, "ro" in options))
    resources = _obj(linux.get("resources"), "linux.resources", where)
    every_device = any(
        isinstance(d, dict)
        and d.get("allow") is True
        and d.get("type") in (None, "a")
        and d.get("major") is None
        and d.get("minor") is None
        and set(_str(d.get("access")) or "rwm") >= set("rwm")
        for d in _list(resources.get("devices"), "linux.resources.devices", where)
    )
    seccomp = linux.get("seccomp") is not None
    masked = bool(_list(linux.get("maskedPaths"), "linux.maskedPaths", where))
    return Recorded(
        checkpoint=checkpoint,
        container=_str(annotations.get(CRI_CONTAINER_NAME)),
        sandbox_namespace=_str(annotations.get(CRI_SANDBOX_NAMESPACE)),
        sandbox_name=_str(annotations.get(CRI_SANDBOX_NAME)),
        caps=frozenset(caps),
        # Only CRI's privileged gives all of these; its capabilities are those of
        # containerd itself, which may lack some.
        privileged=not seccomp and sys_writable and every_device and not masked,
        seccomp=seccomp,
        no_new_privs=process.get("noNewPrivileges") is True,
        uid=uid if isinstance(uid, int) and not isinstance(uid, bool) else None,
        masked=masked,
        own_namespaces=frozenset(namespaces),
        binds=tuple(binds),
    )


def default_ceiling(name: str, members: Mapping[str, Recorded]) -> Recorded:
    """What a container of the pod with no checkpoint may ask for: containerd's
    defaults, unprivileged; a hostPath only where a member had it bound."""
    return Recorded(
        checkpoint=None,
        container=name,
        sandbox_namespace="",
        sandbox_name="",
        caps=DEFAULT_CAPS,
        privileged=False,
        seccomp=False,  # Kubernetes 1.20's default is unconfined
        no_new_privs=False,
        uid=None,
        masked=True,
        binds=tuple(b for r in members.values() for b in r.binds),
    )


def _cap(name: Any) -> str:
    """CAP_X for X, cap_x or CAP_X (as Kubernetes and OCI spell them)."""
    text = str(name).upper()
    return text if text.startswith("CAP_") or text == "ALL" else f"CAP_{text}"


class _Refusal:
    """Builds the one-line refusals of one pod."""

    def __init__(self, pod: str) -> None:
        self.pod = pod

    def container(self, c: str, rec: Recorded, field: str, asked: str, had: str) -> None:
        of = (
            f"its checkpoint {rec.checkpoint}"
            if rec.checkpoint
            else "a container with no checkpoint in the pod checkpoint (a default container)"
        )
        raise PermissionDenied(
            f"pod {self.pod}: container {c}: {field}: {asked} exceeds {of}, which {had}"
        )


def _containers(pod: str, spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(key) or []):
            if not isinstance(c, dict):
                raise PermissionDenied(f"pod {pod}: spec.{key}[{i}] is not an object")
            yield f"spec.{key}[{i}]", c


def _seccomp_type(sc: Mapping[str, Any]) -> str | None:
    profile = sc.get("seccompProfile")
    return str(profile.get("type")) if isinstance(profile, dict) else None


def _unconfined(
    name: str, sc: Mapping[str, Any], pod_sc: Mapping[str, Any], annotations: Mapping[str, Any]
) -> str | None:
    """The field that asks container ``name`` to run without seccomp, or None."""
    kind = _seccomp_type(sc)
    if kind is not None:
        return "securityContext.seccompProfile.type" if kind == "Unconfined" else None
    key = SECCOMP_CONTAINER_ANNOTATION + name
    if key in annotations:
        return f"metadata.annotations[{key}]" if annotations[key] == "unconfined" else None
    if _seccomp_type(pod_sc) is not None:
        unconfined = _seccomp_type(pod_sc) == "Unconfined"
        return "spec.securityContext.seccompProfile.type" if unconfined else None
    if annotations.get(SECCOMP_POD_ANNOTATION) == "unconfined":
        return f"metadata.annotations[{SECCOMP_POD_ANNOTATION}]"
    return None


def _host_paths(spec: Mapping[str, Any]) -> dict[str, str]:
    """Volume name -> its hostPath path."""
    paths = {}
    for v in spec.get("volumes") or []:
        if isinstance(v, dict) and isinstance(v.get("hostPath"), dict):
            path = v["hostPath"].get("path")
            paths[str(v.get("name"))] = os.path.normpath(path) if isinstance(path, str) else ""
    return paths


def _bound(path: str, binds: tuple[Bind, ...], readonly: bool) -> bool:
    if not path.startswith("/"):
        return False
    candidates = {path, os.path.realpath(path)}  # containerd binds the resolved path
    return any(b.source in candidates and (readonly or not b.readonly) for b in binds)


def check_pod(
    manifest: Mapping[str, Any],
    members: Mapping[str, Recorded],
    *,
    allow_cross_namespace: bool = False,
) -> None:
    """Refuse (PermissionDenied) the pod ``manifest`` (what ``restore_manifest``
    makes) when it asks for more than ``members`` (container name -> what its
    checkpoint recorded) ran with, or goes to another namespace than the one the
    members ran in without ``allow_cross_namespace``."""
    meta = manifest.get("metadata") or {}
    spec = manifest.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise PermissionDenied("the pod to restore has no metadata or spec object")
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    pod = f"{ns}/{name}"
    refuse = _Refusal(pod)
    if not members:
        raise PermissionDenied(f"pod {pod}: the pod checkpoint holds no container checkpoint")
    # The members must be this pod's containers, all of one pod.
    origin = None
    for c, rec in members.items():
        if rec.container != c:
            raise PermissionDenied(
                f"pod {pod}: container {c}: checkpoint {rec.checkpoint} is of "
                + (f"container {rec.container!r}" if rec.container else "no Kubernetes container")
            )
        here = (rec.sandbox_namespace, rec.sandbox_name)
        if origin is None:
            origin = here
        elif here != origin:
            raise PermissionDenied(
                f"pod {pod}: container {c}: checkpoint {rec.checkpoint} is of pod "
                f"{here[0]}/{here[1]}, another container's of pod {origin[0]}/{origin[1]}"
            )
    assert origin is not None
    if ns != origin[0] and not allow_cross_namespace:
        raise PermissionDenied(
            f"pod {pod}: its containers were checkpointed in namespace {origin[0]!r}; "
            f"restoring into {ns!r} needs --allow-cross-namespace"
        )
    # Pod-wide: host namespaces, seen by every member.
    for key, kind in _HOST_NAMESPACES:
        if spec.get(key) is True:
            for c, rec in members.items():
                if kind in rec.own_namespaces:
                    refuse.container(
                        c, rec, f"spec.{key}", "true", f"records a {kind} namespace, not the host's"
                    )
    annotations = meta.get("annotations") or {}
    pod_sc = spec.get("securityContext") or {}
    if not isinstance(annotations, dict) or not isinstance(pod_sc, dict):
        raise PermissionDenied(f"pod {pod}: malformed annotations or securityContext")
    host_paths = _host_paths(spec)
    mounted: set[str] = set()
    for where, container in _containers(pod, spec):
        cname = str(container.get("name"))
        member = members.get(cname) if where.startswith("spec.containers") else None
        ceiling = member or default_ceiling(cname, members)
        _check_container(
            refuse, cname, container, ceiling, pod_sc, annotations, host_paths, mounted
        )
    # hostPath volumes no container mounts: the kubelet still sets them up (and
    # DirectoryOrCreate creates them on the node).
    every = tuple(b for r in members.values() for b in r.binds)
    for vol, path in host_paths.items():
        if vol not in mounted and not _bound(path, every, readonly=True):
            raise PermissionDenied(
                f"pod {pod}: spec.volumes[{vol}].hostPath.path: {path!r} is bind-mounted "
                "in none of its container checkpoints"
            )


def _check_container(
    refuse: _Refusal,
    cname: str,
    c: Mapping[str, Any],
    rec: Recorded,
    pod_sc: Mapping[str, Any],
    annotations: Mapping[str, Any],
    host_paths: Mapping[str, str],
    mounted: set[str],
) -> None:
    sc = c.get("securityContext") or {}
    if not isinstance(sc, dict):
        raise PermissionDenied(f"pod {refuse.pod}: container {cname}: malformed securityContext")
    privileged = sc.get("privileged") is True
    if privileged and not rec.privileged:
        refuse.container(cname, rec, "securityContext.privileged", "true", "ran unprivileged")
    if not rec.privileged:
        _check_caps(refuse, cname, sc, rec)
        if rec.no_new_privs and sc.get("allowPrivilegeEscalation") is not False:
            asked = "true" if sc.get("allowPrivilegeEscalation") is True else "unset (true)"
            refuse.container(
                cname, rec, "securityContext.allowPrivilegeEscalation", asked,
                "ran with no_new_privs",
            )  # fmt: skip
        if sc.get("procMount") == "Unmasked" and rec.masked:
            refuse.container(
                cname, rec, "securityContext.procMount", "Unmasked", "had /proc masked"
            )
        unconfined = _unconfined(cname, sc, pod_sc, annotations)
        if unconfined and rec.seccomp:
            refuse.container(cname, rec, unconfined, "Unconfined", "ran under seccomp")
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if user == 0 and rec.uid not in (None, 0):
        where = "securityContext" if "runAsUser" in sc else "spec.securityContext"
        refuse.container(cname, rec, f"{where}.runAsUser", "0", f"ran as uid {rec.uid}")
    for i, m in enumerate(c.get("volumeMounts") or []):
        if not isinstance(m, dict) or m.get("name") not in host_paths:
            continue
        vol = str(m["name"])
        mounted.add(vol)
        path = host_paths[vol]
        field = f"volumeMounts[{i}] (hostPath volume {vol})"
        if m.get("subPath") or m.get("subPathExpr"):
            refuse.container(
                cname, rec, f"{field}.subPath", repr(m.get("subPath") or m.get("subPathExpr")),
                "cannot be compared (a subPath of a host path)",
            )  # fmt: skip
        readonly = m.get("readOnly") is True
        if not _bound(path, rec.binds, readonly):
            refuse.container(
                cname, rec, field, repr(path) + ("" if readonly else " read-write"),
                "had no such bind mount",
            )  # fmt: skip


def _check_caps(refuse: _Refusal, cname: str, sc: Mapping[str, Any], rec: Recorded) -> None:
    caps = sc.get("capabilities") or {}
    if not isinstance(caps, dict):
        raise PermissionDenied(f"pod {refuse.pod}: container {cname}: malformed capabilities")
    add = {_cap(x) for x in caps.get("add") or []}
    drop = {_cap(x) for x in caps.get("drop") or []}
    if "ALL" in add:
        if not rec.caps >= CLASSIC_CAPS:
            refuse.container(
                cname, rec, "securityContext.capabilities.add", "ALL",
                "held " + (", ".join(sorted(rec.caps)) or "no capability"),
            )  # fmt: skip
        return
    for cap in sorted(add - rec.caps):
        refuse.container(cname, rec, "securityContext.capabilities.add", cap, f"did not hold {cap}")
    if "ALL" not in drop:
        for cap in sorted(DEFAULT_CAPS - drop - rec.caps):
            refuse.container(
                cname, rec, "securityContext.capabilities.drop", f"no longer dropping {cap}",
                f"did not hold {cap}",
            )  # fmt: skip


def check_volume(
    manifest: Mapping[str, Any], claim: str, pv: Mapping[str, Any], members: Mapping[str, Recorded]
) -> None:
    """Refuse (PermissionDenied) binding the restored claim ``claim`` to the existing
    PersistentVolume ``pv`` (as the API server returns it) unless a container
    checkpoint of the pod had that volume mounted: the kubelet's mount of it
    (``.../volumes/kubernetes.io~PLUGIN/NAME``), or its hostPath or local path."""
    meta = manifest.get("metadata") or {}
    pod = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
    name = str((pv.get("metadata") or {}).get("name") or "")
    spec = pv.get("spec") or {}
    paths: set[str] = set()
    for kind in ("hostPath", "local"):
        source = spec.get(kind)
        path = source.get("path") if isinstance(source, dict) else None
        if isinstance(path, str) and path.startswith("/"):
            paths |= {os.path.normpath(path), os.path.realpath(path)}
    for rec in members.values():
        for b in rec.binds:
            if b.source in paths:
                return
            parts = b.source.split("/")
            if any(
                part.startswith("kubernetes.io~") and parts[i + 1 : i + 2] == [name]
                for i, part in enumerate(parts)
            ):
                return
    raise PermissionDenied(
        f"pod {pod}: PersistentVolumeClaim {claim}: PersistentVolume {name} is mounted in "
        "none of its container checkpoints"
    )
