"""Pods on the real Kubernetes 1.20 cluster (tests/bed/kube.py), each behaviour checked
for RuntimeClass `stasis` (our shim) and for the default runtime (runc, the reference):
logs, exec (with and without a tty), exec liveness probes, one shim per pod, OOM kills,
CRI container stats, and what deleting a pod leaves behind.

Every pod of the module is created at once, for both runtimes, by the `pods` fixture;
tests wait for theirs, so the runtimes start their pods side by side.

Deleting pods: kubelet 1.20 removes a deleted pod's dead sandbox (and only then the pod
object) when a PLEG ContainerRemoved event finds the pod "deleted" (pod_sandbox_deleter
via Kubelet.deletePodSandbox, kubelet.go). IsPodDeleted also wants the status manager to
show every container not running, and the pod worker may not have written that yet: the
sandbox then stays until the container GC (ContainerGCPeriod = 1 minute), the kubelet
logs "is terminated, but some pod sandboxes have not been cleaned up" meanwhile, and the
pod object lingers up to a minute after its containers are gone. This happens with runc
as with stasis. The delete test therefore waits for the runtime's cleanup (shim, mounts,
runc state), not for the pod object; the module's teardown waits for the objects.
"""

from __future__ import annotations

import calendar
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pexpect
import pytest
from bed.containerd import CRI_NAMESPACE, RUNC_ROOTS, mounts_under, unique_id
from bed.cri import CriClient
from bed.images import BUSYBOX_REF
from bed.kube import KUBECTL, KubeCluster, KubeError

pytestmark = pytest.mark.integration

T = TypeVar("T")
Pods = dict[tuple[str, str | None], str]  # (kind, runtimeClassName) -> pod name

# runtimeClassName -> test id; None is the default handler (runc).
RUNTIMES = {None: "runc", "stasis": "stasis"}
RUNTIME_PARAMS = [pytest.param(rc, id=name) for rc, name in RUNTIMES.items()]
SHIM_BINARY = {None: b"containerd-shim-runc-v2", "stasis": b"containerd-shim-stasis-v2"}
RUNTIME_TYPE = {None: "io.containerd.runc.v2", "stasis": "io.containerd.stasis.v2"}
PROBE_PERIOD = 1  # seconds
SEQ_LINES = 3000  # lines the `exit` pod prints before exiting 3
MiB = 1024 * 1024

# -- manifests ------------------------------------------------------------------------

SLEEPER = "trap 'exit 0' TERM; while :; do sleep 1; done"


def container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": BUSYBOX_REF,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        **extra,
    }


def manifest(name: str, runtime_class: str | None, kind: str) -> dict[str, Any]:
    """The pod of the given kind: two, exit, oom or probe."""
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": 2}
    if kind == "two":  # two long-running containers: logs, exec, stats, shim, delete
        spec["containers"] = [
            container(c, f"echo hello from {c}; {SLEEPER}", env=[{"name": "WHO", "value": c}])
            for c in ("a", "b")
        ]
    elif kind == "exit":  # runs to completion: stdout, stderr, exit code
        spec["restartPolicy"] = "Never"
        spec["containers"] = [container("main", f"seq 1 {SEQ_LINES}; echo to-stderr >&2; exit 3")]
    elif kind == "oom":  # over its memory limit
        spec["restartPolicy"] = "Never"
        spec["containers"] = [
            container(
                "main",
                "head -c 200000000 /dev/zero | tail",
                resources={"limits": {"memory": "32Mi"}},
            )
        ]
    elif kind == "probe":  # an exec liveness probe on a file the test removes
        spec["containers"] = [
            container(
                "main",
                f"echo probe-start; touch /tmp/healthy; {SLEEPER}",
                livenessProbe={
                    "exec": {"command": ["cat", "/tmp/healthy"]},
                    "periodSeconds": PROBE_PERIOD,
                    "failureThreshold": 2,
                    # exec probes time out in 1.20 (default 1s): not a latency test.
                    "timeoutSeconds": 5,
                },
            )
        ]
    else:
        raise ValueError(kind)
    if runtime_class is not None:
        spec["runtimeClassName"] = runtime_class
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


KINDS = ("two", "exit", "oom", "probe")

# -- helpers --------------------------------------------------------------------------


