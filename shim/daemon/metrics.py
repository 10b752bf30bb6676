"""runc's cgroup statistics as containerd's Metrics protos (cgroups v1 and v2).

containerd decodes Task.Stats by type URL: ``io.containerd.cgroups.v1.Metrics``
on v1 and hybrid hosts, ``io.containerd.cgroups.v2.Metrics`` on unified ones.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from protos.containerd.cgroups.v1 import metrics_pb2 as v1
from protos.containerd.cgroups.v2 import metrics_pb2 as v2

_U64_MAX = (1 << 64) - 1


def _u(d: dict[str, Any], key: str) -> int:
    value = d.get(key) or 0
    return int(value) if isinstance(value, int | float) else 0


# memory.stat keys whose MemoryStat field is spelled differently (as containerd's
# cgroups package maps them); the other keys are the field names themselves.
_V1_MEMORY_KEYS = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}
_V1_MEMORY_KEYS |= {f"total_{k}": f"total_{v}" for k, v in _V1_MEMORY_KEYS.items()}


def metrics_v1(stats: dict[str, Any]) -> Message:
    """cgroups v1 Metrics from ``runc events --stats`` data."""
    m = v1.Metrics()
    pids = stats.get("pids") or {}
    m.pids.current, m.pids.limit = _u(pids, "current"), _u(pids, "limit")
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage.total = _u(usage, "total")
    m.cpu.usage.kernel = _u(usage, "kernel")
    m.cpu.usage.user = _u(usage, "user")
    m.cpu.usage.per_cpu.extend(int(x) for x in usage.get("percpu") or [])
    thr = cpu.get("throttling") or {}
    m.cpu.throttling.periods = _u(thr, "periods")
    m.cpu.throttling.throttled_periods = _u(thr, "throttledPeriods")
    m.cpu.throttling.throttled_time = _u(thr, "throttledTime")
    mem = stats.get("memory") or {}
    raw = mem.get("raw") or {}
    uint64_fields = {f.name for f in v1.MemoryStat.DESCRIPTOR.fields if f.type == f.TYPE_UINT64}
    for key in raw:
        name = _V1_MEMORY_KEYS.get(key, key)
        if name in uint64_fields:
            setattr(m.memory, name, _u(raw, key))
    m.memory.cache = _u(mem, "cache") or _u(raw, "cache")
    for name, target in (
        ("usage", m.memory.usage),
        ("swap", m.memory.swap),
        ("kernel", m.memory.kernel),
        ("kernelTCP", m.memory.kernel_tcp),
    ):
        entry = mem.get(name) or {}
        target.limit, target.usage = _u(entry, "limit"), _u(entry, "usage")
        target.max, target.failcnt = _u(entry, "max"), _u(entry, "failcnt")
    blkio = stats.get("blkio") or {}
    for key, target_list in (
        ("ioServiceBytesRecursive", m.blkio.io_service_bytes_recursive),
        ("ioServicedRecursive", m.blkio.io_serviced_recursive),
    ):
        for e in blkio.get(key) or []:
            target_list.add(
                op=str(e.get("op", "")),
                major=_u(e, "major"),
                minor=_u(e, "minor"),
                value=_u(e, "value"),
            )
    for pagesize, h in (stats.get("hugetlb") or {}).items():
        m.hugetlb.add(
            pagesize=pagesize, usage=_u(h, "usage"), max=_u(h, "max"), failcnt=_u(h, "failcnt")
        )
    return m


def metrics_v2(stats: dict[str, Any]) -> Message:
    """cgroups v2 Metrics from ``runc events --stats`` data (runc fills the same JSON)."""
    m = v2.Metrics()
    pids = stats.get("pids") or {}
    m.pids.current, m.pids.limit = _u(pids, "current"), _u(pids, "limit")
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage_usec = _u(usage, "total") // 1000
    m.cpu.user_usec = _u(usage, "user") // 1000
    m.cpu.system_usec = _u(usage, "kernel") // 1000
    thr = cpu.get("throttling") or {}
    m.cpu.nr_periods = _u(thr, "periods")
    m.cpu.nr_throttled = _u(thr, "throttledPeriods")
    m.cpu.throttled_usec = _u(thr, "throttledTime") // 1000
    mem = stats.get("memory") or {}
    raw = mem.get("raw") or {}
    for field in v2.MemoryStat.DESCRIPTOR.fields:
        if field.type == field.TYPE_UINT64 and field.name in raw:
            setattr(m.memory, field.name, _u(raw, field.name))
    entry = mem.get("usage") or {}
    m.memory.usage, m.memory.usage_limit = _u(entry, "usage"), _u(entry, "limit")
    m.memory.max_usage = _u(entry, "max")  # memory.peak, where the kernel has it
    swap = mem.get("swap") or {}
    if swap:
        # On v2 runc reports swap as memory+swap, like v1's memsw (the limit too,
        # unless unlimited; in uint64 arithmetic); containerd's v2 Metrics hold
        # memory.swap.current and memory.swap.max alone.
        both, both_limit = _u(swap, "usage"), _u(swap, "limit")
        m.memory.swap_usage = max(both - m.memory.usage, 0)
        m.memory.swap_limit = (
            both_limit
            if both_limit == _U64_MAX
            else (both_limit - m.memory.usage_limit) % (1 << 64)
        )
    return m
