"""The node agent (`stasis agent --node NODE`): takes the Checkpoints the controller
assigned to its node, through the node's containerd and Stasis shims, and removes
their data from the store when they are deleted.

Guarantees: a Checkpoint goes Pending -> Running -> Succeeded or Failed, Running set
only by the agent of ``status.node``; one the agent finds Running that it is not
taking (it restarted mid-way) is Succeeded if its pod checkpoint was published
(fixed name: ``resources.checkpoint_name``), else Failed, never left Running; a
deleted Checkpoint's finalizer goes only once its data is gone from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from runtime.control import resources as r
from runtime.control.cluster import Cluster, Informer, Obj, remove_data
from runtime.control.metrics import Metrics
from runtime.errors import Aborted, NotFound, StasisError
from runtime.kube import pods

log = logging.getLogger("stasis.agent")
COMPONENT = "stasis-agent"
RECOVER_PATIENCE = 600.0  # seconds a Checkpoint left Running may wait for its pod


class Agent:
    """The work of one node's agent; ``handle`` is called with every Checkpoint."""

    def __init__(
        self,
        cluster: Cluster,
        node: str,
        *,
        address: str,
        config: Any,
        metrics: Metrics,
        workers: int = 4,
    ) -> None:
        self.cluster, self.node, self.address, self.config = cluster, node, address, config
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="checkpoint")
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; the checkpoints under way finish first."""
        try:
            Informer(self.cluster, r.CHECKPOINTS, self.handle).run(stop)
        finally:
            self._pool.shutdown(wait=True)

    def handle(self, obj: Obj) -> None:
        if r.status(obj).get("node") != self.node:
            return
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            if r.DATA_FINALIZER in (meta.get("finalizers") or []) and r.phase(obj) != r.RUNNING:
                self._submit(obj, self._remove_data)
            elif r.DATA_FINALIZER in (meta.get("finalizers") or []):
                self._submit(obj, self._recover)  # then deleted, on the next event
        elif r.phase(obj) == r.PENDING:
            self._submit(obj, self._take)
        elif r.phase(obj) == r.RUNNING:
            self._submit(obj, self._recover)

    def _submit(self, obj: Obj, job: Any) -> None:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        with self._lock:
            if key in self._busy:
                return
            self._busy.add(key)

        def run() -> None:
            try:
                job(obj)
            except Exception:
                log.exception("checkpoint %s", key)
            finally:
                with self._lock:
                    self._busy.discard(key)

        self._pool.submit(run)

    # -- the work ----------------------------------------------------------------------

    def _take(self, obj: Obj) -> None:
        meta = obj["metadata"]
        ns = meta["namespace"]
        try:
            spec = r.CheckpointSpec.parse(obj)
        except StasisError as e:
            self._fail(obj, e)
            return
        try:
            obj = self.cluster.set_status(
                obj, {"phase": r.RUNNING, "startTime": r.now()}, if_unchanged=True
            )
        except (Aborted, NotFound):
            return  # changed meanwhile (deleted, or taken): its next event says what now
        started = time.monotonic()
        try:
            pod = pods.get_pod(self.cluster.core, ns, spec.pod)
            if pod["metadata"].get("uid") != r.status(obj).get("podUID"):
                raise NotFound(f"pod {ns}/{spec.pod} was replaced since the checkpoint was asked")
            out = pods.checkpoint_pod(
                self.cluster.core, ns, spec.pod, address=self.address,
                store=spec.store or self.config.storage.url,
                name=r.checkpoint_name(obj), leave_running=not spec.stop_pod,
                custom=self.cluster.custom, config=self.config,
            )  # fmt: skip
        except StasisError as e:
            self.metrics.checkpoint("failed", time.monotonic() - started)
            self._fail(obj, e)
            return
        size = sum(int(m.get("size") or 0) for m in out["containers"].values())
        self.metrics.checkpoint("succeeded", out["seconds"], out["frozen_seconds"], size)
        self.cluster.set_status(
            obj,
            {
                "phase": r.SUCCEEDED, "ref": out["ref"], "bytes": size,
                "frozenSeconds": out["frozen_seconds"], "totalSeconds": out["seconds"],
                "completionTime": r.now(),
            },
        )  # fmt: skip
        self.cluster.event(
            obj, "Normal", "Checkpointed",
            f"pod {spec.pod}: {out['ref']} ({size} bytes, frozen {out['frozen_seconds']} s)",
            COMPONENT,
        )  # fmt: skip

    def _recover(self, obj: Obj) -> None:
        """A Checkpoint left Running by an agent that stopped: its pod resumed if it
        was left paused, then published, or failed (and the container checkpoints it
        had written removed)."""
        meta, spec_pod = obj["metadata"], (obj.get("spec") or {}).get("podName", "")
        try:
            resumed = pods.resume_pod(
                self.cluster.core, meta["namespace"], spec_pod, address=self.address
            )
            if resumed:
                self.cluster.event(
                    obj, "Warning", "PodResumed",
                    f"pod {spec_pod}: {resumed} container(s) left paused were resumed",
                    COMPONENT,
                )  # fmt: skip
        except NotFound:
            pass  # the pod is gone (a stopPod checkpoint that got that far)
        except StasisError as e:
            # A dump still under way in a shim refuses Resume: the next resync tries
            # again, until the Checkpoint is too old to wait for.
            started = r.parse_time(r.status(obj).get("startTime"))
            age = (datetime.now(UTC) - started).total_seconds() if started else 0.0
            log.warning("pod %s of %s not resumed: %s", spec_pod, meta["name"], e)
            if age < RECOVER_PATIENCE:
                return
        name = r.checkpoint_name(obj)
        try:
            store = self._store(obj)
            names = {info.name: info.ref for info in store.list()}
        except StasisError as e:
            self.metrics.store_error()
            log.warning("%s: %s", obj["metadata"]["name"], e)
            return  # the next resync tries again
        if name in names:
            self.cluster.set_status(
                obj, {"phase": r.SUCCEEDED, "ref": names[name], "completionTime": r.now(),
                      "message": "completed before the agent restarted"},
            )  # fmt: skip
            return
        for member in names:
            if member.startswith(f"{name}."):
                try:
                    store.remove(member)
                except StasisError as e:
                    log.warning("%s: %s not removed: %s", obj["metadata"]["name"], member, e)
        self._fail(obj, "the agent stopped during the checkpoint; nothing was published")

    def _store(self, obj: Obj) -> Any:
        from runtime.store.resolve import default_store, open_store

        url = (obj.get("spec") or {}).get("store") or ""
        return open_store(url, self.config) if url else default_store(self.config)

    def _published(self, obj: Obj) -> str:
        name = r.checkpoint_name(obj)
        try:
            return next((i.ref for i in self._store(obj).list() if i.name == name), "")
        except StasisError as e:
            log.warning("%s: %s", obj["metadata"]["name"], e)
            return ""

    def _remove_data(self, obj: Obj) -> None:
        ref = r.status(obj).get("ref") or self._published(obj)
        remove_data(
            self.cluster, obj, ref, config=self.config, metrics=self.metrics, component=COMPONENT
        )

    def _fail(self, obj: Obj, error: object) -> None:
        log.warning("checkpoint %s failed: %s", obj["metadata"]["name"], error)
        try:
            self.cluster.set_status(obj, r.failed(error))
        except NotFound:
            return
        self.cluster.event(obj, "Warning", "CheckpointFailed", str(error), COMPONENT)
