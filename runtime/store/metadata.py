"""The checkpoint metadata a restore acts on (``stasis.json``), checked before it is used.

Whoever can write a store or an archive writes ``stasis.json``. A restore
reads its ``execs`` and ``gpu`` records after ``runc restore`` has run, when a
surprise would leave restored processes behind, so :func:`check` validates
every field the restore paths read, up front, and raises
:class:`~runtime.errors.DataLoss` naming the checkpoint and the field; nothing
has run by then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from runtime import boundedjson
from runtime.errors import DataLoss
from runtime.names import METADATA_FILE

if TYPE_CHECKING:
    from runtime.store.api import CheckpointReader

MAX_BYTES = 1 << 20
MAX_EXECS = 4096
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
# The exec ids the shim accepts (shim/task/container.py).
_EXEC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}")
_STRINGS = ("container_id", "namespace", "image", "runtime", "host", "kernel", "cgroup_mode")
_BOOLS = ("exit", "tcp_established")


def _pid(value: object) -> bool:
    # 0: the PID was not known at the checkpoint (that process is then not restored)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= PID_MAX


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _problem(metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with ``metadata`` (field: why), or None."""
    fmt = metadata.get("format")
    if fmt is not None and not _count(fmt):
        return f"format: {fmt!r} is not a version number"
    for key in _STRINGS:
        value = metadata.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key}: not a string"
    image = metadata.get("image")
    if isinstance(image, str) and image.startswith("-"):
        return f"image: {image[:64]!r} starts with '-'"
    for key in _BOOLS:
        value = metadata.get(key)
        if value is not None and not isinstance(value, bool):
            return f"{key}: {value!r} is not true or false"
    labels = metadata.get("labels")
    if labels is not None and (
        not isinstance(labels, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        return "labels: not an object of strings"
    return _execs_problem(metadata.get("execs")) or _gpu_problem(metadata.get("gpu"))


def _execs_problem(execs: object) -> str | None:
    if execs is None:
        return None
    if not isinstance(execs, list):
        return "execs: not a list"
    if len(execs) > MAX_EXECS:
        return f"execs: {len(execs)} entries (at most {MAX_EXECS})"
    ids: set[str] = set()
    for i, rec in enumerate(execs):
        if not isinstance(rec, dict):
            return f"execs[{i}]: not an object"
        id, pid, args = rec.get("id"), rec.get("pid"), rec.get("args", [])
        if not isinstance(id, str) or not _EXEC_ID.fullmatch(id):
            return f"execs[{i}].id: {id!r} is not an exec id"
        if id in ids:
            return f"execs[{i}].id: {id!r} appears twice"
        ids.add(id)
        if not _pid(pid):
            return f"execs[{i}].pid: {pid!r} is not a PID"
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            return f"execs[{i}].args: not a list of strings"
    return None


def _gpu_problem(gpu: object) -> str | None:
    if not gpu:
        return None  # absent, null or empty: no GPU state
    if not isinstance(gpu, dict):
        return "gpu: not an object"
    pids = gpu.get("pids", [])
    if not isinstance(pids, list) or not all(_pid(p) for p in pids):
        return "gpu.pids: not a list of PIDs"
    timeout = gpu.get("lock_timeout_ms", 0)
    if not _count(timeout):
        return f"gpu.lock_timeout_ms: {timeout!r} is not a number of milliseconds"
    inventory = gpu.get("inventory", {})
    if not isinstance(inventory, dict):
        return "gpu.inventory: not an object"
    for key in ("count", "driver_version"):
        if inventory.get(key) is not None and not _count(inventory[key]):
            return f"gpu.inventory.{key}: {inventory[key]!r} is not a count"
    models = inventory.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        return "gpu.inventory.models: not a list of strings"
    if inventory.get("driver") is not None and not isinstance(inventory["driver"], str):
        return "gpu.inventory.driver: not a string"
    return None


def check(metadata: Mapping[str, Any], where: str) -> None:
    """Raise DataLoss naming ``where`` (the checkpoint) and the field when ``metadata``
    holds something the restore paths cannot act on."""
    problem = _problem(metadata)
    if problem is not None:
        raise DataLoss(f"{where}: {METADATA_FILE}: {problem}")


def restore_metadata(reader: CheckpointReader) -> dict[str, Any]:
    """The metadata of an open checkpoint, checked for a restore.

    Unlike ``reader.metadata`` (which a listing may show with a broken
    ``stasis.json`` left out), a ``stasis.json`` that cannot be parsed (not
    JSON, too large, nested too deeply, not an object) is DataLoss here.
    """
    where = f"checkpoint {reader.name}"
    if METADATA_FILE in reader.manifest.files:
        what = f"{where}: {METADATA_FILE}"
        doc = boundedjson.load_file(reader.file(METADATA_FILE), what, max_bytes=MAX_BYTES)
        if not isinstance(doc, dict):
            raise DataLoss(f"{what}: not a JSON object")
    metadata = reader.metadata
    check(metadata, where)
    return metadata
