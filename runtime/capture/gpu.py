"""GPU (CUDA) state in checkpoints, through the CUDA driver's checkpoint API.

CRIU cannot dump GPU memory. The driver (>= 550) can move a process's GPU state
into its host memory and back: ``cuCheckpointProcessLock`` (blocks further CUDA
calls, waits for running work, at most ``timeoutMs``; 0 = no limit),
``cuCheckpointProcessCheckpoint`` (device memory copied into the process's host
memory, GPU released), then CRIU can dump the process like any other;
``cuCheckpointProcessRestore`` (GPU reacquired, memory copied back) and
``cuCheckpointProcessUnlock`` undo it, after a leave-running dump or after a
CRIU restore. Per process: running -> locked -> checkpointed -> locked ->
running. The driver needs the process *running* (not frozen) for each step: it
works through the process's own threads.

The contract is ``GpuBackend``: ``CudaCheckpoint`` is ctypes over ``libcuda.so.1``,
or over the library ``$STASIS_LIBCUDA`` names (the tests' fake,
tests/fakes/libcuda_fake.c); ``RecordingGpu`` is a recording fake for unit tests.
No library means no GPU support, silently. Only the checkpoint machinery imports
this module, and only loads the library when a checkpoint or a restore happens.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.errors import FailedPrecondition
from runtime.linux.proc import ns_pid

log = logging.getLogger("stasis.gpu")

LIBCUDA_ENV = "STASIS_LIBCUDA"
LOCK_TIMEOUT_ENV = "STASIS_CUDA_LOCK_TIMEOUT_MS"
DEFAULT_LIBCUDA = "libcuda.so.1"
DEFAULT_LOCK_TIMEOUT_MS = 10_000  # CRIU's cuda_plugin default (criu --timeout 10)

# CUprocessState
RUNNING, LOCKED, CHECKPOINTED, FAILED = 0, 1, 2, 3
STATE_NAMES = {RUNNING: "running", LOCKED: "locked", CHECKPOINTED: "checkpointed", FAILED: "failed"}

# The CUresult values these calls return (cuda.h).
CU_RESULTS = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    400: "CUDA_ERROR_INVALID_HANDLE",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    802: "CUDA_ERROR_SYSTEM_NOT_READY",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    909: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}


class _LockArgs(ctypes.Structure):
    """CUcheckpointLockArgs (64 bytes)."""

    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class _ReservedArgs(ctypes.Structure):
    """CUcheckpointCheckpointArgs / RestoreArgs / UnlockArgs: 64 bytes, all zero
    (a zeroed RestoreArgs has no GPU UUID remapping pairs)."""

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CudaError(FailedPrecondition):
    """A driver call failed: ``call`` on ``pid`` returned ``result``."""

    def __init__(self, message: str, *, pid: int = 0, call: str = "", result: int = 0) -> None:
        super().__init__(message)
        self.pid = pid
        self.call = call
        self.result = result


def result_name(result: int) -> str:
    """``CUDA_ERROR_TIMEOUT (909)`` for 909."""
    return f"{CU_RESULTS.get(result, 'CUresult')} ({result})"


class GpuBackend(Protocol):
    """The GPU side of a checkpoint, by host PID. Blocking: call on a worker thread."""

    def processes(self, pids: Iterable[int]) -> list[int]:
        """Those of ``pids`` that use the GPU."""
        ...

    def inventory(self) -> dict[str, Any] | None:
        """This node's GPUs (see ``CudaCheckpoint.inventory``); None without any."""
        ...

    def suspend(self, pids: Sequence[int], timeout_ms: int) -> None:
        """Move the GPU state of all of ``pids`` into host memory, or none (CudaError)."""
        ...

    def resume(self, pids: Sequence[int]) -> None:
        """Give ``pids`` their GPU state back; tries every PID, raises the first CudaError."""
        ...


