"""A private containerd instance for integration tests, and a leak check.

The binaries come from the test bed (tests/bed/setup.sh unpacks containerd 1.7 and 2.1
and builds 2.3 under the cache, never system-wide). Each instance has its own root,
state and sockets under a short work directory (/run/stasis-test/<id>/: unix socket
paths are limited to 108 bytes) and finds runtime shims by binary name in PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_NAMESPACE = "stasis-test"
RUN_BASE = Path(os.environ.get("STASIS_TEST_RUN_DIR", "/run/stasis-test"))
# Where the runc shim keeps runc's state (--root), by namespace; CRIU-era runc too.
RUNC_ROOTS: tuple[Path, ...] = (Path("/run/containerd/runc"), Path("/run/runc"))
SETUP_HINT = "run `bash tests/bed/setup.sh` as root to install the test bed"

# Plugins kept off: CRI (unless cri=True; tests mostly drive containerd through ctr) and NRI, whose
# socket is a machine-wide path that private instances must not fight over.
_DISABLED_PLUGINS: dict[str, list[str]] = {
    "1.7": ["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"],
    "2.1": [
        "io.containerd.grpc.v1.cri",
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.podsandbox.controller.v1.podsandbox",
        "io.containerd.grpc.v1.sandbox-controllers",  # nothing to serve without the above
        "io.containerd.nri.v1.nri",
    ],
}
_DISABLED_PLUGINS["2.3"] = _DISABLED_PLUGINS["2.1"]
_CONFIG_VERSION = {"1.7": 2, "2.1": 3, "2.3": 3}
# The versions from Debian's packages, which every integration test may use; 2.3 is
# built from source (tests/bed/setup.sh) for the tests that compare CRI handlers.
PACKAGED_VERSIONS = ("1.7", "2.1")
_MNT_DETACH = 2

# With cri=True: 1.7 for the Kubernetes tests (kubelet 1.20 speaks CRI v1alpha2, which
# 2.x dropped), 2.1 for CRI v1 tests driven by tests/bed/cri.py (checkpoint restore).
CRI_NAMESPACE = "k8s.io"
CRI_SANDBOX_IMAGE = "registry.k8s.io/pause:3.8"  # tests/bed/images.py PAUSE_REF
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
STASIS_RUNTIME_TYPE = "io.containerd.stasis.v2"
STASIS_HANDLER = "stasis"  # the CRI runtime handler (RuntimeClass handler)
STASIS_ANNOTATIONS = "stasis.dev/*"  # pod/container annotations passed to the shim


def cache_dir() -> Path:
    """The test bed's cache (containerd prefixes, CRIU build, images)."""
    return Path(os.environ.get("STASIS_CACHE", "/var/cache/stasis-testbed"))


def images_dir() -> Path:
    """Where setup.sh puts busybox.tar and pause.tar."""
    return cache_dir() / "images"


def bed_missing(versions: Iterable[str] = PACKAGED_VERSIONS) -> str | None:
    """Why the test bed cannot run (a sentence), or None when it is installed."""
    if os.geteuid() != 0:
        return "integration tests need root"
    for version in versions:
        binary = cache_dir() / f"containerd-{version}" / "usr/bin/containerd"
        if not binary.is_file():
            return f"test bed missing ({binary} not found): {SETUP_HINT}"
    for name in ("busybox.tar", "pause.tar"):
        if not (images_dir() / name).is_file():
            return f"test bed missing ({images_dir() / name} not found): {SETUP_HINT}"
    return None