def wait_for(pred: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def container_ids(pod: dict[str, Any]) -> dict[str, str]:
    """Container name -> containerd id, from the pod's status."""
    return {
        s["name"]: s["containerID"].removeprefix("containerd://")
        for s in pod["status"].get("containerStatuses", [])
        if s.get("containerID")
    }


def status_of(pod: dict[str, Any], name: str = "main") -> dict[str, Any]:
    return next(s for s in pod["status"]["containerStatuses"] if s["name"] == name)


def sandbox_ids(cri: CriClient, pod: dict[str, Any]) -> list[str]:
    uid = pod["metadata"]["uid"]
    flt = cri.api.PodSandboxFilter(label_selector={"io.kubernetes.pod.uid": uid})
    return [s.id for s in cri.call("ListPodSandbox", filter=flt).items]


def shim_processes(cluster: KubeCluster, runtime_class: str | None) -> dict[int, list[bytes]]:
    """pid -> argv of the runtime's shims serving the cluster's containerd (its address
    in their command line or environment)."""
    address = str(cluster.containerd.address).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if SHIM_BINARY[runtime_class] in cmdline and (address in cmdline or address in environ):
            found[int(entry)] = cmdline.split(b"\0")
    return found


def shims_for(cluster: KubeCluster, runtime_class: str | None, ids: list[str]) -> list[int]:
    """The runtime's shims whose -id is one of ids."""
    wanted = {i.encode() for i in ids}
    return [
        pid
        for pid, argv in shim_processes(cluster, runtime_class).items()
        if any(a == b"-id" and b in wanted for a, b in itertools.pairwise(argv))
    ]


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cri_info(reply: Any) -> Any:
    """The JSON `info` of a verbose CRI status reply."""
    return json.loads(reply.info["info"])


def runc_state_dirs(ids: list[str]) -> list[Path]:
    return [d for root in RUNC_ROOTS for i in ids if (d := root / CRI_NAMESPACE / i).exists()]


def cgroup_dirs(path: str) -> list[Path]:
    """The directories of a cgroup path in every hierarchy (v1 controllers, or v2)."""
    return [
        d
        for d in (Path("/sys/fs/cgroup") / path, *Path("/sys/fs/cgroup").glob(f"*/{path}"))
        if d.is_dir()
    ]


def cri_log_streams(path: str) -> dict[str, list[str]]:
    """stdout/stderr lines of a CRI log file ("<time> <stream> <P|F> <text>")."""
    streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
    for line in Path(path).read_text().splitlines():
        _, stream, _, text = line.split(" ", 3)
        streams[stream].append(text)
    return streams


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pods(kube_cluster: KubeCluster) -> Iterator[Pods]:
    """Every pod of the module, for both runtimes, created at once: (kind, runtime
    class) -> pod name. Teardown deletes them and waits (bounded) until they are gone."""
    names = {(kind, rc): unique_id(f"{kind}-{RUNTIMES[rc]}") for kind in KINDS for rc in RUNTIMES}
    items = [manifest(name, rc, kind) for (kind, rc), name in names.items()]
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    try:
        kube_cluster.kubectl("apply", "--validate=false", "-f", "-", input=doc)
        yield names
    finally:
        kube_cluster.kubectl(
            "delete", "pod", "--wait=false", "--ignore-not-found", *names.values(), check=False
        )
        # Up to one container-GC period (see the module docstring); the cluster's own
        # teardown waits again and reports what is left.
        kube_cluster.kubectl(
            "wait",
            "--for=delete",
            "--timeout=75s",
            *[f"pod/{n}" for n in names.values()],
            check=False,
            timeout=90,
        )


@pytest.fixture(scope="module")
def cri(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriClient]:
    """A CRI runtime.v1 client on the cluster's containerd."""
    with CriClient(kube_cluster.containerd.address, tmp_path_factory.mktemp("cri")) as client:
        yield client


def running(cluster: KubeCluster, name: str) -> Any:
    try:
        return cluster.wait_pod(name, "Running", timeout=90)
    except KubeError as e:
        pytest.fail(str(e), pytrace=False)


def finished(cluster: KubeCluster, name: str, phase: str) -> Any:
    try:
        return cluster.wait_pod(name, phase, timeout=90)
    except KubeError as e:
        pytest.fail(str(e), pytrace=False)


def logs(cluster: KubeCluster, name: str, *args: str, want: str = "") -> str:
    """`kubectl logs`, until want shows (a container may not have printed yet)."""
    out = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = cluster.kubectl("logs", name, *args).stdout
        if want in out:
            break
        time.sleep(0.2)
    return out


# -- 1. logs --------------------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_logs_of_a_running_pod(
    kube_cluster: KubeCluster, pods: Pods, runtime_class: str | None
) -> None:
    name = pods["two", runtime_class]
    pod = running(kube_cluster, name)
    assert pod["spec"].get("runtimeClassName") == runtime_class
    assert logs(kube_cluster, name, "-c", "a", want="a\n") == "hello from a\n"
    assert logs(kube_cluster, name, "-c", "b", want="b\n") == "hello from b\n"


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_logs_and_exit_code_of_a_finished_pod(
    kube_cluster: KubeCluster, cri: CriClient, pods: Pods, runtime_class: str | None
) -> None:
    name = pods["exit", runtime_class]
    pod = finished(kube_cluster, name, "Failed")
    terminated = status_of(pod)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    expected = [str(i) for i in range(1, SEQ_LINES + 1)]
    out = logs(kube_cluster, name, want="to-stderr")
    # stdout and stderr are separate pipes: only their own order is defined.
    assert sorted(out.splitlines()) == sorted([*expected, "to-stderr"])
    # the CRI log file tags each line with its stream
    status = cri.call("ContainerStatus", container_id=container_ids(pod)["main"]).status
    streams = cri_log_streams(status.log_path)
    assert streams == {"stdout": expected, "stderr": ["to-stderr"]}
    assert status.exit_code == 3