class CudaCheckpoint:
    """The driver's checkpoint API for processes of this machine (by host PID).

    The calls block (a checkpoint copies all of a process's GPU memory): call
    them on a worker thread. One call at a time per instance (``_lock``).
    """

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = lib
        self._lock = threading.Lock()  # guards the driver calls and _init
        self._init: int | None = None
        for name in ("Lock", "Checkpoint", "Restore", "Unlock", "GetState"):
            fn = getattr(lib, f"cuCheckpointProcess{name}")  # AttributeError: driver < 550
            fn.restype = ctypes.c_int
        lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(_LockArgs)]
        for name in ("Checkpoint", "Restore", "Unlock"):
            getattr(lib, f"cuCheckpointProcess{name}").argtypes = [
                ctypes.c_int,
                ctypes.POINTER(_ReservedArgs),
            ]

    def _ensure_init(self) -> int:
        if self._init is None:
            self._init = int(self._lib.cuInit(0))
        return self._init

    def _call(self, pid: int, name: str, *args: Any) -> int:
        with self._lock:
            self._ensure_init()
            return int(getattr(self._lib, name)(pid, *args))

    def _check(self, pid: int, name: str, result: int, what: str = "") -> None:
        if result != 0:
            raise CudaError(
                f"GPU state of PID {pid}: {name}{what} failed: {result_name(result)}",
                pid=pid,
                call=name,
                result=result,
            )

    def state(self, pid: int) -> int | None:
        """The CUprocessState of ``pid``, or None when it does not use CUDA."""
        out = ctypes.c_int(-1)
        if self._call(pid, "cuCheckpointProcessGetState", ctypes.byref(out)) != 0:
            return None
        return out.value if out.value in STATE_NAMES else None

    def processes(self, pids: Iterable[int]) -> list[int]:
        """Those of ``pids`` that use CUDA (GetState answers for them)."""
        return [pid for pid in pids if self.state(pid) is not None]

    def lock(self, pid: int, timeout_ms: int) -> None:
        """Lock ``pid``'s CUDA API (waits for its GPU work, at most ``timeout_ms``)."""
        args = _LockArgs(timeoutMs=max(0, int(timeout_ms)))
        result = self._call(pid, "cuCheckpointProcessLock", ctypes.byref(args))
        self._check(pid, "cuCheckpointProcessLock", result, f" (timeout {timeout_ms} ms)")

    def checkpoint(self, pid: int) -> None:
        """Move a locked ``pid``'s GPU state into its host memory."""
        result = self._call(pid, "cuCheckpointProcessCheckpoint", ctypes.byref(_ReservedArgs()))
        self._check(pid, "cuCheckpointProcessCheckpoint", result)

    def restore(self, pid: int) -> None:
        """Move a checkpointed ``pid``'s GPU state back onto the GPU (it stays locked)."""
        result = self._call(pid, "cuCheckpointProcessRestore", ctypes.byref(_ReservedArgs()))
        self._check(pid, "cuCheckpointProcessRestore", result)

    def unlock(self, pid: int) -> None:
        """Let a locked ``pid`` make CUDA calls again."""
        result = self._call(pid, "cuCheckpointProcessUnlock", ctypes.byref(_ReservedArgs()))
        self._check(pid, "cuCheckpointProcessUnlock", result)

    def suspend(self, pids: Sequence[int], timeout_ms: int) -> None:
        """Lock every one of ``pids``, then checkpoint each. All or nothing: on a
        failure, restores and unlocks those already checkpointed, unlocks those
        only locked, and raises the failure (a ``CudaError``)."""
        locked: list[int] = []
        checkpointed: list[int] = []
        try:
            for pid in pids:
                self.lock(pid, timeout_ms)
                locked.append(pid)
            for pid in pids:
                self.checkpoint(pid)
                checkpointed.append(pid)
        except CudaError as e:
            undone = self._undo(checkpointed, locked)
            if undone:
                raise CudaError(
                    f"{e}; undoing also failed: {undone}", pid=e.pid, call=e.call, result=e.result
                ) from e
            raise

    def _undo(self, checkpointed: Sequence[int], locked: Sequence[int]) -> str:
        problems: list[str] = []
        for pid in reversed(locked):
            try:
                if pid in checkpointed:
                    self.restore(pid)
                self.unlock(pid)
            except CudaError as e:
                log.error("undoing the GPU checkpoint: %s", e)
                problems.append(str(e))
        return "; ".join(problems)

    def resume(self, pids: Sequence[int]) -> None:
        """Restore then unlock each of ``pids`` (after a leave-running dump, or after
        a CRIU restore); a process already running is left alone. Tries every PID,
        then raises the first failure."""
        first: CudaError | None = None
        for pid in pids:
            try:
                state = self.state(pid)
                if state == CHECKPOINTED:
                    self.restore(pid)
                    state = LOCKED
                if state == LOCKED:
                    self.unlock(pid)
                elif state != RUNNING:
                    what = "not a CUDA process" if state is None else STATE_NAMES[state]
                    raise CudaError(
                        f"GPU state of PID {pid}: cannot resume it: it is {what}",
                        pid=pid,
                        call="cuCheckpointProcessGetState",
                    )
            except CudaError as e:
                log.error("resuming GPU state: %s", e)
                first = first or e
        if first is not None:
            raise first

    def inventory(self) -> dict[str, Any] | None:
        """{"models": [...], "count": N, "driver_version": CUDA driver API version
        (12080 = 12.8), "driver": NVIDIA driver version or ""}; None when the driver
        sees no GPU (cuInit fails)."""
        lib = self._lib
        with self._lock:
            if self._ensure_init() != 0:
                return None
            count, version = ctypes.c_int(0), ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return None
            if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
                version.value = 0
            models: list[str] = []
            for ordinal in range(count.value):
                dev = ctypes.c_int(ordinal)
                if hasattr(lib, "cuDeviceGet") and lib.cuDeviceGet(ctypes.byref(dev), ordinal):
                    dev = ctypes.c_int(ordinal)
                name = ctypes.create_string_buffer(256)
                if lib.cuDeviceGetName(name, len(name), dev) != 0:
                    name.value = b"?"
                models.append(name.value.decode(errors="replace"))
        driver = _nvml_driver() if self.path == DEFAULT_LIBCUDA else ""
        return {
            "models": models,
            "count": count.value,
            "driver_version": version.value,
            "driver": driver,
        }


