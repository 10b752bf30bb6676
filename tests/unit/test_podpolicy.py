"""runtime/security/podpolicy.py: a pod.json may ask for no more than its container
checkpoints' spec.dump recorded. A table of edits: each escalation refused with a
message naming the pod, the container and the field; the recorded pod accepted;
a pod that asks for less accepted."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime.config import Config, StorageConfig
from runtime.errors import DataLoss, PermissionDenied
from runtime.kube import pods as kube
from runtime.security import podpolicy
from runtime.security.podpolicy import DEFAULT_CAPS, check_pod, recorded
from runtime.store import signing
from runtime.store.local import LocalStore

SANDBOX = "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/abc"


def oci_spec(container: str, *, privileged: bool = False, uid: int = 1000) -> dict[str, Any]:
    """An OCI spec as containerd's CRI writes it for a container of pod shop/web."""
    caps = sorted(podpolicy.ALL_CAPS if privileged else DEFAULT_CAPS | {"CAP_NET_ADMIN"})
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": ["sh"],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": not privileged,
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"]),
            },
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": "/var/lib/kubelet/pods/1234/etc-hosts",
                "options": ["rbind", "rprivate", "rw"],
            },
            {
                "destination": "/data",
                "type": "bind",
                "source": "/srv/shop",
                "options": ["rbind", "rprivate", "ro"],
            },
            {
                "destination": "/cache",
                "type": "bind",
                "source": "/srv/cache",
                "options": ["rbind", "rprivate", "rw"],
            },
        ],
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": container,
            "io.kubernetes.cri.sandbox-name": "web",
            "io.kubernetes.cri.sandbox-namespace": "shop",
        },
        "linux": {
            "resources": {"devices": [{"allow": privileged, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc", "path": f"{SANDBOX}/ipc"},
                {"type": "uts", "path": f"{SANDBOX}/uts"},
                {"type": "mount"},
                {"type": "network", "path": f"{SANDBOX}/net"},
            ],
            "maskedPaths": [] if privileged else ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": [] if privileged else ["/proc/sys"],
        },
    }
    if not privileged:
        spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}
    return spec


def pod() -> dict[str, Any]:
    """The pod that ran (as restore_manifest makes it from pod.json)."""
    container = {
        "image": "busybox",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "shop", "mountPath": "/data", "readOnly": True},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {}},
        "spec": {
            "runtimeClassName": "stasis",
            "securityContext": {"runAsUser": 1000},
            "containers": [
                {"name": "app", **copy.deepcopy(container)},
                {"name": "side", **container},
            ],
            "volumes": [
                {"name": "shop", "hostPath": {"path": "/srv/shop", "type": "Directory"}},
                {"name": "cache", "hostPath": {"path": "/srv/cache/"}},
            ],
        },
    }


def members(**specs: dict[str, Any]) -> dict[str, podpolicy.Recorded]:
    specs = specs or {"app": oci_spec("app"), "side": oci_spec("side")}
    return {c: recorded(s, f"web.{c}") for c, s in specs.items()}


def sc(p: dict[str, Any], i: int = 0) -> dict[str, Any]:
    sec: dict[str, Any] = p["spec"]["containers"][i]["securityContext"]
    return sec


Edit = Callable[[dict[str, Any]], None]

