"""A real single-node Kubernetes 1.20 cluster for integration tests.

The binaries come from the test bed (tests/bed/kubernetes.sh builds kube-apiserver,
kube-controller-manager, kube-scheduler and kubelet 1.20 from Debian's source package
and unpacks etcd 3.4 into $STASIS_CACHE/kubernetes-1.20/bin/). The container runtime
is a private containerd 1.7 with its CRI plugin on (`Containerd(..., cri=True)`):
kubelet 1.20 speaks CRI v1alpha2, which containerd 2.x no longer serves.

Everything a cluster owns lives under its work directory (etcd data, certificates,
kubelet root, logs) or is named after it (the kubelet's cgroup root), listens on
loopback ports picked at start (etcd, kube-apiserver) or on the node's own address
(kubelet), so several clusters can run on one machine. Traps worked around here:

- The kubelet refuses a loopback node IP ("nodeIP can't be loopback address"): the
  node gets the address of the default route's interface and the apiserver dials
  kubelets by InternalIP (kubectl exec/logs go through it), so no name has to resolve.
- cAdvisor inside the kubelet talks to /run/containerd/containerd.sock (the system
  containerd) unless told otherwise: --containerd points it at ours.
- The kubelet deletes pod cgroups it does not know about under its cgroup root: each
  cluster gets a root of its own (/stasis-<id>), created before the kubelet starts.
- A 1.20 apiserver advertising 127.0.0.1 cannot write the `kubernetes` service's
  endpoints (loopback is invalid there): --endpoint-reconciler-type=none.
- The kubelet's container logs go to /var/log/pods (fixed in 1.20); stop() removes
  the directories of the pods this cluster ran. Known limit: a kubelet's container GC
  (once a minute) deletes the log directories of pods it does not know, so two
  clusters running at once on one machine may lose each other's `kubectl logs`.
- Also fixed in 1.20: the device-plugin socket (/var/lib/kubelet/device-plugins),
  hence the DevicePlugins feature gate is off; --cert-dir and the controller
  manager's --flex-volume-plugin-dir point into the work directory, else the kubelet
  and the controller manager create /var/lib/kubelet/pki and /usr/libexec/kubernetes.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bed.containerd import (
    CNI_BIN_DIR,
    RUN_BASE,
    STASIS_HANDLER,
    Containerd,
    bed_missing,
    cache_dir,
    mounts_under,
)

KUBECTL = os.environ.get("STASIS_KUBECTL", "/usr/bin/kubectl")
NODE_NAME = "stasis-node"
KUBE_SETUP_HINT = "run `bash tests/bed/setup.sh` (or tests/bed/kubernetes.sh) as root"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
_MNT_DETACH = 2


def kube_bin_dir() -> Path:
    """Where tests/bed/kubernetes.sh puts the cluster's binaries."""
    return cache_dir() / "kubernetes-1.20" / "bin"


