"""The stasis.dev/v1alpha1 custom resources, as the agent and the controller read and
write them: Checkpoint, Restore and CheckpointPolicy specs parsed (bounded, every
bad field named), status patches built, label selectors matched, retention chosen.

Pure functions over the API's JSON: no client, no I/O; the CRD schemas are in
packaging/manifests/05..07-crd-*.yaml and say the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runtime.errors import InvalidArgument

GROUP = "stasis.dev"
VERSION = "v1alpha1"
CHECKPOINTS = "checkpoints"
RESTORES = "restores"
POLICIES = "checkpointpolicies"
KINDS = {CHECKPOINTS: "Checkpoint", RESTORES: "Restore", POLICIES: "CheckpointPolicy"}

PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
DONE = frozenset({SUCCEEDED, FAILED})

# On a Checkpoint: its data is removed from the store (by its node's agent) before the
# object goes.
DATA_FINALIZER = "stasis.dev/checkpoint-data"
# Labels of a Checkpoint: the pod it is of, and the policy that made it.
POD_LABEL = "stasis.dev/pod"
POLICY_LABEL = "stasis.dev/policy"

_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_STORE = re.compile(r"(file:///|s3://)\S{0,1016}")
_MAX_MESSAGE = 1024  # status.message: an error's first line, cut


def now() -> str:
    """The current time as the API writes it (RFC 3339, UTC, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 time of the API; None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def message(text: object) -> str:
    """A status message: one line, bounded."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value):
        raise InvalidArgument(f"{what} must be a Kubernetes object name, not {value!r}")
    return value


def _store(value: object, what: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not _STORE.fullmatch(value):
        raise InvalidArgument(f"{what} must be a file:/// or s3:// URL, not {value!r}")
    return value


def _flag(spec: dict[str, Any], key: str, where: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: spec.{key} must be true or false")
    return value


def _spec(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{kind} {_where(obj)}: spec must be an object")
    return spec


def _where(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"


@dataclass(frozen=True)
class CheckpointSpec:
    """What a Checkpoint asks for."""

    pod: str
    store: str = ""
    stop_pod: bool = False

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> CheckpointSpec:
        spec = _spec(obj, "Checkpoint")
        where = f"Checkpoint {_where(obj)}"
        return cls(
            pod=_name(spec.get("podName"), f"{where}: spec.podName"),
            store=_store(spec.get("store"), f"{where}: spec.store"),
            stop_pod=_flag(spec, "stopPod", where),
        )


@dataclass(frozen=True)
class RestoreSpec:
    """What a Restore asks for: a Checkpoint's pod (or a reference) created again."""

    checkpoint: str = ""
    ref: str = ""
    pod: str = ""
    node: str = ""

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RestoreSpec:
        spec = _spec(obj, "Restore")
        where = f"Restore {_where(obj)}"
        checkpoint, ref = spec.get("checkpointName"), spec.get("ref")
        if bool(checkpoint) == bool(ref):
            raise InvalidArgument(f"{where}: give exactly one of spec.checkpointName, spec.ref")
        pod, node = spec.get("podName"), spec.get("nodeName")
        return cls(
            checkpoint=_name(checkpoint, f"{where}: spec.checkpointName") if checkpoint else "",
            ref=_store(ref, f"{where}: spec.ref"),
            pod=_name(pod, f"{where}: spec.podName") if pod else "",
            node=_name(node, f"{where}: spec.nodeName") if node else "",
        )


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry of a label selector."""

    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: absent keys match


@dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector; the empty one selects every pod."""

    labels: tuple[tuple[str, str], ...] = ()
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str] | None) -> bool:
        have = labels or {}
        return all(have.get(k) == v for k, v in self.labels) and all(
            r.matches(have) for r in self.requirements
        )

    @classmethod
    def parse(cls, value: object, where: str) -> Selector:
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where} must be a label selector object")
        match = value.get("matchLabels") or {}
        exprs = value.get("matchExpressions") or []
        if not isinstance(match, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in match.items()
        ):
            raise InvalidArgument(f"{where}.matchLabels must map strings to strings")
        if not isinstance(exprs, list):
            raise InvalidArgument(f"{where}.matchExpressions must be a list")
        reqs = []
        for i, e in enumerate(exprs):
            at = f"{where}.matchExpressions[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("key"), str):
                raise InvalidArgument(f"{at} needs a key")
            op, values = e.get("operator"), e.get("values") or []
            if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise InvalidArgument(
                    f"{at}.operator {op!r} is not In, NotIn, Exists or DoesNotExist"
                )
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise InvalidArgument(f"{at}.values must be a list of strings")
            if (op in ("In", "NotIn")) != bool(values):
                raise InvalidArgument(
                    f"{at}: {op} takes values only with In and NotIn, and needs them"
                )
            reqs.append(Requirement(e["key"], op, frozenset(values)))
        return cls(tuple(sorted(match.items())), tuple(reqs))


