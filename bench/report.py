"""bench/results.json (bench/run.py) to docs/performance.md and its plots in docs/img/.

Every figure against its reference, its ratio ours / reference, the issue's goal, and
for a missed goal the measurements that explain the gap. The text is generated from
the numbers, so the page and results.json never disagree.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.common import goal_verdict

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "performance.md"
GPU_RESULTS = REPO / "bench" / "results-gpu.json"  # bench/gpu_device.sh on a GPU machine
GPU_RESTORE_GOAL = 1.1  # GiB/s: upstream CRIU with its CUDA plugin (the target)
GPU_RESTORE_STRETCH = 8.0  # GiB/s: the goal
IMG = "img"  # relative to the page
MiB = 1024  # KiB per MiB

OURS = "io.containerd.stasis.v2"
RUNC = "io.containerd.runc.v2"

GOALS = {
    "latency": 1.25,
    "memory": 1.0,
    "checkpoint": 1.05,
    "s3": 1.3,
    "diff": 0.1,  # bench/checkpoint.py's target: containerd at least 10x slower
}


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _mib(kib: float) -> str:
    return f"{kib / MiB:.1f} MiB"


# -- explanations, from the profile section's measurements -----------------------------


def _prof(doc: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = doc["sections"].get("profile", {})
    return p


def explain_latency(doc: dict[str, Any], ours: float, runc: float) -> str:
    p = _prof(doc)
    sh = doc["sections"].get("shim", {})
    parts = [
        f"ours {ours * 1000:.0f} ms against {runc * 1000:.0f} ms (+{(ours - runc) * 1000:.0f} ms)."
    ]
    prof = sh.get("profile", {}).get("runtimes", {})
    if OURS in prof and RUNC in prof:
        o, r = prof[OURS]["median_phases_ms"], prof[RUNC]["median_phases_ms"]
        diffs = sorted(
            ((k, o[k] - r[k]) for k in o if k in r and k != "total"), key=lambda x: -x[1]
        )
        top = ", ".join(f"`{k}` {d:+.0f} ms" for k, d in diffs[:3])
        parts.append(
            f"Where it goes (median of {sh['profile']['runs']} profiled `ctr run --rm` each, "
            f"containerd's log and events): the phases that differ most are {top}."
        )
    it = p.get("importtime_daemon")
    if it:
        top = ", ".join(f"{k} {v:.0f} ms" for k, v in list(it["top_level_ms"].items())[:5])
        parts.append(
            f"`python -X importtime` of the shim daemon's imports: {it['self_total_ms']:.0f} ms "
            f"in {it['imports']} modules (cumulative, top level: {top}); the interpreter "
            f"started and imported them in {it['wall_s'] * 1000:.0f} ms wall."
        )
    cli = p.get("cli_startup_s")
    if cli:
        daemon = (
            "the shim zygote (shim/bootstrap/zygote.py) forks the daemon with that code already "
            "imported, so Create is answered within milliseconds"
            if _zygote_used(doc)
            else "the daemon forked by `shim start` then imports its serving code (above) "
            "before it answers Create"
        )
        parts.append(
            "A Python process start-up alone (`stasis --help`) takes "
            f"{cli['median'] * 1000:.0f} ms; "
            "every container pays one for `shim start` (and one more for `shim delete` at "
            f"the end); {daemon}; the runc shim is a Go binary that starts in a few ms."
        )
    return " ".join(parts)


def _zygote_used(doc: dict[str, Any]) -> bool:
    """Whether our shims in this run were forked by the shim zygote."""
    mem = doc["sections"].get("shim", {}).get("memory", {})
    samples = mem.get("runtimes", {}).get(OURS, {}).get("samples", [])
    return any(s.get("zygote") for s in samples)


def explain_memory(doc: dict[str, Any]) -> str:
    p = _prof(doc)
    bare, daemon = p.get("python_bare_kib"), p.get("python_daemon_imports_kib")
    if not bare or not daemon:
        return "The interpreter's own footprint was not measured (profile section missing)."
    text = (
        f"The floor is the interpreter and the modules it imports: a bare CPython that ran "
        f"`pass` holds {_mib(bare['VmRSS'])} RSS ({_mib(bare['USS'])} private); one that "
        f"imported what the shim daemon imports "
        f"(`{p.get('importtime_daemon', {}).get('statement', '')}`) holds "
        f"{_mib(daemon['VmRSS'])} RSS, {_mib(daemon['USS'])} of it private, before it "
        "serves anything."
    )
    sh = doc["sections"].get("shim", {})
    mem, pods = sh.get("memory"), sh.get("pods")
    if mem:
        o, r = mem["runtimes"][OURS]["median"], mem["runtimes"][RUNC]["median"]
        text += (
            f" One idle shim of ours: {_mib(o['VmRSS'])} RSS, {_mib(o['USS'])} private, "
            + (
                f"within {_mib(abs(o['USS'] - daemon['USS']))} of that floor; "
                if abs(o["USS"] - daemon["USS"]) < MiB
                else f"{_mib(o['USS'] - daemon['USS'])} above that floor; "
            )
            + (
                "read once the shim zygote that forked it had gone (it leaves 60 s after "
                "the last start; the bench ends it sooner), which is the steady state; "
                if _zygote_used(doc)
                else ""
            )
            + f"the runc shim: {_mib(r['VmRSS'])} RSS. A lone runc shim's RSS and PSS include "
            "its whole Go binary, which no other process maps, while ours shares libpython "
            f"with other Python processes ({o.get('sharers', 0):.0f} here, the bench among "
            "them): that is why one shim's PSS can favour ours."
        )
    if pods:
        po, pr = pods["runtimes"][OURS], pods["runtimes"][RUNC]
        n = po["pods"]
        text += (
            f" With {n} shims the runc shims share their binary's pages {n} ways and cost "
            f"{_mib(pr['total_kib']['Pss'] / n)} PSS each ({_mib(pr['total_kib']['USS'] / n)} "
            f"private), while each of ours keeps {_mib(po['total_kib']['USS'] / n)} private of "
            f"{_mib(po['total_kib']['Pss'] / n)} PSS"
            + (
                " (read after their zygote had gone): they keep sharing the pages the "
                "zygote had when it forked them, copy-on-write, and what is private is each "
                "shim's own heap and the shared objects' pages that Python's reference "
                "counting wrote to, which copy-on-write then duplicated."
                if _zygote_used(doc)
                else ": every shim is its own interpreter, and the interpreter's heap and "
                "the imported modules' code objects are private to each process."
            )
        )
    return text


def explain_checkpoint(doc: dict[str, Any], s: dict[str, Any], restore: bool) -> str:
    p = _prof(doc)
    st = s["stats"]
    mib = s["mem_mib"]
    parts = []
    cli = p.get("cli_startup_s", {}).get("median")
    disk = p.get("disk", {})
    cpu = p.get("cpu", {})
    if not restore:
        o, r = st["stasis_checkpoint_s"]["median"], st["runc_checkpoint_s"]["median"]
        fs = st["runc_fsync_s"]["median"]
        parts.append(
            f"ours {o:.2f} s against runc's {r:.2f} s (+{o - r:.2f} s); the shim itself reports "
            f"{st['stasis_checkpoint_shim_s']['median']:.2f} s, of which the container was "
            f"frozen {st['stasis_frozen_s']['median']:.2f} s."
        )
        oc = [x["criu_stats"] for x in s["samples"]["stasis"] if x.get("criu_stats")]
        rc = [x["criu_stats"] for x in s["samples"]["runc"] if x.get("criu_stats")]
        if oc and rc:

            def crit(xs: list[dict[str, int]]) -> str:
                f = {k: _med([x[k] for x in xs]) / 1e6 for k in xs[0]}
                return (
                    f"tasks frozen {f['frozen_us']:.2f} s, of which memory collected "
                    f"{f['memdump_us']:.2f} s and written {f['memwrite_us']:.2f} s"
                )

            parts.append(
                f"CRIU's own stats-dump ({len(oc)} and {len(rc)} of the runs): ours {crit(oc)}; "
                f"runc's {crit(rc)}. The rest of our frozen time, "
                f"{st['stasis_frozen_s']['median'] - _med([x['frozen_us'] for x in oc]) / 1e6:.2f}"
                " s, is the shim's: the freeze (the freezer cgroup, written directly), the "
                "rootfs diff, `runc checkpoint`'s start-up and the wait for the digester that "
                "hashes the images as CRIU writes them, competing with CRIU for the cores."
            )
        if cli:
            parts.append(f"The CLI's start-up (`stasis --help`) is {cli:.2f} s of it.")
        parts.append(
            f"Ours is durable: the store sha256es and fsyncs every file before it writes the "
            f"manifest. fsync of runc's own images right after its checkpoint took {fs:.2f} s "
            f"(ours / (runc + fsync) = {o / (r + fs):.2f})."
        )
        if disk.get("fdatasync_mib_s"):
            parts.append(
                f"This disk writes {disk['fdatasync_mib_s']:.0f} MiB/s with fdatasync and "
                f"{disk['cached_mib_s']:.0f} MiB/s into the page cache (dd, {disk['mib']} MiB): "
                f"{mib} MiB durable cost {mib / disk['fdatasync_mib_s']:.2f} s at that rate."
            )
        if cpu.get("sha256_mib_s"):
            parts.append(
                f"sha256 runs at {cpu['sha256_mib_s']:.0f} MiB/s here: "
                f"{mib / cpu['sha256_mib_s']:.2f} s for {mib} MiB."
            )
        if "runc_guarded_checkpoint_s" in st:
            g = st["runc_guarded_checkpoint_s"]["median"]
            parts.append(
                f"runc doing the same work on top (the images' sha256 as CRIU writes them, "
                f"with early writeback, then their fsync: the bench's third variant) took "
                f"{g:.2f} s: ours / that = {o / g:.2f}."
                + (
                    " What ours costs over bare runc is that work, on a machine whose cores "
                    "CRIU, the hashing and the writeback share."
                    if o / g <= 1.1
                    else f" Ours spends {o - g:.2f} s more than that, in the runs measured."
                )
            )
    else:
        o, r = st["stasis_restore_s"]["median"], st["runc_restore_s"]["median"]
        parts.append(f"ours {o:.2f} s against runc's {r:.2f} s (+{o - r:.2f} s).")
        lat = doc["sections"].get("shim", {}).get("latency", {}).get("runtimes", {})
        if OURS in lat:
            parts.append(
                f"Ours goes through `ctr run -d`, containerd and a new shim: a whole container "
                f"start-to-exit on our shim takes {lat[OURS]['median']:.2f} s "
                f"(runc shim {lat[RUNC]['median']:.2f} s), a fixed cost that raw `runc restore` "
                "does not pay."
            )
        if cpu.get("sha256_mib_s"):
            parts.append(
                f"Every file is verified (sha256, {cpu['sha256_mib_s']:.0f} MiB/s here: "
                f"{mib / cpu['sha256_mib_s']:.2f} s for {mib} MiB); the CRIU images while "
                "CRIU restores them, on the other core (the restore gate holds the restored "
                "processes until they match), the rest before."
            )
        if "runc_guarded_restore_s" in st:
            g = st["runc_guarded_restore_s"]["median"]
            parts.append(
                f"runc restoring while the images' sha256 is computed alongside took {g:.2f} s "
                f"(ours / that = {o / g:.2f}): the hashing costs the restore little; the rest is "
                "the path through ctr, containerd and a shim's start."
            )
        ceiling = s.get("ratio", {}).get("restore_with_ceiling")
        if ceiling and "stasis_ceiling_hold_s" in st:
            parts.append(
                "CRIU held each restored tree at pre-resume for "
                f"{st['stasis_ceiling_hold_s']['median'] * 1000:.0f} ms while the shim checked "
                "it against the new container's spec (capabilities, ids, seccomp, mounts, "
                f"devices, cgroups): restore / (restore - hold) = {ceiling['ratio']:.3f}, "
                f"target <= {ceiling['target']:.2f}."
            )
    return " ".join(parts)


def explain_s3(doc: dict[str, Any], s3: dict[str, Any], restore: bool) -> str:
    st = s3["stats"]
    cpu = _prof(doc).get("cpu", {})
    samples = s3["samples"]["stasis"]
    stored = _med([x["stored_bytes"] for x in samples]) / (1 << 20)
    parts = []
    if not restore:
        o, r = st["stasis_checkpoint_s"]["median"], st["runc_checkpoint_s"]["median"]
        shim_s = st["stasis_checkpoint_shim_s"]["median"]
        parts.append(
            f"ours {o:.2f} s against runc's {r:.2f} s to local disk; the shim reports "
            f"{shim_s:.2f} s, of which frozen {st['stasis_frozen_s']['median']:.2f} s; the other "
            f"{o - shim_s:.2f} s are the CLI's start-up and containerd's round trips."
        )
        if st.get("floor_upload_s"):
            up = st["floor_upload_s"]["median"]
            rest = shim_s - st["stasis_frozen_s"]["median"] - up
            parts.append(
                f"After the thaw, {shim_s - st['stasis_frozen_s']['median']:.2f} s go to "
                f"reading the spool, sha256, zstd and the upload; moto's own upload time "
                f"(below) leaves {rest:.2f} s for the rest."
            )
            parts.append(
                f"moto_server alone takes {up:.2f} s to accept the {stored:.0f} MiB the "
                f"checkpoint stored ({stored / up:.0f} MiB/s, a boto3 multipart upload from "
                f"the bench, 8 MiB parts 8 in flight): {up / r:.2f} x runc's whole checkpoint."
            )
        if cpu.get("zstd_compress_mib_s"):
            parts.append(
                f"zstd compresses at {cpu['zstd_compress_mib_s']:.0f} MiB/s and sha256 runs "
                f"at {cpu['sha256_mib_s']:.0f} MiB/s on this CPU, on the same 2 cores as moto."
            )
    else:
        o, r = st["stasis_restore_s"]["median"], st["runc_restore_s"]["median"]
        parts.append(f"ours {o:.2f} s against runc's {r:.2f} s from local disk.")
        lat = doc["sections"].get("shim", {}).get("latency", {}).get("runtimes", {})
        if OURS in lat:
            parts.append(
                f"`ctr run -d`, containerd and a new shim cost about what a whole container "
                f"start-to-exit on our shim costs: {lat[OURS]['median']:.2f} s."
            )
        if st.get("floor_download_s"):
            d, w = st["floor_download_s"]["median"], st["floor_download_whole_s"]["median"]
            parts.append(
                f"moto_server alone serves the checkpoint's objects in {d:.2f} s as the "
                f"reader asks for them (8 MiB ranged GETs; moto reads the whole object for "
                f"every range) and in {w:.2f} s as whole GETs ({stored / max(w, 1e-9):.0f} MiB/s)."
            )
        if cpu.get("zstd_decompress_mib_s"):
            parts.append(f"zstd decompresses at {cpu['zstd_decompress_mib_s']:.0f} MiB/s here.")
    return " ".join(parts)


def explain_concurrent(cc: dict[str, Any], memory: bool, cli: float | None = None) -> str:
    o, r = cc["stasis"], cc["runc"]
    if not memory:
        return (
            f"{o['containers']} checkpoints of {o['mem_mib']} MiB each: ours {o['total_s']:.1f} s "
            f"in all against {r['total_s']:.1f} s; each of ours reported a median of "
            f"{_med(o['reported_seconds']):.2f} s in the shim (frozen "
            f"{_med(o['reported_frozen_seconds']):.2f} s). Ours starts {o['containers']} "
            "Python CLIs at once and each shim hashes and fsyncs its images, all on the "
            "same cores as the CRIU dumps."
            + (
                f" The CLIs' start-up alone is {o['containers']} x {cli:.2f} s = "
                f"{o['containers'] * cli:.1f} s of CPU (`stasis --help`), on 2 cores."
                if cli
                else ""
            )
        )
    br = ", ".join(
        f"{k} {_mib(v)}"
        for k, v in sorted(o["peak_pss_by_comm_kib"].items(), key=lambda x: -x[1])[:5]
    )
    rb = ", ".join(
        f"{k} {_mib(v)}"
        for k, v in sorted(r["peak_pss_by_comm_kib"].items(), key=lambda x: -x[1])[:5]
    )
    bc = o["peak_pss_by_comm_kib"]
    return (
        f"Our shims grew from {_mib(o['shims_before_kib'])} PSS before the checkpoints to "
        f"{_mib(bc.get('shim', 0))} at the peak (the checkpoint code is imported on first "
        f"use, and each hashes its images as CRIU writes them), and the "
        f"{o['containers']} Python CLIs held {_mib(bc.get('stasis-cli', 0))}; "
        "runc and CRIU are about the same on both "
        "sides. "
        f"Ours counts the {o['containers']} shims, which are there before and after (their PSS "
        f"before the checkpoints: {_mib(o['shims_before_kib'])}), the CLIs and every runc and "
        f"CRIU under the shims; raw runc counts only runc and CRIU. At the peak, by process "
        f"name (PSS): ours {br}; runc {rb}."
    )


# -- the verdict table ----------------------------------------------------------------


def verdicts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: ours, reference, ratio, goal, meets, explanation."""
    rows: list[dict[str, Any]] = []
    S = doc["sections"]

    def row(fig: str, ours: float, ref: float, unit: str, goal: float | None,
            why: str = "", higher: bool = False, note: str = "") -> None:  # fmt: skip
        ratio = ours / ref if ref else float("nan")
        v = goal_verdict(ratio, goal, higher) if goal is not None else {"ratio": ratio}
        rows.append({"figure": fig, "ours": ours, "reference": ref, "unit": unit,
                     "goal": goal, **v, "explanation": "" if v.get("meets") else why,
                     "note": note})  # fmt: skip

    sh = S.get("shim", {})
    lat = sh.get("latency")
    if lat and "runtimes" in lat:
        o, r = lat["runtimes"][OURS]["median"], lat["runtimes"][RUNC]["median"]
        row("start-to-exit latency (`ctr run --rm`, median)", o, r, "s", GOALS["latency"],
            explain_latency(doc, o, r))  # fmt: skip
    mem = sh.get("memory")
    if mem:
        for key, label in (("Pss", "PSS"), ("VmRSS", "RSS")):
            o = mem["runtimes"][OURS]["median"][key]
            r = mem["runtimes"][RUNC]["median"][key]
            row(f"one idle shim, {label}", o, r, "KiB", GOALS["memory"], explain_memory(doc))
    pod = sh.get("pod3")
    if pod:
        for key, label in (("Pss", "PSS"), ("VmRSS", "RSS")):
            o = pod["runtimes"][OURS]["median"][key]
            r = pod["runtimes"][RUNC]["median"][key]
            row(f"shim serving a 3-container pod, {label}", o, r, "KiB", GOALS["memory"],
                explain_memory(doc))  # fmt: skip
    pods = sh.get("pods")
    if pods:
        n = pods["runtimes"][OURS]["pods"]
        for key, label in (("Pss", "PSS"), ("VmRSS", "RSS")):
            o = pods["runtimes"][OURS]["total_kib"][key]
            r = pods["runtimes"][RUNC]["total_kib"][key]
            row(f"{n} single-container pods, total shim {label}", o, r, "KiB", GOALS["memory"],
                explain_memory(doc))  # fmt: skip
    ckp = S.get("checkpoint", {})
    for s in ckp.get("sweep", []):
        if "stats" not in s:
            continue
        st, mib = s["stats"], s["mem_mib"]
        row(f"checkpoint, {mib} MiB", st["stasis_checkpoint_s"]["median"],
            st["runc_checkpoint_s"]["median"], "s", GOALS["checkpoint"],
            explain_checkpoint(doc, s, False))  # fmt: skip
        row(f"  of which frozen (downtime), {mib} MiB", st["stasis_frozen_s"]["median"],
            st["runc_checkpoint_s"]["median"], "s", None,
            note="runc's whole checkpoint is downtime (no --leave-running)")  # fmt: skip
        row(f"restore, {mib} MiB", st["stasis_restore_s"]["median"],
            st["runc_restore_s"]["median"], "s", GOALS["checkpoint"],
            explain_checkpoint(doc, s, True))  # fmt: skip
    df = ckp.get("diff")
    if df and df.get("stats", {}).get("stasis"):
        st = df["stats"]
        row(f"rootfs diff capture ({df['image_files']} files, {len(df['changed'])} changed)",
            st["stasis"]["median"], st["containerd_tar"]["median"], "s", GOALS["diff"],
            "", note="reference: `ctr snapshots diff`, uncompressed tar")  # fmt: skip
    cc = ckp.get("concurrent")
    if cc and "runc" in cc:
        n = cc["stasis"]["containers"]
        row(f"{n} concurrent checkpoints, total time", cc["stasis"]["total_s"],
            cc["runc"]["total_s"], "s", GOALS["checkpoint"],
            explain_concurrent(cc, False, _prof(doc).get("cli_startup_s", {}).get("median")),
            note="goal: the checkpoint goal")  # fmt: skip
        row(f"{n} concurrent checkpoints, peak PSS of shims + helpers",
            cc["stasis"]["peak_pss_kib"], cc["runc"]["peak_pss_kib"], "KiB", None,
            note=explain_concurrent(cc, True))  # fmt: skip
    s3 = S.get("s3", {})
    if s3.get("stats") and s3["stats"].get("stasis_checkpoint_s"):
        st, mib = s3["stats"], doc["config"]["s3_mib"]
        row(f"checkpoint to S3 end to end, {mib} MiB", st["stasis_checkpoint_s"]["median"],
            st["runc_checkpoint_s"]["median"], "s", GOALS["s3"],
            explain_s3(doc, s3, False))  # fmt: skip
        row(
            f"restore from S3 end to end, {mib} MiB",
            st["stasis_restore_s"]["median"],
            st["runc_restore_s"]["median"],
            "s",
            GOALS["s3"],
            explain_s3(doc, s3, True),
        )
    return rows