ESCALATIONS: list[tuple[str, Edit, str]] = [
    (
        "privileged",
        lambda p: sc(p).update(privileged=True),
        "container app: securityContext.privileged: true exceeds its checkpoint web.app",
    ),
    (
        "capability added",
        lambda p: sc(p)["capabilities"]["add"].append("SYS_ADMIN"),
        "container app: securityContext.capabilities.add: CAP_SYS_ADMIN",
    ),
    (
        "capability ALL",
        lambda p: sc(p, 1)["capabilities"].update(add=["ALL"]),
        "container side: securityContext.capabilities.add: ALL",
    ),
    (
        "escalation allowed",
        lambda p: sc(p).update(allowPrivilegeEscalation=True),
        "container app: securityContext.allowPrivilegeEscalation: true",
    ),
    (
        "escalation no longer forbidden",
        lambda p: sc(p).pop("allowPrivilegeEscalation"),
        "container app: securityContext.allowPrivilegeEscalation: unset",
    ),
    (
        "root in the container",
        lambda p: sc(p).update(runAsUser=0),
        "container app: securityContext.runAsUser: 0 exceeds its checkpoint web.app, "
        "which ran as uid 1000",
    ),
    (
        "root for the pod",
        lambda p: p["spec"]["securityContext"].update(runAsUser=0),
        "container app: spec.securityContext.runAsUser: 0",
    ),
    (
        "host network",
        lambda p: p["spec"].update(hostNetwork=True),
        "container app: spec.hostNetwork: true",
    ),
    ("host PID", lambda p: p["spec"].update(hostPID=True), "spec.hostPID: true"),
    ("host IPC", lambda p: p["spec"].update(hostIPC=True), "spec.hostIPC: true"),
    (
        "hostPath elsewhere",
        lambda p: p["spec"]["volumes"][0]["hostPath"].update(path="/"),
        "container app: volumeMounts[0] (hostPath volume shop): '/'",
    ),
    (
        "read-only hostPath made writable",
        lambda p: p["spec"]["containers"][1]["volumeMounts"][0].pop("readOnly"),
        "container side: volumeMounts[0] (hostPath volume shop): '/srv/shop' read-write",
    ),
    (
        "hostPath through a subPath",
        lambda p: p["spec"]["containers"][0]["volumeMounts"][1].update(subPath="../etc"),
        "container app: volumeMounts[1] (hostPath volume cache).subPath",
    ),
    (
        "unmounted hostPath volume",
        lambda p: p["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/etc"}}),
        "spec.volumes[root].hostPath.path: '/etc'",
    ),
    (
        "unmasked /proc",
        lambda p: sc(p).update(procMount="Unmasked"),
        "container app: securityContext.procMount: Unmasked",
    ),
    (
        "seccomp unconfined",
        lambda p: sc(p).update(seccompProfile={"type": "Unconfined"}),
        "container app: securityContext.seccompProfile.type: Unconfined",
    ),
    (
        "seccomp unconfined for the pod",
        lambda p: (
            sc(p).pop("seccompProfile"),
            p["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        ),
        "container app: spec.securityContext.seccompProfile.type: Unconfined",
    ),
    (
        "seccomp unconfined by annotation",
        lambda p: (
            sc(p, 1).pop("seccompProfile"),
            p["metadata"]["annotations"].update(
                {"container.seccomp.security.alpha.kubernetes.io/side": "unconfined"}
            ),
        ),
        "container side: metadata.annotations[container.seccomp.security.alpha.kubernetes.io/side]",
    ),
    (
        "a privileged container with no checkpoint",
        lambda p: p["spec"]["containers"].append(
            {"name": "evil", "image": "busybox", "securityContext": {"privileged": True}}
        ),
        "container evil: securityContext.privileged: true exceeds a container with no checkpoint",
    ),
    (
        "a privileged init container",
        lambda p: (
            p["spec"]
            .setdefault("initContainers", [])
            .append({"name": "init", "image": "busybox", "securityContext": {"privileged": True}})
        ),
        "container init: securityContext.privileged",
    ),
    (
        "a capability for a container with no checkpoint",
        lambda p: p["spec"]["containers"].append(
            {"name": "new", "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}
        ),
        "container new: securityContext.capabilities.add: CAP_SYS_PTRACE",
    ),
    (
        "another namespace",
        lambda p: p["metadata"].update(namespace="kube-system"),
        "pod kube-system/web: its containers were checkpointed in namespace 'shop'; "
        "restoring into 'kube-system' needs --allow-cross-namespace",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"), [e[1:] for e in ESCALATIONS], ids=[e[0] for e in ESCALATIONS]
)
def test_escalation_refused_naming_the_field(edit: Edit, message: str) -> None:
    p = pod()
    edit(p)
    with pytest.raises(PermissionDenied) as err:
        check_pod(p, members())
    text = str(err.value)
    assert message in text
    assert text.startswith("pod ") and "\n" not in text


def test_the_recorded_pod_is_accepted() -> None:
    check_pod(pod(), members())


LESS: list[tuple[str, Edit]] = [
    ("capabilities dropped", lambda p: sc(p).update(capabilities={"drop": ["ALL"]})),
    ("capability no longer added", lambda p: sc(p)["capabilities"].pop("add")),
    (
        "hostPath read-only",
        lambda p: p["spec"]["containers"][0]["volumeMounts"][1].update(readOnly=True),
    ),
    (
        "hostPath volume gone",
        lambda p: (
            p["spec"]["volumes"].pop(0),
            [c["volumeMounts"].pop(0) for c in p["spec"]["containers"]],
        ),
    ),
    ("another non-root user", lambda p: sc(p).update(runAsUser=2000, runAsNonRoot=True)),
    (
        "seccomp from a profile",
        lambda p: sc(p).update(
            seccompProfile={"type": "Localhost", "localhostProfile": "strict.json"}
        ),
    ),
    ("a container less", lambda p: p["spec"]["containers"].pop(1)),
    ("explicitly not privileged", lambda p: sc(p).update(privileged=False)),
    ("hostNetwork false", lambda p: p["spec"].update(hostNetwork=False)),
    (
        "a default sidecar with no checkpoint",
        lambda p: p["spec"]["containers"].append(
            {
                "name": "log",
                "image": "busybox",
                "volumeMounts": [{"name": "shop", "mountPath": "/data", "readOnly": True}],
            }
        ),
    ),
    ("renamed", lambda p: p["metadata"].update(name="web-2")),
]


@pytest.mark.parametrize("edit", [e[1] for e in LESS], ids=[e[0] for e in LESS])
def test_asking_for_less_is_accepted(edit: Edit) -> None:
    p = pod()
    edit(p)
    check_pod(p, members())


def test_another_namespace_when_allowed() -> None:
    p = pod()
    p["metadata"]["namespace"] = "staging"
    check_pod(p, members(), allow_cross_namespace=True)


def test_privileged_checkpoint_restores_privileged() -> None:
    p = pod()
    for c in p["spec"]["containers"]:
        c["securityContext"] = {
            "privileged": True,
            "runAsUser": 1000,
            "capabilities": {"add": ["ALL"]},
            "procMount": "Unmasked",
            "seccompProfile": {"type": "Unconfined"},
        }
    privileged = members(
        app=oci_spec("app", privileged=True), side=oci_spec("side", privileged=True)
    )
    assert privileged["app"].privileged and not members()["app"].privileged
    check_pod(p, privileged)
    p["spec"]["hostPID"] = True  # still its own pid namespace
    with pytest.raises(PermissionDenied, match=re.escape("spec.hostPID")):
        check_pod(p, privileged)


def test_root_checkpoint_may_run_as_root() -> None:
    p = pod()
    p["spec"]["securityContext"]["runAsUser"] = 0
    check_pod(p, members(app=oci_spec("app", uid=0), side=oci_spec("side", uid=0)))


def test_host_namespaces_recorded_are_allowed() -> None:
    specs = {c: oci_spec(c) for c in ("app", "side")}
    for s in specs.values():
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "network"]
    p = pod()
    p["spec"]["hostNetwork"] = True
    check_pod(p, members(**specs))


def test_members_must_be_this_pods_containers() -> None:
    swapped = members(app=oci_spec("side"), side=oci_spec("side"))
    with pytest.raises(
        PermissionDenied, match=re.escape("container app: checkpoint web.app is of container")
    ):
        check_pod(pod(), swapped)
    other = oci_spec("side")
    other["annotations"]["io.kubernetes.cri.sandbox-name"] = "admin"
    with pytest.raises(PermissionDenied, match=re.escape("is of pod shop/admin")):
        check_pod(pod(), members(app=oci_spec("app"), side=other))
    plain = oci_spec("app")
    del plain["annotations"]
    with pytest.raises(PermissionDenied, match=re.escape("is of no Kubernetes container")):
        check_pod(pod(), members(app=plain))
    with pytest.raises(PermissionDenied, match=re.escape("holds no container checkpoint")):
        check_pod(pod(), {})


@pytest.mark.parametrize(
    "spec",
    [
        [],
        {"process": []},
        {"mounts": {}},
        {"linux": {"namespaces": [1]}},
        {"process": {"capabilities": {"bounding": "CAP_SYS_ADMIN"}}},
    ],
)
def test_malformed_spec_dump_is_data_loss(spec: Any) -> None:
    with pytest.raises(DataLoss, match=re.escape("checkpoint web.app: spec.dump")):
        recorded(spec, "web.app")


def test_default_capability_no_longer_dropped_is_refused() -> None:
    spec = oci_spec("app")
    caps = sorted(DEFAULT_CAPS - {"CAP_NET_RAW"} | {"CAP_NET_ADMIN"})
    spec["process"]["capabilities"] = {"bounding": caps, "effective": caps}
    p = pod()
    with pytest.raises(
        PermissionDenied, match=re.escape("capabilities.drop: no longer dropping CAP_NET_RAW")
    ):
        check_pod(p, members(app=spec, side=oci_spec("side")))
    sc(p)["capabilities"]["drop"] = ["net_raw"]
    check_pod(p, members(app=spec, side=oci_spec("side")))


# -- through kube.restore_pod: a pod checkpoint in a local store -------------------------


class FakeCore:
    """Records the pods restore_pod creates."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def create_namespaced_pod(self, ns: str, body: dict[str, Any]) -> None:
        self.created.append(body)


def pod_checkpoint(root: Path, edit: Edit | None = None) -> str:
    store = LocalStore(str(root), signing=signing.Signing(signing.DEFAULT_KEY_FILE))
    for c in ("app", "side"):
        with store.begin(f"web.{c}") as w:
            w.write_bytes("spec.dump", json.dumps(oci_spec(c)).encode())
            w.write_bytes("checkpoint/pages-1.img", b"x")
            w.commit({})
    record = kube.pod_record(pod(), {"app": "web.app", "side": "web.side"}, [])
    if edit is not None:
        edit(record["pod"])
    with store.begin("web") as w:
        w.write_bytes("pod.json", json.dumps(record).encode())
        return w.commit({"kind": "pod"}).ref


@pytest.fixture
def restoring(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    monkeypatch.setattr(kube, "_wait_name_free", lambda *a: None)
    monkeypatch.setattr(kube, "call", lambda doing, fn, *a, **kw: fn(*a, **kw))
    return FakeCore()


def cfg() -> Config:
    return Config(StorageConfig(url="/nonexistent"))


def test_restore_pod_creates_the_recorded_pod(restoring: FakeCore, tmp_path: Path) -> None:
    ref = pod_checkpoint(tmp_path)
    assert kube.restore_pod(restoring, ref, wait=False, config=cfg()) == "web"  # type: ignore[arg-type]
    assert [p["metadata"]["namespace"] for p in restoring.created] == ["shop"]


def test_restore_pod_refuses_a_privileged_pod_json(restoring: FakeCore, tmp_path: Path) -> None:
    ref = pod_checkpoint(tmp_path, lambda p: sc(p).update(privileged=True))
    with pytest.raises(
        PermissionDenied, match=re.escape("pod shop/web: container app: securityContext.priv")
    ):
        kube.restore_pod(restoring, ref, wait=False, config=cfg())  # type: ignore[arg-type]
    assert restoring.created == []


def test_restore_pod_refuses_another_namespace(restoring: FakeCore, tmp_path: Path) -> None:
    ref = pod_checkpoint(tmp_path)
    with pytest.raises(PermissionDenied, match=re.escape("needs --allow-cross-namespace")):
        kube.restore_pod(restoring, ref, namespace="kube-system", wait=False, config=cfg())  # type: ignore[arg-type]
    kube.restore_pod(
        restoring,
        ref,
        namespace="other",
        wait=False,
        config=cfg(),
        allow_cross_namespace=True,  # type: ignore[arg-type]
    )
    assert [p["metadata"]["namespace"] for p in restoring.created] == ["other"]


def test_restore_pod_refuses_a_tampered_or_missing_spec_dump(
    restoring: FakeCore, tmp_path: Path
) -> None:
    ref = pod_checkpoint(tmp_path)
    dump = tmp_path / "web.app" / "spec.dump"
    spec = oci_spec("app", privileged=True)
    dump.write_text(json.dumps(spec)[: dump.stat().st_size].ljust(dump.stat().st_size))
    with pytest.raises(DataLoss, match=re.escape("spec.dump")):
        kube.restore_pod(restoring, ref, wait=False, config=cfg())  # type: ignore[arg-type]
    store = LocalStore(str(tmp_path / "other"), signing=signing.Signing(signing.DEFAULT_KEY_FILE))
    with store.begin("web.app") as w:
        w.write_bytes("stasis.json", b"{}")
        w.commit({})
    with store.begin("web") as w:
        record = kube.pod_record(pod(), {"app": "web.app"}, [])
        w.write_bytes("pod.json", json.dumps(record).encode())
        ref = w.commit({}).ref
    with pytest.raises(PermissionDenied, match=re.escape("web.app records no spec.dump")):
        kube.restore_pod(restoring, ref, wait=False, config=cfg())  # type: ignore[arg-type]
    assert restoring.created == []


def test_check_volume_only_a_volume_a_member_had_mounted() -> None:
    app = oci_spec("app")
    app["mounts"].append(
        {
            "destination": "/db",
            "type": "bind",
            "source": "/var/lib/kubelet/pods/1234/volumes/kubernetes.io~csi/pv-db/mount",
            "options": ["rbind", "rw"],
        }
    )
    rec = members(app=app, side=oci_spec("side"))
    csi = {"metadata": {"name": "pv-db"}, "spec": {"csi": {"driver": "x"}}}
    podpolicy.check_volume(pod(), "db", csi, rec)
    host = {"metadata": {"name": "pv-shop"}, "spec": {"hostPath": {"path": "/srv/shop/"}}}
    podpolicy.check_volume(pod(), "shop", host, rec)
    for pv in (
        {"metadata": {"name": "pv-root"}, "spec": {"hostPath": {"path": "/"}}},
        {"metadata": {"name": "pv-other"}, "spec": {"csi": {"driver": "x"}}},
        {"metadata": {"name": "mount"}, "spec": {}},  # a path component, not the volume's
    ):
        with pytest.raises(
            PermissionDenied,
            match=re.escape(
                f"pod shop/web: PersistentVolumeClaim db: PersistentVolume {pv['metadata']['name']}"
                " is mounted in none of its container checkpoints"
            ),
        ):
            podpolicy.check_volume(pod(), "db", pv, rec)


def test_privileged_is_told_by_seccomp_sys_devices_and_proc_not_by_capabilities() -> None:
    spec = oci_spec("app", privileged=True)
    caps = sorted(podpolicy.ALL_CAPS - {"CAP_SYS_RESOURCE"})  # containerd itself lacked one
    spec["process"]["capabilities"] = {"bounding": caps, "effective": caps}
    assert recorded(spec, "web.app").privileged
    for edit in (
        lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW"}),
        lambda s: s["mounts"][1]["options"].append("ro"),
        lambda s: s["linux"]["resources"].update(devices=[{"allow": False, "access": "rwm"}]),
        lambda s: s["linux"].update(maskedPaths=["/proc/kcore"]),
    ):
        changed = copy.deepcopy(spec)
        edit(changed)
        assert not recorded(changed, "web.app").privileged