@dataclass(frozen=True)
class PolicySpec:
    """What a CheckpointPolicy asks for."""

    selector: Selector
    interval: int | None = None
    keep: int | None = None
    on_node_drain: bool = False
    store: str = ""

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> PolicySpec:
        spec = _spec(obj, "CheckpointPolicy")
        where = f"CheckpointPolicy {_where(obj)}"
        interval, keep = spec.get("intervalSeconds"), spec.get("keep")
        for field, value, low, high in (
            ("intervalSeconds", interval, 10, 31_536_000),
            ("keep", keep, 1, 1000),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
            ):
                raise InvalidArgument(f"{where}: spec.{field} must be an integer {low}..{high}")
        return cls(
            selector=Selector.parse(spec.get("selector"), f"{where}: spec.selector"),
            interval=interval,
            keep=keep,
            on_node_drain=_flag(spec, "onNodeDrain", where),
            store=_store(spec.get("store"), f"{where}: spec.store"),
        )


def phase(obj: dict[str, Any]) -> str:
    """The object's status.phase ("" before anyone set it)."""
    status = obj.get("status") or {}
    value = status.get("phase") if isinstance(status, dict) else None
    return value if isinstance(value, str) else ""


def status(obj: dict[str, Any]) -> dict[str, Any]:
    value = obj.get("status")
    return value if isinstance(value, dict) else {}


def checkpoint_name(obj: dict[str, Any]) -> str:
    """The store name of a Checkpoint's pod checkpoint: fixed by the object (namespace,
    name, uid), so an agent that restarts mid-way finds what it had written."""
    meta = obj["metadata"]
    uid = str(meta.get("uid", "")).replace("-", "")[:8]
    base = f"{meta['namespace']}-{meta['name']}"[:110]
    return f"{base}-{uid}" if uid else base


def failed(text: object) -> dict[str, Any]:
    """A status patch: Failed, with the reason."""
    return {"phase": FAILED, "message": message(text), "completionTime": now()}


def retention(checkpoints: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The checkpoints of one pod that retention deletes: all but the newest ``keep``
    Succeeded ones, and every Failed one older than the newest Succeeded one kept.
    Running and Pending ones are never chosen."""
    succeeded = [c for c in checkpoints if phase(c) == SUCCEEDED]

    def when(c: dict[str, Any]) -> tuple[datetime, str]:
        s = status(c)
        t = parse_time(s.get("completionTime")) or parse_time(
            (c.get("metadata") or {}).get("creationTimestamp")
        )
        return (t or datetime.min.replace(tzinfo=UTC), c["metadata"]["name"])

    succeeded.sort(key=when, reverse=True)
    doomed = succeeded[keep:]
    if succeeded[:keep]:
        newest_kept = when(succeeded[0])
        doomed += [c for c in checkpoints if phase(c) == FAILED and when(c) < newest_kept]
    return doomed


def due(last: str | None, interval: int, at: datetime | None = None) -> bool:
    """Whether a pod last checkpointed at ``last`` (RFC 3339; None: never) is due."""
    when = parse_time(last)
    if when is None:
        return True
    current = at or datetime.now(UTC)
    return (current - when).total_seconds() >= interval