def kube_bed_missing() -> str | None:
    """Why a cluster cannot start here (a sentence), or None."""
    if why := bed_missing(["1.7"]):
        return why
    for name in COMPONENTS:
        if not (kube_bin_dir() / name).is_file():
            return f"Kubernetes bed missing ({kube_bin_dir() / name} not found): {KUBE_SETUP_HINT}"
    for path in (CNI_BIN_DIR / "bridge", CNI_BIN_DIR / "host-local", Path(KUBECTL)):
        if not path.exists():
            return f"Kubernetes bed missing ({path} not found): {KUBE_SETUP_HINT}"
    return None


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """The address of the interface the default route leaves by (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError as e:
            raise RuntimeError("no default route: the kubelet needs a non-loopback IP") from e
        return str(s.getsockname()[0])


class KubeError(RuntimeError):
    """The cluster did not do what was asked; the message carries the evidence."""


class KubeCluster:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet on
    `containerd` (started by the caller, with cri=True), private to workdir.

    Lifecycle: start() -> kubectl()/api()... -> stop(). stop() deletes every pod,
    ends every process start() began, unmounts and removes what the kubelet left, and
    returns the leaks it found (empty list for a clean run).
    """

    def __init__(
        self,
        workdir: Path,
        containerd: Containerd,
        *,
        node_name: str = NODE_NAME,
        kubelet_verbosity: int = 2,
    ) -> None:
        if not containerd.cri:
            raise ValueError("the cluster's containerd needs cri=True")
        self.workdir = Path(workdir)
        self.containerd = containerd
        self.node_name = node_name
        self.kubelet_verbosity = kubelet_verbosity
        self.bin_dir = kube_bin_dir()
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.kubelet_root = self.workdir / "kubelet"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.token = secrets.token_hex(16)
        self.cgroup_root = f"/stasis-{self.workdir.name}"
        self.apiserver_port = 0
        self.kubelet_port = 0
        self.node_ip = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pod_uids: set[str] = set()
        self._ssl = ssl.create_default_context()
        self._ssl.check_hostname = False
        self._ssl.verify_mode = ssl.CERT_NONE

    @classmethod
    def in_run_dir(cls, containerd: Containerd, **kw: Any) -> KubeCluster:
        """A cluster with a fresh short work directory under RUN_BASE."""
        return cls(RUN_BASE / f"k8s-{uuid.uuid4().hex[:8]}", containerd, **kw)

    # -- start ------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Starts every component at once and waits until the node is Ready and
        schedulable, the `stasis` RuntimeClass exists and pods can be created."""
        if self._procs:
            raise RuntimeError("cluster already started")
        if self.containerd.pid is None:
            raise RuntimeError(f"{self.containerd} is not running")
        for d in (self.workdir, self.pki, self.logs, self.kubelet_root):
            d.mkdir(parents=True, exist_ok=True)
        self._write_credentials()
        self.node_ip = node_ip()
        etcd_port, peer_port = free_port(), free_port()
        self.apiserver_port, self.kubelet_port = free_port(), free_port()
        self._write_kubeconfig()
        self._create_cgroup_root()
        try:
            self._spawn("etcd", self._etcd_args(etcd_port, peer_port))
            self._spawn("kube-apiserver", self._apiserver_args(etcd_port))
            self._spawn("kube-controller-manager", self._controller_manager_args())
            self._spawn("kube-scheduler", self._scheduler_args())
            self._spawn("kubelet", self._kubelet_args())
            deadline = time.monotonic() + timeout
            self._wait("kube-apiserver ready", deadline, self._apiserver_ready)
            self._create_runtime_class()
            self._wait("node Ready and schedulable", deadline, self._node_ready)
            self._wait("service account default/default", deadline, self._default_sa_ready)
        except BaseException:
            self.stop()
            raise

    def _write_credentials(self) -> None:
        # The apiserver makes its own serving cert in --cert-dir; clients skip verification.
        (self.pki / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        key, pub = self.pki / "sa.key", self.pki / "sa.pub"
        subprocess.run(
            ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "stasis",
                    "cluster": {
                        "server": self.server,
                        "insecure-skip-tls-verify": True,
                    },
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "stasis", "context": {"cluster": "stasis", "user": "admin"}}],
            "current-context": "stasis",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    @property
    def server(self) -> str:
        """The apiserver's URL."""
        return f"https://127.0.0.1:{self.apiserver_port}"

    def _etcd_args(self, port: int, peer_port: int) -> list[str]:
        client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        return [
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--logger=zap",
            "--log-level=warn",
        ]

    def _apiserver_args(self, etcd_port: int) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            "--insecure-port=0",
            f"--cert-dir={self.pki / 'apiserver'}",
            f"--token-auth-file={self.pki / 'tokens.csv'}",
            "--authorization-mode=AlwaysAllow",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            "--use-service-account-credentials=false",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--node-monitor-period=1s",
            f"--flex-volume-plugin-dir={self.workdir / 'flexvolume'}",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--profiling=false",
            "--v=1",
        ]

    def _kubelet_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE, which VMs may deny
            "resolvConf": "/etc/resolv.conf",
            # The bed's images were imported, not pulled: never collect them, never
            # evict for disk space on a busy CI disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "nodeStatusUpdateFrequency": "1s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "volumeStatsAggPeriod": "0s",
            # The device manager's socket is a fixed path in 1.20
            # (/var/lib/kubelet/device-plugins/kubelet.sock), shared by every kubelet.
            "featureGates": {"DevicePlugins": False},
        }

    def _kubelet_args(self) -> list[str]:
        config = self.workdir / "kubelet.json"
        config.write_text(json.dumps(self._kubelet_config(), indent=2) + "\n")
        endpoint = f"unix://{self.containerd.address}"
        return [
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.kubelet_root}",
            f"--cert-dir={self.kubelet_root / 'pki'}",  # else /var/lib/kubelet/pki
            f"--hostname-override={self.node_name}",
            f"--node-ip={self.node_ip}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint={endpoint}",
            f"--image-service-endpoint={endpoint}",
            # cAdvisor's own containerd client, else it asks the system containerd.
            f"--containerd={self.containerd.address}",
            "--containerd-namespace=k8s.io",
            f"--volume-plugin-dir={self.kubelet_root / 'volume-plugins'}",
            f"--seccomp-profile-root={self.kubelet_root / 'seccomp'}",
            f"--v={self.kubelet_verbosity}",
        ]

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        env = self.containerd.env()  # its PATH (iptables, mount, ...) for the kubelet too
        with (self.logs / f"{name}.log").open("ab") as log:
            # Own sessions: a ^C to pytest must not kill them before teardown runs.
            self._procs[name] = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.workdir,
            )

    def _create_cgroup_root(self) -> None:
        for ctrl in self._cgroup_controllers():
            path = ctrl / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            if ctrl.name == "cpuset":  # v1 cpuset children start empty: inherit the root's
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((ctrl / f).read_text())

    @staticmethod
    def _cgroup_controllers() -> list[Path]:
        """The cgroup hierarchies mounted at /sys/fs/cgroup/* (v1 and the unified one)."""
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith("/sys/fs/cgroup/") and " - cgroup" in line:
                found.append(Path(point))
        if not found and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            found.append(Path("/sys/fs/cgroup"))  # pure v2
        return found

    # -- waiting ----------------------------------------------------------------------

    def _wait(self, what: str, deadline: float, ready: Any) -> None:
        while True:
            self.check_alive()
            try:
                if ready():
                    return
            except (OSError, http.client.HTTPException, KubeError):
                pass
            if time.monotonic() > deadline:
                raise KubeError(f"cluster: {what}: timed out\n{self.diagnostics()}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        """Raises KubeError, with the logs, when a component has exited."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise KubeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _apiserver_ready(self) -> bool:
        status, _ = self._request("GET", "/readyz")
        return status == 200

    def _create_runtime_class(self) -> None:
        """RuntimeClass `stasis` (node.k8s.io/v1, GA in 1.20) -> the CRI handler."""
        body = {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": STASIS_HANDLER},
            "handler": STASIS_HANDLER,
        }
        status, reply = self._request("POST", "/apis/node.k8s.io/v1/runtimeclasses", body)
        if status not in (201, 409):
            raise KubeError(f"creating RuntimeClass {STASIS_HANDLER}: {status} {reply}")

    def _node_ready(self) -> bool:
        node = self.api("GET", f"/api/v1/nodes/{self.node_name}")
        conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        taints = [t for t in node["spec"].get("taints", []) if t["effect"] != "PreferNoSchedule"]
        return conditions.get("Ready") == "True" and not taints

    def _default_sa_ready(self) -> bool:
        sa = self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return bool(sa.get("secrets"))  # the 1.20 admission wants its token secret

    # -- clients ----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.apiserver_port, context=self._ssl, timeout=30
        )
        try:
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def api(self, method: str, path: str, body: object = None) -> Any:
        """One apiserver request (as admin); the decoded JSON reply. KubeError unless 2xx."""
        status, reply = self._request(method, path, body)
        if not 200 <= status < 300:
            raise KubeError(f"{method} {path}: {status} {reply}")
        return reply

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl (1.32 against this 1.20 apiserver: give `apply` --validate=false).
        Raises KubeError, with stdout and stderr, when check and it fails."""
        cmd = [
            KUBECTL,
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        result = subprocess.run(
            cmd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and result.returncode != 0:
            raise KubeError(
                f"{' '.join(args)}: exit {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def pod(self, name: str, namespace: str = "default") -> Any:
        """The pod object, as the apiserver has it now."""
        return self.api("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def wait_pod(
        self, name: str, phase: str = "Running", namespace: str = "default", timeout: float = 60
    ) -> Any:
        """Waits until the pod reaches phase (Running: also all its containers ready);
        returns it. KubeError with its status, events and the runtime's log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            pod = self.pod(name, namespace)
            self._pod_uids.add(pod["metadata"]["uid"])
            now = pod.get("status", {}).get("phase")
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if now == phase and (phase != "Running" or all(s["ready"] for s in statuses)):
                return pod
            if now in ("Succeeded", "Failed") and now != phase:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise KubeError(
            f"pod {namespace}/{name}: phase {now!r}, wanted {phase!r}\n"
            f"status: {json.dumps(pod.get('status'), indent=1)}\n"
            f"events:\n{self.events(name, namespace)}\n"
            f"containerd log (tail):\n{self.containerd.log_tail(30)}"
        )

    def events(self, name: str, namespace: str = "default") -> str:
        """The pod's events, one a line (for failure messages)."""
        try:
            items = self.api(
                "GET",
                f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name={name}",
            )["items"]
        except (OSError, KubeError, http.client.HTTPException) as e:
            return f"(no events: {e})"
        return "\n".join(f"  {e.get('reason')}: {e.get('message')}" for e in items)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a component's log."""
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        """Each component's log tail and the containerd log tail."""
        parts = [f"== {n} (pid {p.pid}, rc {p.poll()}):\n{self.log_tail(n, 15)}"
                 for n, p in self._procs.items()]  # fmt: skip
        parts.append(f"== containerd:\n{self.containerd.log_tail(15)}")
        return "\n".join(parts)

    # -- stop -------------------------------------------------------------------------

    def stop(self, timeout: float = 120.0) -> list[str]:
        """Deletes all pods (gracefully, so the kubelet tears down sandboxes and
        volumes), stops every component by PID, unmounts and removes what is left.
        Returns the leaks found on the way (empty when the run was clean).

        timeout bounds the wait for pods to go: a kubelet 1.20 may hold a deleted pod
        until its container GC (once a minute) removes a dead sandbox."""
        leaks: list[str] = []
        if self._alive("kube-apiserver") and self._alive("kubelet"):
            leaks += self._delete_pods(timeout)
        for name in reversed(list(self._procs)):  # kubelet first, etcd last
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    leaks.append(f"{name} (pid {proc.pid}) ignored SIGTERM: killed")
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        leaks += self._cleanup_mounts()
        leaks += self._cleanup_cgroups()
        self._cleanup_pod_logs()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return leaks

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _delete_pods(self, timeout: float) -> list[str]:
        try:
            pods = self.api("GET", "/api/v1/pods")["items"]
        except (OSError, KubeError, http.client.HTTPException) as e:
            return [f"could not list pods: {e}"]
        if not pods:
            return []
        self._pod_uids.update(p["metadata"]["uid"] for p in pods)
        r = self.kubectl(
            "delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=true",
            f"--timeout={int(timeout)}s", check=False, timeout=timeout + 10,
        )  # fmt: skip
        if r.returncode == 0:
            return []
        self.kubectl(
            "delete", "pods", "--all", "--all-namespaces", "--grace-period=0", "--force",
            check=False,
        )  # fmt: skip
        return [f"pods not deleted within {timeout}s (forced): {r.stderr.strip()}"]

    def _cleanup_mounts(self) -> list[str]:
        # The kubelet bind-mounts its root dir onto itself (rshared): expected.
        points = [p for p in mounts_under(self.workdir) if p != self.kubelet_root]
        leaks = [f"mount left: {p}" for p in points]
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range(3):  # stacked mounts need more than one pass
            found = mounts_under(self.workdir)
            if not found:
                break
            for point in found:
                libc.umount2(str(point).encode(), _MNT_DETACH)
        return leaks

    def _cleanup_cgroups(self) -> list[str]:
        """Removes the cgroup root (QoS and pod cgroups the kubelet leaves are empty);
        a cgroup that still holds processes is a leak (they are killed)."""
        leaks: list[str] = []
        for ctrl in self._cgroup_controllers():
            top = ctrl / self.cgroup_root.lstrip("/")
            if not top.is_dir():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*dirs, top]:
                with contextlib.suppress(OSError):
                    procs = (d / "cgroup.procs").read_text().split()
                    if procs:
                        leaks.append(f"processes {procs} left in cgroup {d}")
                        for pid in procs:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(pid), signal.SIGKILL)
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)
        return leaks

    def _cleanup_pod_logs(self) -> None:
        """/var/log/pods/<ns>_<name>_<uid> of this cluster's pods, and the kubelet's
        /var/log/containers links into them."""
        if not self._pod_uids:
            return
        for d in Path("/var/log/pods").glob("*_*_*"):
            if d.name.rsplit("_", 1)[-1] in self._pod_uids:
                shutil.rmtree(d, ignore_errors=True)
        for link in Path("/var/log/containers").glob("*.log"):
            with contextlib.suppress(OSError):
                if any(uid in os.readlink(link) for uid in self._pod_uids):
                    link.unlink()

    def __repr__(self) -> str:
        return f"KubeCluster({str(self.workdir)!r}, {self.server})"
