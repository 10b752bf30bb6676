"""CRI streaming against a container restored from a checkpoint (containerd 2.1, crictl).

critest checks exec, attach, port-forward and logs on fresh containers; these are the
same calls, through crictl and containerd's stream server, on a container that CRI
restored from a CheckpointContainer archive into a new pod: the restored process's
stdin, stdout and listening socket are wired to the new container and pod. The runc
handler runs the same steps as the reference.

The workload serves a page with busybox httpd on :8080 and counts (/tmp/count, and a
"tick N" line per count on stdout). A CRI restore gives the container no stdin (the
runc shim's neither), so attach reads the restored process's output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.containerd import CRI_NAMESPACE, STASIS_HANDLER, Containerd, cache_dir
from bed.cri import CriClient, Pods
from bed.kube import free_port
from bed.registry import Registry
from bed.workload import stasis, wait_count
from conftest import REGISTRY_BASE

from shim.bootstrap.start import socket_path

pytestmark = pytest.mark.integration

RESTORE_FROM = "stasis.dev/restore-from"
CRICTL = cache_dir() / "cri-tools-v1.34.0" / "crictl"  # tests/bed/setup.sh builds it
CRI_TIMEOUT = 90.0
WORKLOAD = (
    "mkdir -p /www && echo served-from-$(hostname) > /www/index.html && "
    "httpd -p 8080 -h /www && "
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo tick $i; sleep 0.2; done"
)


@dataclass(frozen=True)
class Restored:
    way: str
    handler: str
    pods: Pods
    sandbox: str
    container: str
    count: int  # the counter when the checkpoint was asked for


def _crictl(containerd: Containerd, *args: str, **kw: object) -> list[str]:
    endpoint = f"unix://{containerd.address}"
    return [
        str(CRICTL),
        "--runtime-endpoint",
        endpoint,
        "--image-endpoint",
        endpoint,
        "--timeout",
        "60s",
        *args,
    ]


def _run(containerd: Containerd, *args: str, input: str | None = None) -> str:
    done = subprocess.run(
        _crictl(containerd, *args),
        input=input,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"crictl {' '.join(args)}: {done.stderr}"
    return done.stdout


@contextlib.contextmanager
def _background(containerd: Containerd, *args: str) -> Iterator[subprocess.Popen[str]]:
    """crictl running beside the test (attach, port-forward); ended by its PID."""
    proc = subprocess.Popen(
        _crictl(containerd, *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture(scope="module", autouse=True)
def _crictl_built() -> None:
    if not os.access(CRICTL, os.X_OK):
        pytest.fail(f"no crictl at {CRICTL}: run bash tests/bed/setup.sh", pytrace=False)


# How the container is checkpointed and restored: CRI's CheckpointContainer archive
# (the Kubernetes checkpoint API's) on each handler, or Stasis's own checkpoint into a
# store and a pod naming it (stasis.dev/restore-from).
WAYS = {"stasis": STASIS_HANDLER, "runc": "runc", "stasis-store": STASIS_HANDLER}


@pytest.fixture(scope="module", params=list(WAYS))
def restored(
    request: pytest.FixtureRequest,
    cri_containerd_2_1: Containerd,
    cri: CriClient,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Restored]:
    """The workload checkpointed through CRI and restored into a new pod."""
    way: str = request.param
    handler = WAYS[way]
    containerd = cri_containerd_2_1
    pods = Pods(cri, tmp_path_factory.mktemp(f"logs-{way}"), handler, CRI_TIMEOUT)
    try:
        sandbox, config = pods.run(f"orig-{handler}")
        original = pods.container(
            sandbox,
            config,
            registry.ref(REGISTRY_BASE),
            ["sh", "-c", WORKLOAD],
            name="server",
            own_pid_ns=True,
        )
        count = wait_count(containerd, original, 3, timeout=30)
        saved = tmp_path_factory.mktemp(f"checkpoint-{way}")
        if way == "stasis-store":
            ref = stasis(containerd, "checkpoint", original, "--to", str(saved)).stdout.split()[-1]
            image = registry.ref(REGISTRY_BASE)
            annotations = {RESTORE_FROM: ref}
        else:
            image = str(saved / "server.tar")
            cri.call("CheckpointContainer", container_id=original, location=image, timeout=120)
            annotations = {}
        pods.cri.call("StopPodSandbox", pod_sandbox_id=sandbox, timeout=CRI_TIMEOUT)
        new_sandbox, new_config = pods.run(f"restored-{handler}", annotations=annotations)
        command = ["sh", "-c", WORKLOAD] if annotations else []
        cid = pods.container(new_sandbox, new_config, image, command, name="server")
        status = cri.call("ContainerStatus", container_id=cid).status
        assert status.state == pods.api.CONTAINER_RUNNING
        if not annotations:
            assert status.annotations.get("restored") == "true"  # CRI's own restore
        # The restored container is served by the shim of its handler (a Stasis shim
        # listens on the group's socket; runc's does not).
        stasis_socket = Path(socket_path(str(containerd.address), CRI_NAMESPACE, new_sandbox))
        assert stasis_socket.exists() == (handler == STASIS_HANDLER)
        yield Restored(way, handler, pods, new_sandbox, cid, count)
    finally:
        pods.remove_all()


def test_exec_in_restored_container(cri_containerd_2_1: Containerd, restored: Restored) -> None:
    out = _run(cri_containerd_2_1, "exec", restored.container, "cat", "/tmp/count")
    assert int(out) >= restored.count  # the restored counter, not a fresh one
    # stdin through exec too
    echoed = _run(cri_containerd_2_1, "exec", "-i", restored.container, "cat", input="via exec\n")
    assert echoed == "via exec\n"


def test_logs_of_restored_container_go_on(
    cri_containerd_2_1: Containerd, restored: Restored
) -> None:
    deadline = time.monotonic() + 20
    ticks: list[int] = []
    while time.monotonic() < deadline:
        out = _run(cri_containerd_2_1, "logs", restored.container)
        ticks = [int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("tick ")]
        if ticks and ticks[-1] > restored.count + 2:
            break
        time.sleep(0.3)
    assert ticks, "no output in the restored container's log"
    if restored.way == "stasis-store":  # a new log: the restored process's lines only
        assert ticks[0] > restored.count, ticks[:5]
    else:
        # CRI's restore starts from the log in the archive, written when the checkpoint
        # was done: it may hold a few counts past the dump, which the restored process
        # counts again; it goes on from there, it does not start over.
        assert ticks[0] == 1 and 1 not in ticks[1:], ticks
    assert ticks[-1] > restored.count + 2, ticks[-5:]


def test_attach_to_restored_container(cri_containerd_2_1: Containerd, restored: Restored) -> None:
    with _background(cri_containerd_2_1, "attach", restored.container) as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("tick ") and int(line.split()[1]) > restored.count:
                break
        ticks = [int(ln.split()[1]) for ln in seen if ln.startswith("tick ")]
        assert ticks and ticks[-1] > restored.count, seen[-5:]


def test_port_forward_to_restored_listener(
    cri_containerd_2_1: Containerd, restored: Restored
) -> None:
    port = free_port()
    with _background(cri_containerd_2_1, "port-forward", restored.sandbox, f"{port}:8080"):
        deadline = time.monotonic() + 30
        body, error = "", None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError as e:
                error = e
                time.sleep(0.3)
        # The page the process wrote before its checkpoint, in the original pod.
        assert body.startswith("served-from-orig-"), f"{body!r} ({error})"
