"""Prometheus metrics of the agent and the controller (prometheus-client): checkpoints
and restores by outcome, their durations, frozen time and bytes, store errors; served
on ``--metrics-port`` at /metrics. Each process has its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.checkpoints = Counter(
            "stasis_checkpoints", "Pod checkpoints taken, by outcome", ["outcome"], registry=reg
        )
        self.checkpoint_seconds = Histogram(
            "stasis_checkpoint_seconds", "Pod checkpoint duration", buckets=_SECONDS, registry=reg
        )
        self.frozen_seconds = Histogram(
            "stasis_checkpoint_frozen_seconds", "How long a pod was frozen", buckets=_SECONDS,
            registry=reg,
        )  # fmt: skip
        self.checkpoint_bytes = Counter(
            "stasis_checkpoint_bytes", "Bytes of the checkpoints taken", registry=reg
        )
        self.restores = Counter(
            "stasis_restores", "Restores, by outcome", ["outcome"], registry=reg
        )
        self.restore_seconds = Histogram(
            "stasis_restore_seconds", "Restore duration, until the pod runs", buckets=_SECONDS,
            registry=reg,
        )  # fmt: skip
        self.store_errors = Counter(
            "stasis_store_errors", "Store operations that failed", registry=reg
        )
        self.deleted = Counter(
            "stasis_checkpoints_deleted", "Checkpoints deleted by retention", registry=reg
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on ``port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def checkpoint(
        self, outcome: str, seconds: float, frozen: float | None = None, size: int = 0
    ) -> None:
        self.checkpoints.labels(outcome).inc()
        self.checkpoint_seconds.observe(seconds)
        if frozen is not None:
            self.frozen_seconds.observe(frozen)
        self.checkpoint_bytes.inc(size)

    def restore(self, outcome: str, seconds: float | None = None) -> None:
        self.restores.labels(outcome).inc()
        if seconds is not None:
            self.restore_seconds.observe(seconds)

    def store_error(self) -> None:
        self.store_errors.inc()
