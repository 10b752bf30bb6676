"""Tests for shim.daemon.metrics: ``runc events --stats`` data to containerd's cgroups Metrics."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google.protobuf.message import Message

from protos.containerd.cgroups.v1 import metrics_pb2 as v1
from protos.containerd.cgroups.v2 import metrics_pb2 as v2
from shim.daemon.metrics import metrics_v1, metrics_v2

# The "data" of one `runc events --stats` event on a cgroup v1 host (runc 1.1, a
# busybox container), as JSON so the sample goes through the same decoder as runc's
# output does.
V1_SAMPLE = json.loads(
    """
{
  "cpu": {
    "usage": {
      "total": 52034127,
      "percpu": [31000000, 21034127],
      "percpu_kernel": [10000000, 3000000],
      "percpu_user": [21000000, 18034127],
      "kernel": 13000000,
      "user": 39000000
    },
    "throttling": {"periods": 120, "throttledPeriods": 7, "throttledTime": 345678}
  },
  "cpuset": {"cpus": [0, 1], "mems": [0], "cpu_exclusive": 0, "mem_hardwall": 0},
  "memory": {
    "cache": 1155072,
    "usage": {"limit": 268435456, "usage": 2830336, "max": 4194304, "failcnt": 3},
    "swap": {"limit": 536870912, "usage": 2830336, "max": 4194304, "failcnt": 1},
    "kernel": {"limit": 9223372036854771712, "usage": 1007616, "max": 1200128, "failcnt": 0},
    "kernelTCP": {"limit": 9223372036854771712, "usage": 4096, "failcnt": 0},
    "raw": {
      "active_anon": 536576,
      "active_file": 102400,
      "cache": 1155072,
      "dirty": 8192,
      "hierarchical_memory_limit": 268435456,
      "hierarchical_memsw_limit": 536870912,
      "inactive_anon": 12288,
      "inactive_file": 1052672,
      "mapped_file": 946176,
      "pgfault": 1419,
      "pgmajfault": 11,
      "pgpgin": 1287,
      "pgpgout": 878,
      "rss": 548864,
      "rss_huge": 2097152,
      "shmem": 0,
      "swap": 0,
      "unevictable": 4096,
      "writeback": 4096,
      "total_active_anon": 536577,
      "total_active_file": 102401,
      "total_cache": 1155073,
      "total_dirty": 8193,
      "total_inactive_anon": 12289,
      "total_inactive_file": 1052673,
      "total_mapped_file": 946177,
      "total_pgfault": 1420,
      "total_pgmajfault": 12,
      "total_pgpgin": 1288,
      "total_pgpgout": 879,
      "total_rss": 548865,
      "total_rss_huge": 2097153,
      "total_shmem": 0,
      "total_swap": 0,
      "total_unevictable": 4097,
      "total_writeback": 4097
    }
  },
  "pids": {"current": 3, "limit": 1024},
  "blkio": {
    "ioServiceBytesRecursive": [
      {"major": 8, "minor": 0, "op": "Read", "value": 4096000},
      {"major": 8, "minor": 0, "op": "Write", "value": 8192},
      {"major": 8, "minor": 0, "op": "Total", "value": 4104192}
    ],
    "ioServicedRecursive": [
      {"major": 8, "minor": 0, "op": "Read", "value": 100},
      {"major": 8, "op": "Write", "value": 2}
    ]
  },
  "hugetlb": {
    "2MB": {"usage": 4194304, "max": 6291456, "failcnt": 1},
    "1GB": {"failcnt": 0}
  },
  "intel_rdt": {},
  "network_interfaces": null
}
"""
)

# The same on a cgroup v2 host: runc fills the v1-shaped JSON from cpu.stat,
# memory.current/max/peak and memory.stat (which becomes "raw"). Its "swap" is
# memory+swap, as on v1: here memory.swap.current is 16384 and memory.swap.max
# 536870912.
V2_SAMPLE = json.loads(
    """
{
  "cpu": {
    "usage": {"total": 52034000, "kernel": 13001000, "user": 39033000},
    "throttling": {"periods": 120, "throttledPeriods": 7, "throttledTime": 345000}
  },
  "memory": {
    "usage": {"limit": 268435456, "usage": 2830336, "max": 4194304, "failcnt": 0},
    "swap": {"limit": 805306368, "usage": 2846720, "failcnt": 0},
    "raw": {
      "anon": 548864,
      "file": 1155072,
      "kernel_stack": 16384,
      "slab": 180224,
      "sock": 0,
      "shmem": 0,
      "file_mapped": 946176,
      "file_dirty": 8192,
      "file_writeback": 4096,
      "anon_thp": 2097152,
      "inactive_anon": 12288,
      "active_anon": 536576,
      "inactive_file": 1052672,
      "active_file": 102400,
      "unevictable": 4096,
      "slab_reclaimable": 98304,
      "slab_unreclaimable": 81920,
      "pgfault": 1419,
      "pgmajfault": 11,
      "workingset_refault": 5,
      "workingset_refault_anon": 2,
      "workingset_activate": 4,
      "workingset_nodereclaim": 0,
      "pgrefill": 6,
      "pgscan": 7,
      "pgsteal": 8,
      "pgactivate": 9,
      "pgdeactivate": 10,
      "pglazyfree": 0,
      "pglazyfreed": 0,
      "thp_fault_alloc": 1,
      "thp_collapse_alloc": 0
    }
  },
  "pids": {"current": 3, "limit": 1024},
  "blkio": {},
  "hugetlb": {}
}
"""
)

V1_MEMORY_FIELDS = {
    # MemoryStat field: memory.stat key (as containerd's cgroups package maps them)
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout",
    "pg_fault": "pgfault",
    "pg_maj_fault": "pgmajfault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
    "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
    "total_cache": "total_cache",
    "total_rss": "total_rss",
    "total_rss_huge": "total_rss_huge",
    "total_mapped_file": "total_mapped_file",
    "total_dirty": "total_dirty",
    "total_writeback": "total_writeback",
    "total_pg_pg_in": "total_pgpgin",
    "total_pg_pg_out": "total_pgpgout",
    "total_pg_fault": "total_pgfault",
    "total_pg_maj_fault": "total_pgmajfault",
    "total_inactive_anon": "total_inactive_anon",
    "total_active_anon": "total_active_anon",
    "total_inactive_file": "total_inactive_file",
    "total_active_file": "total_active_file",
    "total_unevictable": "total_unevictable",
}


def nonzero(m: Message, prefix: str = "") -> list[str]:
    """Paths of the scalar fields set to something other than zero (sub-messages
    that are present but empty count as zero)."""
    out: list[str] = []
    for field, value in m.ListFields():
        path = prefix + field.name
        if field.message_type is None:
            if value:
                out.append(path)
            continue
        for item in value if field.is_repeated else [value]:
            out += nonzero(item, path + ".") if isinstance(item, Message) else [path]
    return out


def as_v1(m: Message) -> v1.Metrics:
    assert isinstance(m, v1.Metrics)
    return m


def as_v2(m: Message) -> v2.Metrics:
    assert isinstance(m, v2.Metrics)
    return m


# --------------------------------------------------------------------------- type names


def test_type_full_names() -> None:
    # containerd decodes Task.Stats by these names (the StatsResponse type URL).
    assert metrics_v1({}).DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert metrics_v2({}).DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"


# --------------------------------------------------------------------------- v1


def test_v1_cpu() -> None:
    m = as_v1(metrics_v1(V1_SAMPLE))
    assert m.cpu.usage.total == 52034127
    assert m.cpu.usage.kernel == 13000000
    assert m.cpu.usage.user == 39000000
    assert list(m.cpu.usage.per_cpu) == [31000000, 21034127]
    assert m.cpu.throttling.periods == 120
    assert m.cpu.throttling.throttled_periods == 7
    assert m.cpu.throttling.throttled_time == 345678


def test_v1_pids() -> None:
    m = as_v1(metrics_v1(V1_SAMPLE))
    assert (m.pids.current, m.pids.limit) == (3, 1024)


def test_v1_memory_entries() -> None:
    mem = as_v1(metrics_v1(V1_SAMPLE)).memory
    assert (mem.usage.limit, mem.usage.usage, mem.usage.max, mem.usage.failcnt) == (
        268435456,
        2830336,
        4194304,
        3,
    )
    assert (mem.swap.limit, mem.swap.usage, mem.swap.max, mem.swap.failcnt) == (
        536870912,
        2830336,
        4194304,
        1,
    )
    assert (mem.kernel.limit, mem.kernel.usage, mem.kernel.max) == (
        9223372036854771712,
        1007616,
        1200128,
    )
    assert (mem.kernel_tcp.usage, mem.kernel_tcp.max, mem.kernel_tcp.failcnt) == (4096, 0, 0)


@pytest.mark.parametrize("field,key", sorted(V1_MEMORY_FIELDS.items()))
def test_v1_memory_stat_field(field: str, key: str) -> None:
    """Every MemoryStat counter comes from its memory.stat key, including the
    keys spelled differently from the field (pgpgin -> pg_pg_in, ...)."""
    raw = V1_SAMPLE["memory"]["raw"]
    assert getattr(as_v1(metrics_v1(V1_SAMPLE)).memory, field) == raw[key]


def test_v1_every_counter_field_is_covered() -> None:
    # A new uint64 field in the proto would need a key in the table above.
    names = {f.name for f in v1.MemoryStat.DESCRIPTOR.fields if f.type == f.TYPE_UINT64}
    assert names == set(V1_MEMORY_FIELDS)


def test_v1_cache_falls_back_to_raw() -> None:
    stats = copy.deepcopy(V1_SAMPLE)
    del stats["memory"]["cache"]
    stats["memory"]["raw"]["cache"] = 777
    assert as_v1(metrics_v1(stats)).memory.cache == 777


def test_v1_blkio() -> None:
    blkio = as_v1(metrics_v1(V1_SAMPLE)).blkio
    got = [(e.op, e.major, e.minor, e.value) for e in blkio.io_service_bytes_recursive]
    assert got == [("Read", 8, 0, 4096000), ("Write", 8, 0, 8192), ("Total", 8, 0, 4104192)]
    # runc omits zero fields (omitempty): a missing minor is 0.
    got = [(e.op, e.major, e.minor, e.value) for e in blkio.io_serviced_recursive]
    assert got == [("Read", 8, 0, 100), ("Write", 8, 0, 2)]


def test_v1_hugetlb() -> None:
    m = as_v1(metrics_v1(V1_SAMPLE))
    got = {h.pagesize: (h.usage, h.max, h.failcnt) for h in m.hugetlb}
    assert got == {"2MB": (4194304, 6291456, 1), "1GB": (0, 0, 0)}


def test_v1_serializes_and_round_trips() -> None:
    m = metrics_v1(V1_SAMPLE)
    back = v1.Metrics.FromString(m.SerializeToString())
    assert back == m
    assert back.memory.total_pg_fault == 1420


# --------------------------------------------------------------------------- v2


def test_v2_cpu_in_microseconds() -> None:
    cpu = as_v2(metrics_v2(V2_SAMPLE)).cpu
    assert cpu.usage_usec == 52034
    assert cpu.user_usec == 39033
    assert cpu.system_usec == 13001
    assert (cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec) == (120, 7, 345)


def test_v2_pids() -> None:
    m = as_v2(metrics_v2(V2_SAMPLE))
    assert (m.pids.current, m.pids.limit) == (3, 1024)


def test_v2_memory() -> None:
    mem = as_v2(metrics_v2(V2_SAMPLE)).memory
    assert (mem.usage, mem.usage_limit, mem.max_usage) == (2830336, 268435456, 4194304)
    # memory.swap.current and memory.swap.max, not runc's memory+swap.
    assert (mem.swap_usage, mem.swap_limit) == (16384, 536870912)
    raw = V2_SAMPLE["memory"]["raw"]
    for f in v2.MemoryStat.DESCRIPTOR.fields:
        if f.name in raw:
            assert getattr(mem, f.name) == raw[f.name], f.name
    assert (mem.anon, mem.file, mem.slab, mem.pgfault) == (548864, 1155072, 180224, 1419)
    assert mem.workingset_refault == 5


U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    "memory,swap,expected",
    [
        # swap.max "max": runc leaves the combined limit unlimited.
        ({"usage": 100, "limit": 1000}, {"usage": 150, "limit": U64_MAX}, (50, U64_MAX)),
        # memory.max "max" with a swap limit: runc's sum wrapped around in uint64.
        ({"usage": 100, "limit": U64_MAX}, {"usage": 100, "limit": 4095}, (0, 4096)),
        # No swap accounting: runc reports memory.current and memory.max as "swap".
        ({"usage": 100, "limit": 1000}, {"usage": 100, "limit": 1000}, (0, 0)),
    ],
    ids=["swap-unlimited", "memory-unlimited", "no-swap-accounting"],
)
def test_v2_swap_is_swap_alone(
    memory: dict[str, int], swap: dict[str, int], expected: tuple[int, int]
) -> None:
    mem = as_v2(metrics_v2({"memory": {"usage": memory, "swap": swap}})).memory
    assert (mem.swap_usage, mem.swap_limit) == expected


def test_v2_ignores_unknown_raw_keys() -> None:
    # Newer kernels add memory.stat keys the proto does not have.
    stats = {"memory": {"raw": {"anon": 1, "zswap": 99, "workingset_refault_file": 3}}}
    mem = as_v2(metrics_v2(stats)).memory
    assert mem.anon == 1


def test_v2_serializes_and_round_trips() -> None:
    m = metrics_v2(V2_SAMPLE)
    assert v2.Metrics.FromString(m.SerializeToString()) == m


# --------------------------------------------------------------------------- empty and partial


@pytest.mark.parametrize("convert,cls", [(metrics_v1, v1.Metrics), (metrics_v2, v2.Metrics)])
@pytest.mark.parametrize(
    "stats",
    [
        {},
        {"cpu": {}, "memory": {}, "pids": {}, "blkio": {}, "hugetlb": {}},
        {"cpu": None, "memory": None, "pids": None, "blkio": None, "hugetlb": None},
        {"cpu": {"usage": {}, "throttling": {}}, "memory": {"raw": {}, "usage": {}}},
    ],
    ids=["empty", "empty-sections", "null-sections", "empty-subsections"],
)
def test_empty_stats_give_zero_metrics(
    convert: Any, cls: type[Message], stats: dict[str, Any]
) -> None:
    m = convert(stats)
    assert isinstance(m, cls)
    assert nonzero(m) == []
    assert cls.FromString(m.SerializeToString()) == m


def test_non_numeric_values_are_zero() -> None:
    # Defensive: whatever runc prints, a bad value never fails Stats.
    stats: dict[str, Any] = {
        "pids": {"current": "3", "limit": None},
        "memory": {"raw": {"rss": "x"}, "usage": {"usage": [1]}},
    }
    m = as_v1(metrics_v1(stats))
    assert (m.pids.current, m.pids.limit, m.memory.rss, m.memory.usage.usage) == (0, 0, 0, 0)
    m2 = as_v2(metrics_v2(stats))
    assert (m2.pids.current, m2.memory.anon, m2.memory.usage) == (0, 0, 0)
    stats["memory"]["raw"] = {"anon": "x"}
    assert as_v2(metrics_v2(stats)).memory.anon == 0