# -- 2. exec --------------------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_kubectl_exec(kube_cluster: KubeCluster, pods: Pods, runtime_class: str | None) -> None:
    name = pods["two", runtime_class]
    running(kube_cluster, name)
    r = kube_cluster.kubectl(
        "exec",
        name,
        "-c",
        "b",
        "--",
        "sh",
        "-c",
        "echo exec-$((6 * 7)) $WHO; hostname; echo oops >&2; exit 5",
        check=False,
    )
    assert r.stdout.split() == ["exec-42", "b", name]
    assert "oops" in r.stderr
    assert r.returncode == 5, r.stderr
    r = kube_cluster.kubectl(
        "exec", "-i", name, "-c", "a", "--", "sh", "-c", "cat; echo $WHO", input="via-stdin\n"
    )
    assert r.stdout == "via-stdin\na\n"
    r = kube_cluster.kubectl("exec", name, "-c", "a", "--", "no-such-binary", check=False)
    assert r.returncode != 0
    assert "no-such-binary" in r.stdout + r.stderr


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_kubectl_exec_tty(kube_cluster: KubeCluster, pods: Pods, runtime_class: str | None) -> None:
    name = pods["two", runtime_class]
    running(kube_cluster, name)
    argv = [
        f"--kubeconfig={kube_cluster.kubeconfig}",
        f"--cache-dir={kube_cluster.workdir / 'kubectl-cache'}",
        "exec",
        "-it",
        name,
        "-c",
        "a",
        "--",
        "sh",
    ]
    child = pexpect.spawn(KUBECTL, argv, encoding="utf-8", timeout=20, dimensions=(33, 101))
    transcript: list[str] = []
    child.logfile_read = _Collect(transcript)
    try:
        prompt = r"/ # "
        child.expect(prompt)
        child.sendline("tty; stty size; echo $WHO")
        child.expect(r"(/dev/pts/\d+)\r\n(\d+) (\d+)\r\na\r\n")
        assert child.match.group(2, 3) == ("33", "101"), "terminal size not passed on"
        child.expect(prompt)
        child.setwinsize(21, 77)  # kubectl passes the resize on (the shim's ResizePty)
        sizes = []
        for _ in range(10):  # the resize travels apart from the input: allow it a moment
            child.sendline("stty size")
            child.expect(r"\r\n(\d+ \d+)\r\n")
            sizes.append(child.match.group(1))
            child.expect(prompt)
            if sizes[-1] == "21 77":
                break
            time.sleep(0.3)
        assert sizes[-1] == "21 77", f"terminal resize not passed on: {sizes}"
        child.sendline("read -p 'name? ' x; echo hello-$x-$((6 * 7))")
        child.expect(r"name\? ")
        child.sendline("world")
        child.expect(r"hello-world-42\r\n")
        child.expect(prompt)
        # ^C through the terminal's line discipline interrupts the foreground job
        child.sendline("echo sleeping; sleep 30")
        child.expect(r"\r\nsleeping\r\n")
        time.sleep(0.3)
        child.sendcontrol("c")
        child.expect(prompt, timeout=5)
        child.sendline("echo rc=$?")
        child.expect(r"rc=130\r\n")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    except (pexpect.TIMEOUT, pexpect.EOF) as e:
        pytest.fail(f"kubectl exec -it: {type(e).__name__}; transcript:\n{''.join(transcript)!r}")
    finally:
        child.close(force=True)
    assert child.exitstatus == 3, "".join(transcript)


