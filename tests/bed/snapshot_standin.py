"""VolumeSnapshot support for the test cluster: the snapshot.storage.k8s.io CRDs, and
a TEST STAND-IN for the CSI snapshot controller.

The bed runs no CSI driver and no snapshot controller, and its volumes are hostPath
directories that nothing can snapshot. What a test can check is the API side: that a
VolumeSnapshot is created with the right source and class, that its creator waits
for `status.readyToUse`, and that a claim is restored with the snapshot as its data
source. `SnapshotControllerStandIn` plays the controller's part of that, and only
that: for each VolumeSnapshot that is not ready it creates a VolumeSnapshotContent
bound to it (driver `standin.snapshot.stasis.dev`, a made-up snapshotHandle; no data
is copied) and sets the snapshot's status (bound content, readyToUse, restoreSize =
the source claim's capacity). It never adds finalizers, so the objects delete freely.

`install_snapshot_crds` creates the vendored CRDs (tests/bed/crds/, external-snapshotter
v4.2.1) that are missing and waits until they are Established; `remove_crds` deletes
those it created.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

CRD_DIR = Path(__file__).resolve().parent / "crds"
GROUP, VERSION = "snapshot.storage.k8s.io", "v1"
STANDIN_DRIVER = "standin.snapshot.stasis.dev"


def crd_documents() -> list[dict[str, Any]]:
    """The vendored CustomResourceDefinitions, as dicts."""
    docs = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def install_snapshot_crds(api: client.ApiextensionsV1Api, timeout: float = 60) -> list[str]:
    """Creates the snapshot CRDs that do not exist yet and waits until all are
    Established. Returns the names of those it created (for remove_crds)."""
    created: list[str] = []
    names: list[str] = []
    try:
        for doc in crd_documents():
            doc.get("metadata", {}).pop("creationTimestamp", None)
            doc.pop("status", None)
            names.append(doc["metadata"]["name"])
            try:
                api.create_custom_resource_definition(doc)
                created.append(doc["metadata"]["name"])
            except ApiException as e:
                if e.status != 409:
                    raise
        deadline = time.monotonic() + timeout
        for name in names:
            while not _established(api, name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not Established after {timeout}s")
                time.sleep(0.2)
    except BaseException:
        remove_crds(api, created)
        raise
    return created


def _established(api: client.ApiextensionsV1Api, name: str) -> bool:
    crd = api.read_custom_resource_definition(name)
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def remove_crds(api: client.ApiextensionsV1Api, names: list[str], timeout: float = 60) -> None:
    """Deletes the named CRDs (and so every object of theirs) and waits until gone."""
    for name in names:
        with contextlib.suppress(ApiException):
            api.delete_custom_resource_definition(name)
    deadline = time.monotonic() + timeout
    for name in names:
        while time.monotonic() < deadline:
            try:
                api.read_custom_resource_definition(name)
            except ApiException as e:
                if e.status == 404:
                    break
                raise
            time.sleep(0.2)


class SnapshotControllerStandIn:
    """A thread that marks VolumeSnapshots ready (see the module docstring). A TEST
    STAND-IN, not a snapshot controller: nothing is copied.

    Use as a context manager; `hold()` stops it marking (to test waiting), `release()`
    resumes. `errors` collects what went wrong in the thread; `stop()` deletes the
    VolumeSnapshotContents it created."""

    def __init__(self, api_client: client.ApiClient, interval: float = 0.2) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.interval = interval
        self.errors: list[str] = []
        self.contents: list[str] = []
        self._stop = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot-standin", daemon=True)

    def __enter__(self) -> SnapshotControllerStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self) -> None:
        """Stop marking snapshots ready until release()."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for name in self.contents:
            with contextlib.suppress(ApiException):
                self.custom.delete_cluster_custom_object(
                    GROUP, VERSION, "volumesnapshotcontents", name
                )
        self.contents.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._held.is_set():
                continue
            try:
                snapshots = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, "volumesnapshots"
                )["items"]
                for vs in snapshots:
                    if not (vs.get("status") or {}).get("readyToUse"):
                        self._make_ready(vs)
            except Exception as e:  # reported through .errors, checked by the tests
                self.errors.append(f"{type(e).__name__}: {e}")
                if len(self.errors) > 20:
                    return

    def _make_ready(self, vs: dict[str, Any]) -> None:
        meta, spec = vs["metadata"], vs["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        content_name = f"snapcontent-{uid}"
        claim = spec["source"].get("persistentVolumeClaimName")
        size = "0"
        if claim:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, ns)
            size = ((pvc.status and pvc.status.capacity) or {}).get("storage", "0")
        content: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": content_name},
            "spec": {
                "deletionPolicy": "Delete",
                "driver": STANDIN_DRIVER,
                "source": {"snapshotHandle": f"standin-{uid}"},
                "volumeSnapshotRef": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "VolumeSnapshot",
                    "namespace": ns,
                    "name": name,
                    "uid": uid,
                },
            },
        }
        if spec.get("volumeSnapshotClassName"):
            content["spec"]["volumeSnapshotClassName"] = spec["volumeSnapshotClassName"]
        try:
            self.custom.create_cluster_custom_object(
                GROUP, VERSION, "volumesnapshotcontents", content
            )
            self.contents.append(content_name)
        except ApiException as e:
            if e.status != 409:
                raise
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "boundVolumeSnapshotContentName": content_name,
            "creationTime": now,
            "readyToUse": True,
            "restoreSize": size,
        }
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, "volumesnapshots", name, {"status": status}
        )
