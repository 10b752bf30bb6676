"""packaging/: the chart renders packaging/manifests, which a real apiserver accepts and
whose DaemonSet installs Stasis on the node, after which a `stasis` pod runs.

No registry package provides `helm` here (Debian has none): the chart's templates keep to
`{{ .Values.x }}` and `{{ .Values.x | quote }}`, which render_chart() below expands; with
a `helm` binary on PATH, `helm template` is compared as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from bed.containerd import CRI_NAMESPACE, RUN_BASE, Containerd, images_dir
from bed.hostkey import new_signing_key_removed
from bed.kube import KubeCluster, kube_bed_missing

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "packaging" / "manifests"
CHART = REPO / "packaging" / "helm" / "stasis"
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def load_docs(text: str) -> list[dict[str, Any]]:
    """The YAML documents of text, empty ones left out."""
    return [d for d in yaml.safe_load_all(text) if d]


def by_identity(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Objects keyed by (kind, namespace, name)."""
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}


def render_chart(overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for values.yaml (deep-updated with overrides)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def update(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict):
                update(into.setdefault(k, {}), v)
            else:
                into[k] = v

    update(values, overrides or {})

    def expand(match: re.Match[str]) -> str:
        expr = match.group(1)
        m = re.fullmatch(r"\.Values\.([\w.]+)(\s*\|\s*quote)?", expr)
        assert m, f"render_chart does not know {{{{ {expr} }}}}: keep templates simple"
        value: Any = values
        for key in m.group(1).split("."):
            value = value[key]
        return json.dumps(str(value)) if m.group(2) else str(value)

    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        docs += load_docs(_ACTION.sub(expand, template.read_text()))
    return docs


def manifest_docs() -> list[dict[str, Any]]:
    """The objects of packaging/manifests, in file order."""
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += load_docs(path.read_text())
    return docs


def test_chart_renders_the_manifests() -> None:
    manifests = by_identity(manifest_docs())
    assert set(manifests) == set(by_identity(render_chart()))
    assert manifests == by_identity(render_chart())
    if helm := shutil.which("helm"):
        out = subprocess.run(
            [helm, "template", "stasis", str(CHART)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert by_identity(load_docs(out)) == manifests


def test_chart_values_reach_the_daemonset() -> None:
    docs = by_identity(render_chart({"node": {"containerdConfig": "/x/config.toml"}}))
    ds = docs[("DaemonSet", "stasis-system", "stasis-installer")]
    env = {e["name"]: e["value"] for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CONTAINERD_CONFIG"] == "/x/config.toml"


# -- on a real cluster --------------------------------------------------------------------


@dataclass
class Node:
    """A single-node cluster whose containerd looks for shims in bin_dir first."""

    cluster: KubeCluster
    prefix: Path
    bin_dir: Path


def _install_env(node_prefix: Path, bin_dir: Path) -> dict[str, str]:
    return dict(os.environ, STASIS_PREFIX=str(node_prefix), STASIS_BIN_DIR=str(bin_dir))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A private cluster; the installer image imported into its containerd. Teardown
    uninstalls what the DaemonSet installed (install.sh --uninstall on the host)."""
    if why := kube_bed_missing():
        pytest.fail(why, pytrace=False)
    work = RUN_BASE / f"pk-{uuid.uuid4().hex[:8]}"
    prefix, bin_dir = work / "opt-stasis", work / "bin"
    image_dir = tmp_path_factory.mktemp("installer")
    subprocess.run(
        [sys.executable, str(REPO / "packaging/installer/build.py"), str(image_dir)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    containerd = Containerd.in_run_dir("1.7", [bin_dir], cri=True)
    cluster: KubeCluster | None = None
    with new_signing_key_removed():  # the DaemonSet's install.sh makes the host's key
        try:
            containerd.start()
            for tar in (images_dir() / "pause.tar", images_dir() / "busybox.tar"):
                containerd.import_image(tar, namespace=CRI_NAMESPACE)
            containerd.import_image(image_dir / "stasis-installer.tar", namespace=CRI_NAMESPACE)
            cluster = KubeCluster.in_run_dir(containerd)
            cluster.start()
            yield Node(cluster, prefix, bin_dir)
        finally:
            leaks = cluster.stop() if cluster is not None else []
            if (prefix / "install" / "manifest").exists():
                subprocess.run(
                    ["bash", str(prefix / "installer" / "install.sh"), "--uninstall"],
                    env=_install_env(prefix, bin_dir),
                    check=False,
                    timeout=300,
                )
            containerd.stop()
            shutil.rmtree(work, ignore_errors=True)
    assert not leaks, leaks


def test_manifests_pass_server_side_dry_run(node: Node) -> None:
    kube = node.cluster
    # Namespaced objects are checked in a namespace that exists (dry-run creates none).
    kube.kubectl("create", "namespace", "stasis-system")
    try:
        for path in sorted(MANIFESTS.glob("*.yaml")):
            kube.kubectl("apply", "--dry-run=server", "--validate=false", "-f", str(path))
    finally:
        kube.kubectl(
            "delete", "namespace", "stasis-system", "--wait=true", "--timeout=120s",
            check=False, timeout=150,
        )  # fmt: skip


def _wait_ready(kube: KubeCluster, namespace: str, selector: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pods = kube.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
        for pod in pods["items"]:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if statuses and all(s["ready"] for s in statuses):
                return str(pod["metadata"]["name"])
        if time.monotonic() > deadline:
            logs = kube.kubectl("logs", "-n", namespace, "-l", selector, "--tail=40", check=False)
            raise AssertionError(f"installer not ready: {json.dumps(pods)[:3000]}\n{logs.stdout}")
        time.sleep(2)


def test_daemonset_installs_stasis_then_a_pod_runs_checkpoints_and_restores(node: Node) -> None:
    kube = node.cluster
    containerd = kube.containerd
    docs = manifest_docs()
    for doc in docs:
        if doc["kind"] == "DaemonSet":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["env"] = [
                {"name": "CONTAINERD_CONFIG", "value": str(containerd.config_path)},
                {"name": "CONTAINERD_ADDRESS", "value": str(containerd.address)},
                {"name": "STASIS_PREFIX", "value": str(node.prefix)},
                {"name": "STASIS_BIN_DIR", "value": str(node.bin_dir)},
                {"name": "STASIS_RESTART_CONTAINERD", "value": "none"},
            ]
    config_before = containerd.config_path.read_bytes()
    text = yaml.safe_dump_all(docs)
    kube.kubectl("apply", "--validate=false", "-f", "-", input=text)
    try:
        _wait_ready(kube, "stasis-system", "app.kubernetes.io/component=installer", 600)
        shim = node.bin_dir / "containerd-shim-stasis-v2"
        assert shim.resolve() == node.prefix / "venv" / "bin" / "containerd-shim-stasis-v2"
        assert (node.prefix / "venv" / "bin" / "stasis-exec-shepherd").is_file()
        # The bed's config names the stasis handler already: the installer leaves it alone.
        assert containerd.config_path.read_bytes() == config_before

        pod = f"on-stasis-{uuid.uuid4().hex[:6]}"
        restored = f"{pod}-restored"
        store = node.prefix.parent / "store"
        kube.kubectl(
            "apply",
            "--validate=false",
            "-f",
            "-",
            input=yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": pod},
                    "spec": {
                        "runtimeClassName": "stasis",
                        "containers": [
                            {
                                "name": "main",
                                "image": "docker.io/stasis/busybox:test",
                                "imagePullPolicy": "Never",
                                "command": ["sh", "-c", COUNTER],
                            }
                        ],
                    },
                }
            ),
        )
        try:
            kube.wait_pod(pod, timeout=120)
            cmdlines = [_read(p) for p in Path("/proc").glob("[0-9]*/cmdline")]
            shims = [c for c in cmdlines if b"containerd-shim-stasis-v2" in c]
            ours = [c for c in shims if str(node.prefix).encode() in c]
            assert ours, f"no shim from {node.prefix} runs the pod: {shims}"

            # The installed Stasis checkpoints the pod and restores it as a new one,
            # which goes on counting (its own CLI, from the installed venv).
            before = _count_past(kube, pod, 20)
            stasis = [str(node.prefix / "venv" / "bin" / "stasis"),
                      "--address", str(containerd.address)]  # fmt: skip
            kubeconfig = f"--kubeconfig={kube.kubeconfig}"
            ref = subprocess.run(
                [*stasis, "kube", "checkpoint", "--on-node", f"default/{pod}", "--to", str(store),
                 kubeconfig],
                capture_output=True, text=True, check=True, timeout=240,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            subprocess.run(
                [*stasis, "kube", "restore", "--on-node", ref, "--name", restored, kubeconfig],
                capture_output=True, text=True, check=True, timeout=240,
            )  # fmt: skip
            assert _count_past(kube, restored, 0) >= before, "the restored pod counts on"
        finally:
            kube.kubectl(
                "delete", "pod", pod, restored, "--ignore-not-found", "--wait=true",
                "--timeout=120s", check=False, timeout=150,
            )  # fmt: skip
    finally:
        kube.kubectl(
            "delete", "--wait=true", "--timeout=120s", "-f", "-", input=text,
            check=False, timeout=150,
        )  # fmt: skip


COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


def _count_past(kube: KubeCluster, pod: str, above: int, timeout: float = 60) -> int:
    """The pod's counter once it is past ``above``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kube.kubectl("exec", pod, "--", "cat", "/tmp/count", check=False)
        n = int(r.stdout.strip()) if r.stdout.strip().isdigit() else 0
        if n > above:
            return n
        time.sleep(0.3)
    raise AssertionError(f"pod {pod} never counted past {above}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