def unique_id(prefix: str) -> str:
    """prefix plus a random suffix: a container id no other test session will use.

    Instances with the same namespace share the runc shim's runc root
    (/run/containerd/runc/<namespace>) and cgroup paths (/<namespace>/<id>), so two
    pytest sessions on one machine collide on fixed container ids.
    """
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class CtrError(subprocess.CalledProcessError):
    """ctr failed; str() carries its output, which CalledProcessError's does not."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


class Containerd:
    """A containerd daemon of the given version ("1.7", "2.1" or "2.3") private to workdir.

    Lifecycle: start() -> [restart()]* -> stop(). stop() is a full teardown: it
    removes every task and container, ends the daemon and its leftover shims and
    container processes, unmounts what is left under workdir and deletes workdir.
    """

    def __init__(
        self,
        version: str,
        workdir: Path,
        extra_path: Sequence[Path] = (),
        *,
        namespace: str = DEFAULT_NAMESPACE,
        log_level: str = "debug",
        cri: bool = False,
        registry_config_path: Path | None = None,
        cni_port_mappings: bool = False,
        stasis_handlers: Mapping[str, Mapping[str, str | bool]] | None = None,
    ) -> None:
        if version not in _CONFIG_VERSION:
            raise ValueError(f"containerd version {version!r} not in the bed")
        self.version = version
        self.workdir = Path(workdir)
        self.extra_path = [Path(p) for p in extra_path]
        self.namespace = namespace
        self.log_level = log_level
        self.prefix = cache_dir() / f"containerd-{version}"
        self.bin_dir = self.prefix / "usr/bin"
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # CRI: a CNI bridge and subnet of its own, so that instances do not share one.
        self.cri = cri
        self.cni_conf_dir = self.workdir / "cni" / "net.d"
        self.cni_bridge = f"stc{uuid.uuid4().hex[:8]}"  # IFNAMSIZ: 15 characters at most
        self.cni_subnet = _free_subnet() if cri else None
        # CRI's registry hosts directory (certs.d layout: <host:port>/hosts.toml), if any.
        self.registry_config_path = registry_config_path
        # CNI portmap after the bridge: pods' host ports (iptables DNAT), off by default
        # because its teardown runs iptables for every pod.
        self.cni_port_mappings = cni_port_mappings
        # More CRI handlers of Stasis's runtime type: name -> their `options` table.
        self.stasis_handlers = dict(stasis_handlers or {})

    @classmethod
    def in_run_dir(cls, version: str, extra_path: Sequence[Path] = (), **kw: Any) -> Containerd:
        """An instance with a fresh short work directory under RUN_BASE."""
        workdir = RUN_BASE / f"{version.replace('.', '')}-{uuid.uuid4().hex[:8]}"
        return cls(version, workdir, extra_path, **kw)

    # -- addresses and environment ---------------------------------------------------

    @property
    def address(self) -> Path:
        """The grpc socket (ctr --address, the shims' -address)."""
        return self.workdir / "c.sock"

    @property
    def ttrpc_address(self) -> Path:
        """The ttrpc socket shims publish events to (TTRPC_ADDRESS)."""
        return self.workdir / "c.sock.ttrpc"

    @property
    def pid(self) -> int | None:
        """The daemon's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def env(self) -> dict[str, str]:
        """containerd's environment: shims are looked up by name in this PATH."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        path = [*map(str, self.extra_path), str(self.bin_dir)]
        path.append(
            env.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )
        env["PATH"] = ":".join(path)
        return env

    def config_toml(self) -> str:
        """The daemon's configuration (schema 2 for 1.7, 3 for 2.x)."""
        plugins = _DISABLED_PLUGINS[self.version]
        if self.cri:
            plugins = [p for p in plugins if p == "io.containerd.nri.v1.nri"]
        disabled = ", ".join(f'"{p}"' for p in plugins)
        return f"""\
version = {_CONFIG_VERSION[self.version]}
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.ttrpc_address}"

[debug]
  address = ""
  level = "{self.log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root / "opt"}"
""" + (self._cri_toml() if self.cri else "")

    def _cri_toml(self) -> str:
        """The CRI plugin's section: runc (default) and stasis handlers, CNI bridge.

        1.7 keeps it all under the grpc.v1.cri plugin (schema 2); 2.x splits it into
        cri.v1.images and cri.v1.runtime (schema 3): see _cri_toml_v3.

        restrict_oom_score_adj: sandboxes ask for oom_score_adj -998, which a VM without
        CAP_SYS_RESOURCE refuses. Network namespaces live under the state directory,
        the stream server (exec/attach/port-forward) on a random loopback port.
        """
        if self.version != "1.7":
            return self._cri_toml_v3()
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        registry = ""
        if self.registry_config_path is not None:
            registry = f'  [{cri}.registry]\n    config_path = "{self.registry_config_path}"\n'
        return f"""
[{cri}]
  sandbox_image = "{CRI_SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.{STASIS_HANDLER}]
      runtime_type = "{STASIS_RUNTIME_TYPE}"
      pod_annotations = ["{STASIS_ANNOTATIONS}"]
      container_annotations = ["{STASIS_ANNOTATIONS}"]
{self._stasis_handlers_toml(f"{cri}.containerd.runtimes")}{registry}"""

    def _cri_toml_v3(self) -> str:
        """containerd 2.x's CRI sections (same settings as the 1.7 ones)."""
        images = 'plugins."io.containerd.cri.v1.images"'
        runtime = 'plugins."io.containerd.cri.v1.runtime"'
        registry = ""
        if self.registry_config_path is not None:
            registry = f'  [{images}.registry]\n    config_path = "{self.registry_config_path}"\n'
        return f"""
[{images}]
  snapshotter = "overlayfs"
  [{images}.pinned_images]
    sandbox = "{CRI_SANDBOX_IMAGE}"
{registry}
[{runtime}]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [{runtime}.cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
  [{runtime}.containerd]
    default_runtime_name = "runc"
    [{runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{runtime}.containerd.runtimes.{STASIS_HANDLER}]
      runtime_type = "{STASIS_RUNTIME_TYPE}"
      pod_annotations = ["{STASIS_ANNOTATIONS}"]
      container_annotations = ["{STASIS_ANNOTATIONS}"]
{self._stasis_handlers_toml(f"{runtime}.containerd.runtimes")}
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

    def _stasis_handlers_toml(self, runtimes: str) -> str:
        """The extra Stasis handlers' tables under ``runtimes`` (strings and booleans)."""
        out = ""
        for name, options in self.stasis_handlers.items():
            out += f'    [{runtimes}.{name}]\n      runtime_type = "{STASIS_RUNTIME_TYPE}"\n'
            out += f"    [{runtimes}.{name}.options]\n"
            for key, value in options.items():  # JSON's strings and booleans are TOML's
                out += f"      {key} = {json.dumps(value)}\n"
        return out

    def cni_conflist(self) -> dict[str, object]:
        """A bridge + host-local network (IPAM state under the workdir), with portmap
        when cni_port_mappings; CRI adds lo."""
        plugins: list[dict[str, object]] = [
            {
                "type": "bridge",
                "bridge": self.cni_bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(self.cni_subnet)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(self.workdir / "cni" / "ipam"),
                },
            }
        ]
        if self.cni_port_mappings:
            plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
        return {"cniVersion": "0.4.0", "name": f"stasis-{self.cni_bridge}", "plugins": plugins}

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Starts the daemon and waits until it answers."""
        if self.pid is not None:
            raise RuntimeError(f"containerd {self.version} already running (pid {self.pid})")
        for d in (self.workdir, self.root, self.state):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_toml())
        if self.cri:
            self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
            conf = self.cni_conf_dir / "10-stasis.conflist"
            conf.write_text(json.dumps(self.cni_conflist(), indent=2) + "\n")
        with self.log_path.open("ab") as log:
            # Its own session: a ^C to pytest must not kill it before teardown runs.
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "containerd"), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"containerd {self.version} exited with {code} at start:\n{self.log_tail()}"
                )
            if self.address.exists():
                probe = self.ctr("version", check=False, timeout=5)
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                self._terminate()
                raise RuntimeError(
                    f"containerd {self.version} not ready in {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def restart(self, timeout: float = 30.0) -> None:
        """Stops the daemon only (shims and containers keep running) and starts it again."""
        self._terminate()
        self.start(timeout)

    def stop(self, settle: float = 5.0) -> Leftovers:
        """Full teardown: tasks, containers, daemon, leftover processes, mounts, workdir.

        Returns what was still there once tasks and containers were deleted through
        ctr and the daemon had stopped (after up to `settle` seconds for shims to
        exit): empty for a clean run, else leaks that stop() then cleaned up by force.
        """
        if self.pid is not None:
            self._delete_everything()
        self._terminate()
        deadline = time.monotonic() + settle
        while (found := leftovers(self.workdir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if found:
            reap_leftovers(self.workdir)
        for ctrl in Path("/sys/fs/cgroup").glob(f"*/{self.namespace}"):
            with contextlib.suppress(OSError):  # busy while another instance uses it
                ctrl.rmdir()
        if self.cri and self.cni_port_mappings:
            self._remove_portmap_rules()
        if self.cri and Path(f"/sys/class/net/{self.cni_bridge}").exists():
            subprocess.run(["ip", "link", "delete", self.cni_bridge], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return found

    def _remove_portmap_rules(self) -> None:
        """Deletes the NAT rules CNI portmap left for this instance's pods (those whose
        CNI DEL never ran): the rules whose comment names this network, and their chains."""
        listed = subprocess.run(
            ["iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        for line in listed.splitlines():
            if not line.startswith("-A ") or f"stasis-{self.cni_bridge}" not in line:
                continue
            rule = shlex.split(line)[1:]
            subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=False)
            chain = rule[rule.index("-j") + 1] if "-j" in rule else ""
            if chain.startswith("CNI-DN-"):
                subprocess.run(["iptables", "-t", "nat", "-F", chain], check=False)
                subprocess.run(["iptables", "-t", "nat", "-X", chain], check=False)

    def _delete_everything(self) -> None:
        """Best effort: kill and delete every task and container in every namespace."""
        namespaces = self.ctr("namespaces", "ls", "-q", check=False).stdout.split()
        for ns in namespaces:
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("tasks", "delete", "--force", task, namespace=ns, check=False)
            for ctr_id in self.ctr(
                "containers", "ls", "-q", namespace=ns, check=False
            ).stdout.split():
                self.ctr("containers", "delete", ctr_id, namespace=ns, check=False)

    def _terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM the daemon this object started, SIGKILL after timeout; reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- clients ----------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs this version's ctr against this daemon; raises CtrError when check fails."""
        cmd = [
            str(self.bin_dir / "ctr"),
            "--address",
            str(self.address),
            "--namespace",
            namespace or self.namespace,
            *args,
        ]
        result = subprocess.run(
            cmd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
        )
        if check and result.returncode != 0:
            raise CtrError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def import_image(self, tar: Path, namespace: str | None = None) -> None:
        """Imports an OCI image tarball (see images.py) and unpacks it (for the CRI
        plugin: namespace CRI_NAMESPACE)."""
        self.ctr("images", "import", str(tar), timeout=120, namespace=namespace)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def __repr__(self) -> str:
        return f"Containerd({self.version!r}, {str(self.workdir)!r}, pid={self.pid})"


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route on this machine overlaps (for a CNI bridge)."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    ).stdout
    used = []
    for line in routes.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            dst = line.split()[0]
            dst = line.split()[1] if dst in ("local", "broadcast", "unicast") else dst
            if dst != "default":
                used.append(ipaddress.ip_network(dst, strict=False))
    for _ in range(100):
        n = int.from_bytes(os.urandom(2), "big")
        net = ipaddress.IPv4Network(f"10.{200 + n % 50}.{n >> 8}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for a CNI bridge")


