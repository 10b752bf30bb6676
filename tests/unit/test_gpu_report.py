"""The real-GPU check's bookkeeping, which runs where no GPU is: bench/gpu_check.py
reading what bench/gpu_device.sh leaves (env.txt, runN/gpu.json) into
results-gpu.json, and bench/report.py rendering that into docs/performance.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import gpu_check, report

ENV = """== 2026-11-28T02:38:08Z
Linux vm 6.18.44-fc-v657-gpu #1 SMP PREEMPT_DYNAMIC @0 x86_64 x86_64 x86_64 GNU/Linux
name, driver_version, memory.total [MiB], persistence_mode
NVIDIA H200, 580.159.04, 143771 MiB, Enabled
Python 3.12.3
torch 2.11.0+cu130 cuda 13.0 True
Version: 4.2.1
cuda-checkpoint: none
Looks good.
THP: always [madvise] never
16
               total        used        free      shared  buff/cache   available
Mem:             125           0         123           0           1         125
"""


def cycle(by: str, restore: float, checkpoint: float = 0.7) -> dict[str, Any]:
    return {
        "by": by,
        "seconds": {"criu_dump": 3.0, "criu_restore": 3.5},
        "criu_image_gib": 5.02,
        "checkpoint_gib_s": checkpoint,
        "restore_gib_s": restore,
        "checksum_left_running": "1:2",
        "checksum_after": "1:2",
        "pid": 500,
    }


def run(cycles: list[dict[str, Any]], thp: str = "madvise") -> dict[str, Any]:
    first = cycles[0]
    return {
        "thp": thp,
        "tensor_gib": 4.0,
        "gpu_only_checkpoint_gib_s": 1.5,
        "gpu_only_restore_gib_s": 4.0,
        "checksum_ok": True,
        "cycles": cycles,
        "seconds": first["seconds"],
        "criu_image_gib": first["criu_image_gib"],
        "checkpoint_gib_s": first["checkpoint_gib_s"],
        "restore_gib_s": first["restore_gib_s"],
    }


def test_env_facts_reads_the_device_scripts_env_txt() -> None:
    assert gpu_check.env_facts(ENV) == {
        "date": "2026-11-28T02:38:08Z",
        "kernel": "6.18.44-fc-v657-gpu",
        "gpu": "NVIDIA H200",
        "driver": "580.159.04",
        "gpu_memory": "143771 MiB",
        "python": "3.12.3",
        "torch": "2.11.0+cu130",
        "criu": "4.2.1",
        "thp": "madvise",
        "cpus": "16",
        "memory_gib": "125",
    }


def test_collect_keeps_batches_and_runs_in_order(tmp_path: Path) -> None:
    dirs = []
    for b in range(2):
        d = tmp_path / f"batch{b}"
        for n in (1, 2, 10):
            (d / f"run{n}").mkdir(parents=True)
            (d / f"run{n}" / "gpu.json").write_text(json.dumps({"n": n, "b": b}))
        (d / "env.txt").write_text(ENV)
        dirs.append(str(d))
    out = tmp_path / "results-gpu.json"
    gpu_check.collect(dirs, out)
    doc = json.loads(out.read_text())
    assert [[r["n"] for r in b["runs"]] for b in doc["batches"]] == [[1, 2, 10], [1, 2, 10]]
    assert [r["b"] for r in doc["batches"][1]["runs"]] == [1, 1, 1]
    assert doc["batches"][0]["env"]["gpu"] == "NVIDIA H200"


def test_the_page_shows_every_cycle_and_the_verdict_per_thp_mode() -> None:
    legacy = run([cycle("stasis", 0.8)])
    del legacy["cycles"]  # the first runs held their one cycle at the top level
    doc = {
        "batches": [
            {"env": gpu_check.env_facts(ENV), "runs": [legacy, {"error": "criu dump failed"}]},
            {
                "env": {**gpu_check.env_facts(ENV), "thp": "always"},
                "runs": [
                    run(
                        [
                            cycle("stasis", 1.2),
                            cycle("criu cuda_plugin", 1.1),
                            cycle("stasis", 1.3),
                        ],
                        thp="always",
                    )
                ],
            },
        ]
    }
    lines = report.gpu_section(doc)
    rows = [line for line in lines if line.startswith("| 2026")]
    assert len(rows) == 5, rows  # 1 legacy, 1 failed, 3 cycles
    assert "failed: criu dump failed" in rows[1]
    assert "| criu cuda_plugin |" in rows[3]
    text = lines[-1]
    assert "`madvise`, restore 0.80-0.80 GiB/s over 1 cycles (misses the target)" in text
    assert "`always`, restore 1.20-1.30 GiB/s over 2 cycles (meets the target)" in text
    assert "CRIU's cuda_plugin 1.10-1.10 GiB/s" in text


def test_a_reference_asked_for_but_not_run_is_said() -> None:
    r = run([cycle("stasis", 0.9)])
    r["reference_skipped"] = "no cuda-checkpoint in PATH (CRIU's cuda_plugin runs it)"
    lines = report.gpu_section({"batches": [{"env": gpu_check.env_facts(ENV), "runs": [r]}]})
    assert "could not run: no cuda-checkpoint in PATH" in lines[-1]


def test_no_batches_no_section() -> None:
    assert report.gpu_section({"batches": []}) == []