def _nvml_driver() -> str:
    """The NVIDIA driver's version (580.65.06) through pynvml when importable, else ""."""
    try:
        nvml: Any = importlib.import_module("pynvml")
        nvml.nvmlInit()
        try:
            v = nvml.nvmlSystemGetDriverVersion()
        finally:
            nvml.nvmlShutdown()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # optional: any failure just leaves the CUDA version
        return ""


_backends: dict[str, CudaCheckpoint | None] = {}
_backends_lock = threading.Lock()


def load(path: str | None = None) -> CudaCheckpoint | None:
    """The backend over ``path`` (default ``$STASIS_LIBCUDA``, else libcuda.so.1),
    loaded once per path; None when there is no such library, or it predates the
    checkpoint API (driver < 550)."""
    path = path or os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBCUDA
    with _backends_lock:
        if path not in _backends:
            try:
                _backends[path] = CudaCheckpoint(ctypes.CDLL(path), path)
            except (OSError, AttributeError) as e:
                if path != DEFAULT_LIBCUDA:
                    log.warning("%s=%s not usable: %s", LIBCUDA_ENV, path, e)
                _backends[path] = None
        return _backends[path]


def lock_timeout_ms() -> int:
    """The lock timeout: ``$STASIS_CUDA_LOCK_TIMEOUT_MS``, default 10 s."""
    try:
        return int(os.environ.get(LOCK_TIMEOUT_ENV, "") or DEFAULT_LOCK_TIMEOUT_MS)
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_MS


class RecordingGpu:
    """A ``GpuBackend`` for tests: the PIDs in ``cuda`` use the GPU; every call is
    recorded in ``calls`` as (method, PIDs); ``fail`` makes a method raise."""

    def __init__(self, cuda: Iterable[int] = (), inventory: dict[str, Any] | None = None) -> None:
        self.cuda = set(cuda)
        self.calls: list[tuple[str, list[int]]] = []
        self.fail: dict[str, CudaError] = {}
        self._inventory = inventory or {"models": ["Fake"], "count": 1, "driver_version": 12080}

    def _record(self, name: str, pids: Iterable[int]) -> None:
        self.calls.append((name, list(pids)))
        if name in self.fail:
            raise self.fail[name]

    def processes(self, pids: Iterable[int]) -> list[int]:
        """Those of ``pids`` in ``cuda``."""
        found = [p for p in pids if p in self.cuda]
        self._record("processes", found)
        return found

    def inventory(self) -> dict[str, Any] | None:
        """The inventory given at construction."""
        return dict(self._inventory)

    def suspend(self, pids: Sequence[int], timeout_ms: int) -> None:
        """Records the call."""
        self._record("suspend", pids)

    def resume(self, pids: Sequence[int]) -> None:
        """Records the call."""
        self._record("resume", pids)


# -- the inventory gate --------------------------------------------------------------


def _version(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in s.split("."))
    except ValueError:
        return ()


def describe(inv: Mapping[str, Any] | None) -> str:
    """``2 x NVIDIA H100 80GB HBM3, driver 580.65.06 (CUDA 12.8)``."""
    if not inv:
        return "no CUDA GPU"
    models = list(inv.get("models") or [])
    kinds = sorted(set(models))
    names = " + ".join(f"{models.count(k)} x {k}" for k in kinds) or f"{inv.get('count', 0)} GPUs"
    v = int(inv.get("driver_version") or 0)
    cuda = f"CUDA {v // 1000}.{(v % 1000) // 10}"
    driver = f"driver {inv['driver']} ({cuda})" if inv.get("driver") else f"{cuda} driver"
    return f"{names}, {driver}"