class _Collect:
    """A file-like sink for pexpect's logfile_read."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def write(self, s: str) -> None:
        self.into.append(s)

    def flush(self) -> None:
        pass


# -- 3. exec liveness probe -----------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_exec_liveness_probe(
    kube_cluster: KubeCluster, pods: Pods, runtime_class: str | None
) -> None:
    name = pods["probe", runtime_class]
    pod = running(kube_cluster, name)
    # Passing: still Ready and never restarted after several probe periods.
    started = status_of(pod)["state"]["running"]["startedAt"]
    start = calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
    time.sleep(max(0.0, start + 5 * PROBE_PERIOD + 1 - time.time()))
    pod = kube_cluster.pod(name)
    st = status_of(pod)
    assert (st["ready"], st["restartCount"]) == (True, 0), st
    assert "running" in st["state"], st
    # Failing: kubelet kills and restarts the container.
    kube_cluster.kubectl("exec", name, "--", "rm", "/tmp/healthy")

    def restarted_and_ready() -> dict[str, Any] | None:
        s = status_of(kube_cluster.pod(name))
        return s if s["restartCount"] >= 1 and s["ready"] else None

    st = wait_for(restarted_and_ready, 30, f"{name} restarted by its liveness probe")
    assert st["restartCount"] == 1, st
    last = st["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (0, "Completed"), last  # it traps TERM
    wanted = ("Unhealthy: Liveness probe failed", "failed liveness probe, will be restarted")
    try:  # events reach the apiserver asynchronously
        wait_for(lambda: all(w in kube_cluster.events(name) for w in wanted), 10, "the events")
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{kube_cluster.events(name)}") from None
    assert logs(kube_cluster, name, "--previous", want="probe-start") == "probe-start\n"


# -- 4. one shim per pod --------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_one_shim_serves_the_pod(
    kube_cluster: KubeCluster, cri: CriClient, pods: Pods, runtime_class: str | None
) -> None:
    pod = running(kube_cluster, pods["two", runtime_class])
    ids = container_ids(pod)
    (sandbox,) = sandbox_ids(cri, pod)
    sb_info = cri_info(cri.call("PodSandboxStatus", pod_sandbox_id=sandbox, verbose=True))
    assert sb_info["runtimeType"] == RUNTIME_TYPE[runtime_class]
    inits = {"sandbox": sb_info["pid"]}
    for cname, cid in ids.items():
        info = cri_info(cri.call("ContainerStatus", container_id=cid, verbose=True))
        assert info["sandboxID"] == sandbox
        assert info["runtimeType"] == RUNTIME_TYPE[runtime_class]
        inits[cname] = info["pid"]
    assert set(inits) == {"sandbox", "a", "b"}
    shims = shims_for(kube_cluster, runtime_class, [sandbox, *ids.values()])
    assert len(shims) == 1, f"{len(shims)} shims for the pod: {shims}"
    parents = {cname: ppid(pid) for cname, pid in inits.items()}
    assert parents == dict.fromkeys(inits, shims[0]), (
        f"container inits {inits} have parents {parents}, the pod's shim is {shims[0]}"
    )


# -- 5. OOM kill ----------------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_oom_killed(kube_cluster: KubeCluster, pods: Pods, runtime_class: str | None) -> None:
    pod = finished(kube_cluster, pods["oom", runtime_class], "Failed")
    st = status_of(pod)
    terminated = st["state"].get("terminated") or st["lastState"].get("terminated")
    assert terminated, st
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), terminated


# -- 6. CRI container stats -----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1alpha2"])
@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_cri_container_stats(
    kube_cluster: KubeCluster,
    tmp_path_factory: pytest.TempPathFactory,
    pods: Pods,
    runtime_class: str | None,
    version: str,
) -> None:
    pod = running(kube_cluster, pods["two", runtime_class])
    cid = container_ids(pod)["a"]
    workdir = tmp_path_factory.mktemp(f"cri-{version}")
    with CriClient(kube_cluster.containerd.address, workdir, version) as client:
        stats = client.call("ContainerStats", container_id=cid).stats
        listed = client.call("ListContainerStats", filter=client.api.ContainerStatsFilter(id=cid))
    assert stats.attributes.id == cid
    assert stats.attributes.metadata.name == "a"
    assert 0 < stats.memory.working_set_bytes.value < 64 * MiB, stats.memory
    assert stats.memory.timestamp > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats.cpu
    assert [s.attributes.id for s in listed.stats] == [cid]
    assert listed.stats[0].memory.working_set_bytes.value > 0


# -- 7. deleting a pod ----------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", RUNTIME_PARAMS)
def test_delete_leaves_nothing(
    kube_cluster: KubeCluster, cri: CriClient, pods: Pods, runtime_class: str | None
) -> None:
    name = pods["two", runtime_class]
    pod = running(kube_cluster, name)
    ids = list(container_ids(pod).values())
    (sandbox,) = sandbox_ids(cri, pod)
    all_ids = [sandbox, *ids]
    sb_info = cri_info(cri.call("PodSandboxStatus", pod_sandbox_id=sandbox, verbose=True))
    netns = next(
        n["path"] for n in sb_info["runtimeSpec"]["linux"]["namespaces"] if n["type"] == "network"
    )
    infos = [sb_info] + [
        cri_info(cri.call("ContainerStatus", container_id=c, verbose=True)) for c in ids
    ]
    inits = [info["pid"] for info in infos]
    cgroups = [info["runtimeSpec"]["linux"]["cgroupsPath"].lstrip("/") for info in infos]
    state = kube_cluster.containerd.state
    bundles = [state / "io.containerd.runtime.v2.task" / CRI_NAMESPACE / i for i in all_ids]
    sockets = {(b / "address").read_text().strip().removeprefix("unix://") for b in bundles}

    def left() -> dict[str, list[Any]]:
        return {
            "shims": shims_for(kube_cluster, runtime_class, all_ids),
            "shim sockets": [s for s in sockets if os.path.exists(s)],
            "processes": [p for p in inits if Path(f"/proc/{p}").exists()],
            "mounts": [
                m
                for m in mounts_under(state)
                if str(m) == netns or any(i in str(m) for i in all_ids)
            ],
            "bundles": [b for b in bundles if b.exists()],
            "runc states": runc_state_dirs(all_ids),
            "cgroups": [d for c in cgroups for d in cgroup_dirs(c)],
        }

    before = left()
    assert all(before.values()), f"nothing to check against: {before}"
    assert len(before["mounts"]) >= 4, before  # sandbox shm + netns + 3 rootfs
    assert len(sockets) == 1, f"the pod's tasks name several shim sockets: {sockets}"
    kube_cluster.kubectl("delete", "pod", name, "--wait=false")
    t0 = time.monotonic()
    try:
        wait_for(lambda: not any(left().values()), 30, f"{name}'s runtime cleanup")
    except AssertionError as e:
        raise AssertionError(f"{e}: still there: {left()}") from None
    print(f"{RUNTIMES[runtime_class]}: runtime cleanup {time.monotonic() - t0:.1f}s after delete")


# -- 8. both runtimes report the same -------------------------------------------------


def test_runtimes_report_the_same(kube_cluster: KubeCluster, pods: Pods) -> None:
    """What kubectl reports for the pods that ran to completion, and for the probed
    pod's restart, is the same with stasis as with runc."""

    def report(rc: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("exit", "oom"):
            pod = finished(kube_cluster, pods[kind, rc], "Failed")
            t = status_of(pod)["state"]["terminated"]
            logs = kube_cluster.kubectl("logs", pods[kind, rc], check=False)
            # A loaded kubelet may have collected the dead container's log already
            # (kubectl then names the pod's log path): the same for either runtime.
            lines = logs.stdout.splitlines() if logs.returncode == 0 else ["(log gone)"]
            if kind == "oom":
                # Whether sh lives to print "Killed" depends on which process the
                # kernel's OOM killer picks, with either runtime: not compared.
                lines = [line for line in lines if line != "Killed"]
            out[kind] = (pod["status"]["phase"], t["exitCode"], t["reason"], sorted(lines))
        st = status_of(kube_cluster.pod(pods["probe", rc]))
        last = st["lastState"].get("terminated", {})
        out["probe"] = (st["restartCount"], last.get("exitCode"), last.get("reason"))
        return out

    runc, stasis = report(None), report("stasis")
    assert stasis == runc