# -- leak checks ---------------------------------------------------------------------


@dataclass
class RuncState:
    """A runc container (its state dir) whose bundle lies under a work directory."""

    root: Path  # runc --root
    id: str
    state_dir: Path
    init_pid: int | None  # None when the init process is gone


@dataclass
class Leftovers:
    """What a containerd work directory left behind; falsy when nothing."""

    mounts: list[Path] = field(default_factory=list)
    runc_states: list[RuncState] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)  # pids naming the workdir

    def __bool__(self) -> bool:
        return bool(self.mounts or self.runc_states or self.processes)


def _unescape_mountinfo(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path, deepest (and latest mounted) first."""
    found: list[tuple[int, int, Path]] = []
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for n, line in enumerate(f):
            point = _unescape_mountinfo(line.split()[4])
            if point == str(path) or point.startswith(prefix):
                found.append((point.count("/"), n, Path(point)))
    return [p for _, _, p in sorted(found, reverse=True)]


def process_start_ticks(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), None once it is gone: with the
    PID, it names one process even after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _runc_states(workdir: Path, runc_roots: Sequence[Path]) -> list[RuncState]:
    found = []
    prefix = str(workdir).rstrip("/") + "/"
    for root in runc_roots:
        # <root>/<id>/state.json, or <root>/<namespace>/<id>/state.json (runc shim)
        for state_file in [*root.glob("*/state.json"), *root.glob("*/*/state.json")]:
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            labels = state.get("config", {}).get("labels") or []
            bundle = next((lb[7:] for lb in labels if lb.startswith("bundle=")), "")
            if not bundle.startswith(prefix):
                continue
            pid = state.get("init_process_pid")
            if not (pid and process_start_ticks(pid) == str(state.get("init_process_start"))):
                pid = None
            found.append(
                RuncState(state_file.parent.parent, state_file.parent.name, state_file.parent, pid)
            )
    return found


def _pids_naming(text: str) -> list[int]:
    me = os.getpid()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def leftovers(workdir: Path, runc_roots: Sequence[Path] = RUNC_ROOTS) -> Leftovers:
    """Mounts under workdir, runc containers whose bundle is under it, and processes
    whose command line names it (containerd, shims). Empty after a clean stop()."""
    workdir = Path(workdir)
    return Leftovers(
        mounts=mounts_under(workdir),
        runc_states=_runc_states(workdir, runc_roots),
        processes=_pids_naming(str(workdir) + "/"),
    )


def reap_leftovers(workdir: Path, runc_roots: Sequence[Path] = RUNC_ROOTS) -> Leftovers:
    """Ends what leftovers() finds: kills container inits and processes naming workdir,
    deletes the runc states and unmounts (deepest first). Returns what it found."""
    found = leftovers(workdir, runc_roots)
    for st in found.runc_states:
        if st.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.init_pid, signal.SIGKILL)
        subprocess.run(
            ["runc", "--root", str(st.root), "delete", "--force", st.id],
            capture_output=True,
            timeout=30,
            check=False,
        )
    for pid in found.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(found.processes, timeout=5.0)
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(3):  # stacked mounts need more than one pass
        points = mounts_under(workdir)
        if not points:
            break
        for point in points:
            libc.umount2(str(point).encode(), _MNT_DETACH)
    return found


def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
