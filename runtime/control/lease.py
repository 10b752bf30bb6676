"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's: one holder at a
time; the holder renews every ``renew`` seconds; another takes over once a lease has
not been renewed for ``duration`` seconds. Every write carries the resourceVersion
read, so two candidates never both win.

A holder that cannot renew within ``duration`` learns it (``hold`` returns), and must
stop acting: the controller then exits and its Deployment starts it again.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from runtime.control.cluster import Cluster
from runtime.errors import AlreadyExists, NotFound, StasisError
from runtime.kube.pods import call

log = logging.getLogger("stasis.lease")


class Lease:
    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: int = 15,
        renew: float = 5.0,
    ) -> None:
        self.cluster, self.namespace, self.name, self.identity = cluster, namespace, name, identity
        self.duration, self.renew = duration, renew

    def acquire(self, stop: threading.Event) -> bool:
        """Wait until this candidate holds the lease (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            try:
                if self._try():
                    log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
                    return True
            except StasisError as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            stop.wait(self.renew)
        return False

    def hold(self, stop: threading.Event) -> None:
        """Renew until ``stop`` is set (then the lease is released) or renewal has
        failed for ``duration`` seconds (then it returns at once: leadership lost)."""
        last = _now()
        while not stop.wait(self.renew):
            try:
                if self._try():
                    last = _now()
                    continue
                log.error("lease %s/%s taken by another holder", self.namespace, self.name)
                return
            except StasisError as e:
                log.warning("lease %s/%s not renewed: %s", self.namespace, self.name, e)
            if (_now() - last).total_seconds() > self.duration:
                return
        self._release()

    def _try(self) -> bool:
        from kubernetes import client

        api = self.cluster.coordination
        try:
            lease = call(f"lease {self.name}", api.read_namespaced_lease, self.name, self.namespace)
        except NotFound:
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(client, transitions=0),
            )
            try:
                call(f"create lease {self.name}", api.create_namespaced_lease, self.namespace, body)
            except AlreadyExists:
                return False
            return True
        spec = lease.spec
        holder = spec.holder_identity
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or _now() > _aware(renewed) + timedelta(
            seconds=spec.lease_duration_seconds or self.duration
        )
        if holder not in (self.identity, None, "") and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        new = self._spec(client, transitions)
        if holder == self.identity and spec.acquire_time:
            new.acquire_time = spec.acquire_time
        lease.spec = new
        try:
            call(
                f"update lease {self.name}",
                api.replace_namespaced_lease, self.name, self.namespace, lease,
            )  # fmt: skip
        except StasisError as e:
            if getattr(e.__cause__, "status", None) == 409:
                return False  # another candidate wrote first
            raise
        return True

    def _spec(self, client: Any, transitions: int) -> Any:
        now = _now()
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.duration,
            acquire_time=now,
            renew_time=now,
            lease_transitions=transitions,
        )

    def _release(self) -> None:
        """Give the lease up (an expired renew time) so a successor need not wait."""
        try:
            lease = call(
                f"lease {self.name}",
                self.cluster.coordination.read_namespaced_lease, self.name, self.namespace,
            )  # fmt: skip
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            lease.spec.renew_time = _now() - timedelta(seconds=3600)
            call(
                f"release lease {self.name}",
                self.cluster.coordination.replace_namespaced_lease,
                self.name, self.namespace, lease,
            )  # fmt: skip
        except StasisError as e:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, e)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)