def check_inventory(recorded: Mapping[str, Any], current: Mapping[str, Any] | None) -> None:
    """Refuse (FailedPrecondition, one line naming both sides) to restore GPU state
    recorded on ``recorded`` onto ``current``: another GPU model, another count, or
    a checkpoint driver newer than this node's (an older one is fine)."""
    why = ""
    if not current:
        why = "this node has no usable CUDA driver"
    elif int(recorded.get("count", 0)) != int(current.get("count", 0)):
        why = "another GPU count"
    elif sorted(recorded.get("models") or []) != sorted(current.get("models") or []):
        why = "another GPU model"
    else:
        old, new = (
            _version(str(recorded.get("driver") or "")),
            _version(str(current.get("driver") or "")),
        )
        if old and new:
            newer = old > new
        else:
            newer = int(recorded.get("driver_version") or 0) > int(
                current.get("driver_version") or 0
            )
        if newer:
            why = "the checkpoint's driver is newer than this node's"
    if why:
        raise FailedPrecondition(
            f"GPU state recorded on {describe(recorded)} cannot be restored on this node "
            f"({describe(current)}): {why}"
        )


def check_restore(metadata: Mapping[str, Any]) -> None:
    """Before a restore: when the checkpoint holds GPU state, this node must match
    its inventory (``check_inventory``); without GPU state, nothing."""
    record = metadata.get("gpu")
    if not record:
        return
    backend = load()
    current = backend.inventory() if backend is not None else None
    check_inventory(record.get("inventory") or {}, current)


# -- a container's CUDA processes around a checkpoint ---------------------------------


@dataclass
class Suspended:
    """CUDA processes of a container whose GPU state was moved into host memory."""

    backend: GpuBackend
    pids: list[int]  # host PIDs
    record: dict[str, Any] = field(default_factory=dict)  # the checkpoint's "gpu" metadata


async def suspend_container(
    backend: GpuBackend | None,
    container_id: str,
    list_pids: Callable[[], Awaitable[list[int]]],
    paused: bool,
) -> Suspended | None:
    """Before the freeze: find the container's CUDA processes and lock +
    checkpoint their GPU state; None (nothing done) without a backend or without
    CUDA processes. A container already paused cannot be (the driver needs its
    processes running): FailedPrecondition."""
    if backend is None:
        return None
    pids = await list_pids()
    cuda = await asyncio.to_thread(backend.processes, pids)
    if not cuda:
        return None
    if paused:
        raise FailedPrecondition(
            f"cannot checkpoint container {container_id}: it is paused and PIDs "
            f"{', '.join(map(str, cuda))} use CUDA (the driver checkpoints GPU state only "
            "of running processes): checkpoint it running"
        )
    timeout = lock_timeout_ms()
    inventory = await asyncio.to_thread(backend.inventory)
    try:
        await asyncio.to_thread(backend.suspend, cuda, timeout)
    except CudaError as e:
        raise CudaError(
            f"checkpoint of {container_id}: {e}", pid=e.pid, call=e.call, result=e.result
        ) from e
    log.info("GPU state of %s (PIDs %s) moved to host memory", container_id, cuda)
    record = {
        "inventory": inventory or {},
        "pids": [ns_pid(p) for p in cuda],  # as the container sees them: restored alike
        "lock_timeout_ms": timeout,
    }
    return Suspended(backend, cuda, record)


async def resume_container(container_id: str, suspended: Suspended) -> None:
    """Give the suspended processes their GPU state back (after a leave-running
    dump, or a failed one)."""
    try:
        await asyncio.to_thread(suspended.backend.resume, suspended.pids)
    except CudaError as e:
        raise CudaError(
            f"container {container_id}: {e}", pid=e.pid, call=e.call, result=e.result
        ) from e


async def undo_suspend(container_id: str, suspended: Suspended) -> None:
    """After a failed or cancelled dump: ``resume_container``, logging (not
    raising) its failure, so that the dump's own error is what the caller sees."""
    try:
        await resume_container(container_id, suspended)
    except CudaError as e:
        log.error("after a failed checkpoint: %s", e)


def resume_restored(
    container_id: str, record: Mapping[str, Any], by_ns_pid: Mapping[int, int]
) -> None:
    """Right after ``runc restore``: restore and unlock the GPU state of the
    processes the checkpoint recorded (by their PID inside the container).
    Blocking."""
    backend = load()
    if backend is None:
        raise FailedPrecondition(
            f"restore of {container_id}: the checkpoint holds GPU state, and no CUDA "
            "driver is loadable here"
        )
    wanted = [int(p) for p in record.get("pids") or []]
    missing = [p for p in wanted if p not in by_ns_pid]
    if missing:
        raise FailedPrecondition(
            f"restore of {container_id}: CUDA processes {missing} (PIDs in the container) "
            "were not restored"
        )
    try:
        backend.resume([by_ns_pid[p] for p in wanted])
    except CudaError as e:
        raise CudaError(
            f"restore of {container_id}: {e}", pid=e.pid, call=e.call, result=e.result
        ) from e
    log.info("GPU state of %s restored (PIDs in the container: %s)", container_id, wanted)