def _fmt(x: float, unit: str) -> str:
    if unit == "KiB":
        return _mib(x)
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _status(v: dict[str, Any]) -> str:
    if v.get("goal") is None:
        return "no goal"
    return "meets" if v["meets"] else "misses"


def table_text(doc: dict[str, Any]) -> str:
    """The verdicts as a plain-text table for the terminal."""
    lines = [f"\n{'figure':58}{'ours':>12}{'reference':>12}{'ratio':>8}{'goal':>8}  status"]
    for v in doc.get("verdicts") or verdicts(doc):
        goal = f"{v['op']}{v['goal']:.2f}" if v.get("goal") is not None else "-"
        lines.append(
            f"{v['figure'][:58]:58}{_fmt(v['ours'], v['unit']):>12}"
            f"{_fmt(v['reference'], v['unit']):>12}{v['ratio']:8.2f}{goal:>8}  {_status(v)}"
        )
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------


def plots(doc: dict[str, Any], img_dir: Path) -> dict[str, str]:
    """PNG files of every figure against its reference; name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    S = doc["sections"]
    C_OURS, C_REF = "#1f77b4", "#7f7f7f"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=100)
        plt.close(fig)
        made[name.removesuffix(".png")] = name

    def bars(ax: Any, labels: list[str], ours: list[float], ref: list[float],
             ylabel: str, ref_label: str) -> None:  # fmt: skip
        x = range(len(labels))
        w = 0.38
        b1 = ax.bar([i - w / 2 for i in x], ours, w, label="stasis", color=C_OURS)
        b2 = ax.bar([i + w / 2 for i in x], ref, w, label=ref_label, color=C_REF)
        for bo, br, a, b in zip(b1, b2, ours, ref, strict=True):
            if b:
                ax.annotate(f"{a / b:.2f}x", (bo.get_x() + w / 2, bo.get_height()),
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
            del br
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    sh = S.get("shim", {})
    lat = sh.get("latency")
    if lat and "runtimes" in lat:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        data = [[x * 1000 for x in lat["runtimes"][rt]["samples"]] for rt in (OURS, RUNC)]
        ax.boxplot(data, tick_labels=["stasis", "runc shim"])
        ax.set_ylabel("ms (ctr run --rm ... true)")
        r = lat["runtimes"][OURS]["median"] / lat["runtimes"][RUNC]["median"]
        ax.set_title(f"start-to-exit latency: {r:.2f}x (goal <= {GOALS['latency']})", fontsize=10)
        save(fig, "latency.png")
    if sh.get("memory") and sh.get("pod3"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels, o, rf = [], [], []
        for key, name in (("memory", "idle shim"), ("pod3", "3-container pod")):
            for m, lab in (("Pss", "PSS"), ("VmRSS", "RSS")):
                labels.append(f"{name}\n{lab}")
                o.append(sh[key]["runtimes"][OURS]["median"][m] / MiB)
                rf.append(sh[key]["runtimes"][RUNC]["median"][m] / MiB)
        bars(ax, labels, o, rf, "MiB", "runc shim")
        ax.set_title(f"one shim's memory (goal <= {GOALS['memory']}x)", fontsize=10)
        save(fig, "shim-memory.png")
    if sh.get("pods"):
        p = sh["pods"]["runtimes"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        labels = ["PSS", "RSS", "USS"]
        keys = ["Pss", "VmRSS", "USS"]
        bars(ax, labels, [p[OURS]["total_kib"][k] / MiB for k in keys],
             [p[RUNC]["total_kib"][k] / MiB for k in keys], "MiB, sum over shims",
             "runc shim")  # fmt: skip
        ax.set_title(f"{p[OURS]['pods']} single-container pods: total shim memory", fontsize=10)
        save(fig, "pods-memory.png")
    sweep = [s for s in S.get("checkpoint", {}).get("sweep", []) if "stats" in s]
    if sweep:
        xs = [s["mem_mib"] for s in sweep]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))

        def line(ax: Any, key: str, label: str, style: str, color: str) -> None:
            ax.plot(xs, [s["stats"][key]["median"] for s in sweep], style, label=label,
                    color=color)  # fmt: skip

        line(a1, "stasis_checkpoint_s", "stasis checkpoint (CLI)", "o-", C_OURS)
        line(a1, "stasis_frozen_s", "stasis: frozen part", "o--", "#2ca02c")
        line(a1, "runc_checkpoint_s", "runc checkpoint (all frozen)", "s-", C_REF)
        a1.set_title("checkpoint (goal <= 1.05x)", fontsize=10)
        line(a2, "stasis_restore_s", "stasis restore (ctr run -d)", "o-", C_OURS)
        line(a2, "runc_restore_s", "runc restore -d", "s-", C_REF)
        a2.set_title("restore (goal <= 1.05x)", fontsize=10)
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("touched container memory (MiB)")
            ax.set_ylabel("s (median)")
            ax.legend(fontsize=8)
        save(fig, "checkpoint.png")
    df = S.get("checkpoint", {}).get("diff")
    if df and df.get("stats", {}).get("stasis"):
        st = df["stats"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = [
            "stasis\nrootfs.capture",
            "ctr snapshots\ndiff (tar)",
            "ctr snapshots\ndiff (gzip)",
        ]
        vals = [st[k]["median"] * 1000 for k in ("stasis", "containerd_tar", "containerd_gzip")]
        ax.bar(names, vals, color=[C_OURS, C_REF, C_REF])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(f"rootfs diff, {df['image_files']} files, {len(df['changed'])} changed",
                     fontsize=10)  # fmt: skip
        save(fig, "diff.png")
    s3 = S.get("s3", {})
    if s3.get("stats") and s3["stats"].get("stasis_checkpoint_s"):
        st = s3["stats"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bars(ax, ["checkpoint", "restore"],
             [st["stasis_checkpoint_s"]["median"], st["stasis_restore_s"]["median"]],
             [st["runc_checkpoint_s"]["median"], st["runc_restore_s"]["median"]],
             "s (median)", "raw runc, local disk")  # fmt: skip
        if st.get("floor_upload_s"):
            ax.scatter([-0.19, 0.81], [st["floor_upload_s"]["median"],
                       st["floor_download_s"]["median"]], marker="_", s=400, color="red",
                       label="moto_server alone", zorder=3)  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_title(f"S3 end to end, {doc['config']['s3_mib']} MiB (goal <= {GOALS['s3']}x)",
                     fontsize=10)  # fmt: skip
        save(fig, "s3.png")
    cc = S.get("checkpoint", {}).get("concurrent")
    if cc and "runc" in cc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
        bars(a1, ["total time"], [cc["stasis"]["total_s"]], [cc["runc"]["total_s"]], "s",
             "raw runc")  # fmt: skip
        bars(a2, ["peak PSS"], [cc["stasis"]["peak_pss_kib"] / MiB],
             [cc["runc"]["peak_pss_kib"] / MiB], "MiB", "raw runc")  # fmt: skip
        a2.axhline(cc["stasis"]["shims_before_kib"] / MiB, color="black", ls=":", lw=1)
        a2.annotate("our shims before", (0.05, cc["stasis"]["shims_before_kib"] / MiB),
                    fontsize=7, va="bottom")  # fmt: skip
        fig.suptitle(f"{cc['stasis']['containers']} concurrent checkpoints of "
                     f"{cc['stasis']['mem_mib']} MiB", fontsize=10)  # fmt: skip
        save(fig, "concurrent.png")
    return made


# -- the page -------------------------------------------------------------------------


def gpu_section(gdoc: dict[str, Any]) -> list[str]:
    """The real-GPU check's runs (bench/results-gpu.json), one table row per
    checkpoint-kill-restore cycle."""
    out = ["## GPU state on a real GPU\n"]
    batches = gdoc.get("batches") or []
    envs = [b.get("env") or {} for b in batches]
    if not envs:
        return []
    e = envs[0]
    out.append(
        "`bench/gpu_device.sh` (one command on a GPU machine; `bench/gpu_check.py` does the "
        "work): a process holding a PyTorch tensor on the GPU is checkpointed through "
        "Stasis's driver-API backend (`runtime/capture/gpu.py`: cuCheckpointProcessLock + "
        "Checkpoint) and `criu dump --leave-running`, its GPU state given back, then killed "
        "and restored (`criu restore`, then cuCheckpointProcessRestore + Unlock); the "
        "restored process recomputes the tensor's checksum on the GPU, which must match the "
        "one taken before (and after an in-place driver-only round trip); a run's later "
        "cycles checkpoint the process the previous cycle restored. Rates are tensor "
        "GiB over the whole step: checkpoint = lock + checkpoint + CRIU dump, restore = CRIU "
        "restore + driver restore + unlock. CRIU images go to /dev/shm. "
        f"Machine: {e.get('gpu', '?')} ({e.get('gpu_memory', '?')}), driver "
        f"{e.get('driver', '?')}, {e.get('cpus', '?')} CPUs, {e.get('memory_gib', '?')} GiB, "
        f"kernel {e.get('kernel', '?')} (a virtual machine), Python {e.get('python', '?')}, "
        f"PyTorch {e.get('torch', '?')}, CRIU {e.get('criu', '?')}.\n"
    )
    out.append(
        "| machine start | THP | run | cycle | by | tensor | CRIU images | checkpoint | restore "
        "| driver only: checkpoint / restore | CRIU dump / restore | checksums |"
    )
    out.append("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    by_thp: dict[str, list[float]] = {}
    driver_restore: list[float] = []
    reference: dict[str, list[float]] = {}
    for b, env in zip(batches, envs, strict=True):
        for i, r in enumerate(b.get("runs") or [], 1):
            if "error" in r:
                out.append(f"| {env.get('date', '?')} | | {i} | | failed: {r.get('error', '?')} |")
                continue
            thp = r.get("thp") or env.get("thp", "?")
            driver_restore.append(r["gpu_only_restore_gib_s"])
            driver = (
                f"{r['gpu_only_checkpoint_gib_s']:.2f} / {r['gpu_only_restore_gib_s']:.2f} GiB/s"
            )
            # Runs before cycles existed hold their one cycle at the top level.
            cycles = r.get("cycles") or [{**r, "by": "stasis"}]
            for j, c in enumerate(cycles, 1):
                sec = c["seconds"]
                if c["by"] == "stasis":
                    by_thp.setdefault(thp, []).append(c["restore_gib_s"])
                else:
                    reference.setdefault(thp, []).append(c["restore_gib_s"])
                out.append(
                    f"| {env.get('date', '?')} | {thp} | {i} | {j} | {c['by']} | "
                    f"{r['tensor_gib']:.1f} GiB | {c['criu_image_gib']:.2f} GiB | "
                    f"{c['checkpoint_gib_s']:.2f} GiB/s | {c['restore_gib_s']:.2f} GiB/s | "
                    f"{driver if j == 1 else ''} | {sec['criu_dump']:.2f} / "
                    f"{sec['criu_restore']:.2f} s | {'match' if r['checksum_ok'] else 'MISMATCH'} |"
                )
    out.append("")
    verdict = []
    for thp, rates in by_thp.items():
        lo, hi = min(rates), max(rates)
        meets = (
            "meets" if lo >= GPU_RESTORE_GOAL else "misses" if hi < GPU_RESTORE_GOAL else "mixed"
        )
        verdict.append(
            f"with transparent huge pages `{thp}`, restore {lo:.2f}-{hi:.2f} GiB/s over "
            f"{len(rates)} cycles ({meets} the target)"
        )
        if reference.get(thp):
            verdict[-1] += (
                f", CRIU's cuda_plugin {min(reference[thp]):.2f}-{max(reference[thp]):.2f} GiB/s"
            )
    out.append(
        f"Target: restore >= {GPU_RESTORE_GOAL} GiB/s (upstream CRIU with its CUDA plugin); "
        f"goal {GPU_RESTORE_STRETCH:.0f} GiB/s. Here, " + "; ".join(verdict) + ". "
        "Most of a restore is CRIU writing the images back into fresh anonymous memory, one "
        "4 KiB page fault at a time unless the kernel's THP mode is `always` (CRIU 4.2 "
        "applies a VMA's madvise flags only after it has filled it, and the CUDA driver's "
        "host copies are not madvised); the driver's own restore moves "
        f"{min(driver_restore, default=0):.1f}-{max(driver_restore, default=0):.1f} GiB/s. "
        "Stasis adds no step of its own to these: the same driver calls and CRIU run in the "
        "shim's checkpoint and restore (docs/architecture.md, GPU state). `always` is a "
        "node setting (`/sys/kernel/mm/transparent_hugepage/enabled`) that Stasis leaves "
        "to the operator."
    )
    skipped = {r["reference_skipped"] for b in batches for r in b.get("runs") or []
               if r.get("reference_skipped")}  # fmt: skip
    if skipped and not reference:
        out[-1] += (
            " CRIU's cuda_plugin, the reference, was asked for but could not run: "
            + "; ".join(sorted(skipped))
            + "."
        )
    out[-1] += "\n"
    return out


def render(doc: dict[str, Any], page: Path = PAGE) -> None:
    """docs/performance.md and docs/img/*.png from one run's results."""
    rows = doc["verdicts"] = verdicts(doc)
    imgs = plots(doc, page.parent / IMG)
    m = doc["machine"]
    S = doc["sections"]
    out: list[str] = []
    w = out.append
    w("# Performance\n")
    w(
        "Every figure below is measured against its reference side by side, in one run of "
        "`bench/run.py` on one machine (the runtimes interleaved where the bench allows). "
        "Ratios are ours / reference: lower is better. This page and "
        "`bench/results.json` are written by that run; regenerate both with:\n"
    )
    w("```\nsudo .venv/bin/python bench/run.py          # full run, about 12 minutes on 2 cores")
    w("sudo .venv/bin/python bench/run.py --quick  # smoke run\n```\n")
    w(
        f"**This run:** {doc['timestamp']}{' (--quick: smoke numbers)' if doc.get('quick') else ''}"
        f", {m['nproc']} CPUs ({m['cpu']}), {m['mem_total_kib'] / MiB / 1024:.0f} GiB, "
        f"kernel {m['kernel']}, cgroup {m['cgroup']}, {', '.join(m.get('runc') or [])}, "
        f"{', '.join(m.get('criu') or [])}, containerd "
        f"{S.get('shim', {}).get('containerd_version', '1.7')}, commit "
        f"{m['repo_commit'][:12]}{' (dirty tree)' if m['repo_dirty'] else ''}; the whole run "
        f"took {doc.get('seconds', 0) / 60:.0f} min.\n"
    )
    loads = ", ".join(
        f"{name} {s.get('loadavg_start')} -> {s.get('loadavg_end')}" for name, s in S.items()
    )
    w(
        "**Noise.** Absolute times on this machine vary from run to run (it is a small "
        "virtual machine whose neighbours and load change), so only the ratios (both "
        "sides measured in the same minutes) mean much. Load average (1, 5, 15 min) per "
        f"section: {loads}.\n"
    )
    w("## Summary\n")
    w("| figure | stasis | reference | ratio | goal | status |")
    w("|---|---:|---:|---:|---:|---|")
    for v in rows:
        goal = f"{v['op']} {v['goal']:.2f}" if v.get("goal") is not None else "-"
        w(
            f"| {v['figure'].strip()} | {_fmt(v['ours'], v['unit'])} | "
            f"{_fmt(v['reference'], v['unit'])} | {v['ratio']:.2f} | {goal} | {_status(v)} |"
        )
    w("")
    w(
        "Goals (from the issue): start latency <= 1.25x the runc shim; idle shim memory "
        "<= 1.0x (applied to the pod and 50-pod figures too); checkpoint and restore <= 1.05x "
        "raw runc locally (applied to the 20 concurrent checkpoints' total time too); S3 end to "
        "end <= 1.3x raw runc to local disk. The rootfs diff's target (bench/checkpoint.py) is "
        "ours at most 0.1x containerd's diff service. Figures marked `no goal` are shown for "
        "what they are.\n"
    )
    w("## Why a goal is missed\n")
    missed = [v for v in rows if v.get("goal") is not None and not v["meets"]]
    if not missed:
        w("Every goal is met in this run.\n")
    seen: set[str] = set()
    for v in missed:
        w(f"- **{v['figure'].strip()}: {v['ratio']:.2f}x (goal {v['op']} {v['goal']:.2f}).** ")
        text = v["explanation"]
        if text in seen and v["unit"] == "KiB":
            out[-1] += "Same cause as the memory figure above."
        else:
            out[-1] += text
            seen.add(text)
    w("")
    w("## Figures\n")
    captions = {
        "latency": "Start-to-exit latency of `ctr run --rm busybox true`, every timed run "
        "(our shim and containerd's runc shim, alternated).",
        "shim-memory": "Resident memory of one shim: idle with one `sleep` container, and "
        "serving a pod of 3 containers grouped by `io.containerd.runc.v2.group`.",
        "pods-memory": "Sum of the shims' memory with 50 single-container pods running.",
        "checkpoint": "Checkpoint and restore time against touched container memory; ours "
        "through the CLI and containerd, runc+CRIU raw to the same directory. The dashed "
        "line is how long our container was frozen.",
        "diff": "Rootfs diff capture: our upperdir walk against containerd's diff service.",
        "s3": "Checkpoint to S3 (moto_server) and restore from it, end to end, against raw "
        "runc to local disk; red: what moto_server alone takes to receive / serve the bytes.",
        "concurrent": "20 containers checkpointed at once: total wall time and peak PSS of "
        "the shims and helper processes (CLIs, runc, CRIU).",
    }
    for name, file in imgs.items():
        w(f"### {name}\n")
        w(f"![{name}]({IMG}/{file})\n")
        w(f"{captions.get(name, '')}\n")
    notes = [v for v in rows if v.get("note")]
    if notes:
        w("## Notes on figures\n")
        for v in notes:
            w(f"- {v['figure'].strip()}: {v['note']}")
        w("")
    if GPU_RESULTS.exists():
        import json

        out.extend(gpu_section(json.loads(GPU_RESULTS.read_text())))
    w("## How each figure is measured\n")
    w(
        "- **latency, idle shim memory, phases**: `bench/shim.py` (see bench/README.md); "
        "memory is VmRSS and PSS (`/proc/PID/smaps_rollup`) of the shim daemon, the parent "
        "of the task's init; the idle readings are one shim alive at a time.\n"
        "- **3-container pod**: 3 x `ctr run -d --annotation io.containerd.runc.v2.group=POD`; "
        "both shims group containers by that annotation (ours: `shim/bootstrap/start.py` "
        "`bundle_facts`), so one shim serves all three, checked through the inits' parent.\n"
        "- **50 pods**: 50 x `ctr run -d ... sleep 1000` with each runtime in turn, the sum "
        "over the 50 shims (PSS counts pages shared between the shims once in all).\n"
        "- **checkpoint/restore sweep and rootfs diff**: `bench/checkpoint.py`'s workload "
        "(a busybox `dd` holding N MiB, half random, half zeros) and raw runc side (same "
        "config.json, overlay rootfs, private `--root`), per size; ours is `stasis checkpoint "
        "--exit` then `ctr run -d --annotation stasis.dev/restore-from=REF`.\n"
        "- **20 concurrent checkpoints**: 20 containers of the same workload; ours: 20 "
        "`stasis checkpoint --exit` started at once; reference: 20 raw `runc checkpoint` "
        "started at once; the wall time until the last returns, and the peak over 0.2 s polls "
        "of the summed PSS of the shims, the CLIs and everything under them except the "
        "containers' own processes (ours), or of the runc processes and their CRIU (raw).\n"
        "- **S3**: `bench/s3.py` against a local moto_server (a single Python process; see "
        "bench/README.md for what that does to the numbers).\n"
        "- **profile**: `python -X importtime` of the daemon's imports, the memory of an "
        "interpreter with and without them, `stasis --help` wall time, `dd` with and without "
        "`conv=fdatasync`, sha256 and zstd throughput in-process.\n"
    )
    errs = {k: s["error"] for k, s in S.items() if "error" in s}
    if errs:
        w("## Sections that failed in this run\n")
        for k, e in errs.items():
            w(f"- {k}: `{e.splitlines()[0][:300]}`")
        w("")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(out).rstrip() + "\n")
