#!/usr/bin/env python3
"""Stasis checkpoint to S3 and restore from it, end to end, against raw runc to local disk,
measured in one run on one private containerd.

    .venv/bin/python bench/s3.py [--mem-mib 1024] [--runs 3] [--version 1.7]
                                 [--workdir-base /var/tmp] [--json OUT]

It starts a moto_server (the venv's, an S3-compatible server in Python) with one bucket,
points a Stasis config file of its own at it (STASIS_CONFIG, which the private
containerd hands to the shims), starts a private containerd (tests/bed/containerd.py)
and, --runs times, ours then raw:

* ours: a container holding --mem-mib MiB of touched memory (half random, half zeros;
  bench/checkpoint.py's workload), `stasis checkpoint ID --exit --to s3://BUCKET/RUN
  --json` (wall time), then `ctr run -d --annotation stasis.dev/restore-from=s3://...`
  (wall time: it returns once the restored task runs, i.e. after the download, the
  verification and `runc restore`);
* raw: bench/checkpoint.py's raw runc container on the same spec, `runc checkpoint` to
  local disk (--workdir-base) and `runc restore -d` from it (wall time each).

Ratios ours / raw of the medians, target <= 1.5 each way. It also prints the bytes
stored in the bucket against the bytes of CRIU images, and two floors set by moto alone,
measured from this process with boto3 (not in the ratios): uploading as many bytes as
one checkpoint stored, in 8 MiB parts 8 at a time, and downloading a checkpoint's
objects with 8 MiB ranged GETs 8 at a time (the pattern of the store's reader).

Everything (containers, raw runc containers, bundles, mounts, checkpoints, objects,
spools, the containerd instance, moto_server) is removed at the end, also on failure or
Ctrl-C. Raw numbers go to bench/results-s3.json (gitignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# bench/shim.py would shadow the `shim` package: never import from bench/ itself.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]


for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bed.containerd import Containerd, bed_missing, images_dir, unique_id  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402

from bench import checkpoint as ck  # noqa: E402
from runtime.names import SPOOL_DIR  # noqa: E402

NAMESPACE = "stasis-bench-s3"  # not the other benches' nor the tests': no shared runc root
BUCKET = "stasis-bench"
ACCESS_KEY, SECRET_KEY = "stasis-bench-key", "stasis-bench-secret"
TARGET = 1.5  # ours / raw runc, checkpoint and restore: at most
MiB = 1 << 20
PART = 8 * MiB  # runtime.store.s3.PART_SIZE
IN_FLIGHT = 8  # S3Store's default concurrency
DEFAULT_JSON = BENCH / "results-s3.json"


# -- moto_server --------------------------------------------------------------------------


class Moto:
    """moto_server on a free loopback port, its log in `log`."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        binary = Path(sys.prefix) / "bin" / "moto_server"
        if not binary.is_file():
            raise ck.BenchError(f"{binary} not found (pip install 'moto[server]')")
        with log.open("ab") as f:
            self.proc = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C to the bench must not kill it before cleanup
            )
        self.client = self._client()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.2)

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=2 * IN_FLIGHT,
                read_timeout=600,
            ),
        )

    def config_toml(self) -> str:
        return (
            f'[storage]\nrestore_sources = ["s3://{BUCKET}"]\n'
            "[storage.s3]\n"
            f'access_key_id = "{ACCESS_KEY}"\n'
            f'secret_access_key = "{SECRET_KEY}"\n'
            'region = "us-east-1"\n'
            f'endpoint = "{self.endpoint}"\n'
        )

    def objects(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": BUCKET, "Prefix": prefix}
        while True:
            resp = self.client.list_objects_v2(**kwargs)
            out += resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return out
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    def delete_prefix(self, prefix: str) -> None:
        keys = [o["Key"] for o in self.objects(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})
        for u in self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get(
            "Uploads", []
        ):
            self.client.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])

    def rss_kib(self) -> int:
        try:
            return int(ck.status_kib(self.proc.pid).get("VmRSS", 0))
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def upload_floor(moto: Moto, nbytes: int, prefix: str) -> float:
    """Seconds for moto to take `nbytes` as one multipart upload, 8 MiB parts 8 at a time
    (as our uploader sends them), from this process; the object is deleted afterwards."""
    s3, key = moto.client, f"{prefix}/floor-{uuid.uuid4().hex[:8]}"
    chunk = os.urandom(PART)
    parts = max(1, -(-nbytes // PART))
    t0 = time.perf_counter()
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    try:

        def put(n: int) -> dict[str, Any]:
            r = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=n, Body=chunk)
            return {"PartNumber": n, "ETag": r["ETag"]}

        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            done = list(pool.map(put, range(1, parts + 1)))
        s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
        )
        return time.perf_counter() - t0
    finally:
        moto.delete_prefix(key)


def download_floor(moto: Moto, prefix: str, ranged: bool = True) -> float:
    """Seconds to GET every object under `prefix` as the store's reader does: objects
    up to 8 MiB whole, bigger ones in 8 MiB ranges, 8 requests in flight; data dropped.
    With `ranged` False, every object in one GET (what moto does best)."""
    s3 = moto.client
    jobs: list[dict[str, Any]] = []
    for o in moto.objects(prefix):
        size = int(o["Size"])
        if size <= PART or not ranged:
            jobs.append({"Key": o["Key"]})
        else:
            jobs += [
                {"Key": o["Key"], "Range": f"bytes={a}-{min(a + PART, size) - 1}"}
                for a in range(0, size, PART)
            ]

    def get(job: dict[str, Any]) -> int:
        with s3.get_object(Bucket=BUCKET, **job)["Body"] as body:
            return len(body.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        sum(pool.map(get, jobs))
    return time.perf_counter() - t0


# -- ours: checkpoint to S3, restore from it ------------------------------------------------


def bundle_spec(c: Containerd, cid: str) -> dict[str, Any]:
    """The config.json containerd wrote into our container's bundle."""
    path = c.state / "io.containerd.runtime.v2.task" / NAMESPACE / cid / "config.json"
    if not path.is_file():
        raise ck.BenchError(f"no bundle config.json for {cid} at {path}")
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def ours_once(
    c: Containerd,
    moto: Moto,
    run: str,
    mib: int,
    i: int,
    scope: Any,
    want_spec: bool,
    floors: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    sample: dict[str, Any] = {}
    cid = unique_id("s3-stasis")
    scope.push(f"container {cid}", lambda: ck.remove(c, cid))
    _, sample["before"] = ck.run_ours(c, cid, mib)
    spec = bundle_spec(c, cid) if want_spec else None
    name = f"bench-{i}-{uuid.uuid4().hex[:6]}"
    store = f"s3://{BUCKET}/{run}"
    scope.push(f"checkpoint {store}/{name}", lambda: moto.delete_prefix(f"{run}/{name}/"))
    scope.push(f"spool of {name}", lambda: _rm_spools(name))
    cmd = [*ck.stasis_cmd(), "--address", str(c.address), "-n", NAMESPACE,
           "checkpoint", cid, "--exit", "--to", store, "--name", name, "--json"]  # fmt: skip
    sample["checkpoint_s"], r = ck.timed(cmd, what="stasis checkpoint (S3)")
    reported = json.loads(r.stdout)
    sample["reported"] = reported
    t = ck.task_info(c, cid)
    if t is not None and t[1] != "STOPPED":
        raise ck.BenchError(f"{cid} is {t[1]} after `stasis checkpoint --exit`")
    ck.remove(c, cid)
    objects = moto.objects(f"{run}/{name}/")
    sample["stored_bytes"] = sum(int(o["Size"]) for o in objects)
    sample["stored_objects"] = len(objects)
    sample["criu_bytes"] = reported["criu_size"]
    sample["checkpoint_bytes"] = reported["size"]  # every file, uncompressed
    sample["moto_rss_kib_after_checkpoint"] = moto.rss_kib()

    rid = unique_id("s3-restored")
    scope.push(f"container {rid}", lambda: ck.remove(c, rid))
    cmd = [str(c.bin_dir / "ctr"), "--address", str(c.address), "--namespace", NAMESPACE,
           "run", "-d", "--runtime", ck.OURS, "--annotation",
           f"{ck.RESTORE_FROM}={reported['ref']}", ck.IMAGE, rid]  # fmt: skip
    sample["restore_s"], _ = ck.timed(cmd, env=c.env(), what="ctr run -d (restore from S3)")
    t = ck.task_info(c, rid)
    if t is None or t[1] != "RUNNING":
        raise ck.BenchError(f"restored {rid} is not running: {t}")
    sample["after"] = ck.wait_resident(t[0], mib, timeout=60)
    ck.remove(c, rid)
    if floors:
        sample["floor_download_s"] = download_floor(moto, f"{run}/{name}/")
        sample["floor_download_whole_s"] = download_floor(moto, f"{run}/{name}/", ranged=False)
        sample["floor_upload_s"] = upload_floor(moto, sample["stored_bytes"], run)
    return sample, spec


def _rm_spools(name: str) -> None:
    for spool in glob.glob(f"{SPOOL_DIR}/{name}-*"):
        shutil.rmtree(spool, ignore_errors=True)


# -- the bench ------------------------------------------------------------------------------


def bench(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Fills `out` as it goes, so a failure or ^C keeps what was measured."""
    if why := bed_missing([args.version]):
        raise ck.BenchError(why)
    errors: list[str] = []
    out["cleanup_errors"] = errors
    out["loadavg_start"] = ck.loadavg()

    def progress(what: str) -> None:
        if sys.stderr.isatty():
            print(f"\r  {what}   ", end="", file=sys.stderr, flush=True)

    args.workdir_base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stasis-s3-", dir=args.workdir_base))
    saved_config = os.environ.get("STASIS_CONFIG")
    moto: Moto | None = None
    c = Containerd.in_run_dir(args.version, ck.shim_path(), namespace=NAMESPACE)
    raw: Any = None
    try:
        moto = Moto(work / "moto.log")
        config = work / "config.toml"
        config.write_text(moto.config_toml())
        config.chmod(0o600)
        os.environ["STASIS_CONFIG"] = str(config)  # the CLI's, and through containerd the shims'
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        out["containerd_version"] = ck.containerd_version(c)
        out["moto"] = _moto_version()
        lower = work / "busybox-layer"
        ck.extract_busybox_layer(lower)
        raw = ck.RawRunc(work, lower, c.env())
        out["runc"] = ck._cmd_out([raw.binary, "--version"]).splitlines()[:1]
        out["criu"] = ck._cmd_out(["criu", "--version"]).splitlines()[:1]
        out["checkpoint_dir_fs"] = ck._cmd_out(["stat", "-fc", "%T", str(work)])
        run = unique_id("bench")
        out["store"] = f"s3://{BUCKET}/{run}"
        samples: dict[str, list[dict[str, Any]]] = {"stasis": [], "runc": []}
        out["samples"] = samples
        spec: dict[str, Any] | None = None
        for i in range(args.runs):
            progress(f"run {i + 1}/{args.runs}: stasis (checkpoint to S3, restore from it)")
            with ck.Scope(errors) as scope:
                s, got = ours_once(
                    c, moto, run, args.mem_mib, i, scope, spec is None, i < args.floor_runs
                )
                spec = spec or got
            samples["stasis"].append(s)
            assert spec is not None
            progress(f"run {i + 1}/{args.runs}: raw runc (checkpoint to disk, restore)")
            with ck.Scope(errors) as scope:
                samples["runc"].append(raw.once(spec, args.mem_mib, scope))
        out["stats"], out["ratio"] = _stats(samples)
    finally:
        if sys.stderr.isatty():
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
        with ck.signals_ignored():
            left = c.stop()
            ck.rm_cgroups(ck.RAW_CGROUP)
            if raw is not None and raw.root.exists() and any(raw.root.iterdir()):
                errors.append(f"runc containers left in {raw.root}")
            if moto is not None:
                out["moto_rss_kib_end"] = moto.rss_kib()
                moto.stop()
            if saved_config is None:
                os.environ.pop("STASIS_CONFIG", None)
            else:
                os.environ["STASIS_CONFIG"] = saved_config
            try:
                ck.rm_tree(work)
            except ck.BenchError as e:
                errors.append(str(e))
        out["leftovers"] = repr(left) if left else None
        out["loadavg_end"] = ck.loadavg()


def _moto_version() -> str:
    from importlib.metadata import version

    try:
        return version("moto")
    except Exception:
        return "?"


def _stats(samples: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    o, r = samples["stasis"], samples["runc"]
    st: dict[str, Any] = {
        "stasis_checkpoint_s": ck.summary([x["checkpoint_s"] for x in o]),
        "stasis_checkpoint_shim_s": ck.summary([x["reported"]["seconds"] for x in o]),
        "stasis_frozen_s": ck.summary([x["reported"]["frozen_seconds"] for x in o]),
        "stasis_restore_s": ck.summary([x["restore_s"] for x in o]),
        "runc_checkpoint_s": ck.summary([x["checkpoint_s"] for x in r]),
        "runc_fsync_s": ck.summary([x["fsync_s"] for x in r]),
        "runc_restore_s": ck.summary([x["restore_s"] for x in r]),
        "floor_upload_s": ck.summary([x["floor_upload_s"] for x in o if "floor_upload_s" in x]),
        "floor_download_s": ck.summary(
            [x["floor_download_s"] for x in o if "floor_download_s" in x]
        ),
        "floor_download_whole_s": ck.summary(
            [x["floor_download_whole_s"] for x in o if "floor_download_whole_s" in x]
        ),
    }
    ratio: dict[str, Any] = {}
    if o and r:
        ratio = {
            "checkpoint": ck.verdict(
                st["stasis_checkpoint_s"]["median"] / st["runc_checkpoint_s"]["median"], TARGET
            ),
            "restore": ck.verdict(
                st["stasis_restore_s"]["median"] / st["runc_restore_s"]["median"], TARGET
            ),
        }
    return st, ratio


# -- report -----------------------------------------------------------------------------------


def report(doc: dict[str, Any]) -> None:
    r = doc["result"]
    print(
        f"\ncontainerd {doc['config']['version']} ({r.get('containerd_version', '?')}), "
        f"moto {r.get('moto', '?')}   load avg {r.get('loadavg_start')} -> "
        f"{r.get('loadavg_end')}"
    )
    if "error" in r:
        print(f"  ERROR (partial results below): {r['error'].splitlines()[0]}")
    st = r.get("stats")
    if st and st["stasis_checkpoint_s"] and st["runc_checkpoint_s"]:
        o, w = r["samples"]["stasis"], r["samples"]["runc"]
        mib = doc["config"]["mem_mib"]
        print(
            f"  {mib} MiB touched in dd (half random, half zeros), {len(o)} runs each, "
            f"stasis first in each pair;\n  ours to {r.get('store')} on moto_server, "
            f"runc's images to local disk ({r.get('checkpoint_dir_fs')})  (s)"
        )
        print(f"    {'':44}{'median':>9}{'min':>9}{'max':>9}")

        def row(label: str, s: dict[str, float]) -> str:
            cells = "".join(f"{s[k]:9.3f}" for k in ("median", "min", "max")) if s else "-"
            return f"    {label:44}{cells}"

        print(row("stasis checkpoint --exit --to s3:// (CLI)", st["stasis_checkpoint_s"]))
        print(row("  shim-reported seconds", st["stasis_checkpoint_shim_s"]))
        print(row("  frozen_seconds", st["stasis_frozen_s"]))
        print(row("runc checkpoint (local disk)", st["runc_checkpoint_s"]))
        print(row("  fsync of its images (not in ratio)", st["runc_fsync_s"]))
        print(row("stasis restore from s3:// (ctr run -d)", st["stasis_restore_s"]))
        print(row("runc restore -d (local disk)", st["runc_restore_s"]))
        if st["floor_upload_s"]:
            print(row("moto floor: upload as many bytes (boto3)", st["floor_upload_s"]))
            print(row("moto floor: ranged GETs of them (boto3)", st["floor_download_s"]))
            print(row("  the same objects in whole GETs (boto3)", st["floor_download_whole_s"]))
        stored = statistics.median(x["stored_bytes"] for x in o)
        criu = statistics.median(x["criu_bytes"] for x in o)
        whole = statistics.median(x["checkpoint_bytes"] for x in o)
        raw_images = statistics.median(x["images_bytes"] for x in w)
        objects = statistics.median(x["stored_objects"] for x in o)
        print(
            f"    bytes: stored in the bucket {stored / MiB:.1f} MiB ({objects:.0f} objects) "
            f"for {whole / MiB:.1f} MiB of checkpoint files,\n"
            f"           of which CRIU images {criu / MiB:.1f} MiB (runc's images "
            f"{raw_images / MiB:.1f} MiB); stored / CRIU images {stored / criu:.2f}"
        )
        before = [x["before"]["RssAnon"] for x in o + w]
        after = [x["after"]["RssAnon"] for x in o + w]
        print(
            f"    dd RssAnon before checkpoint {min(before) / 1024:.0f}-{max(before) / 1024:.0f}"
            f" MiB, after restore {min(after) / 1024:.0f}-{max(after) / 1024:.0f} MiB;"
            f" moto_server RSS {max(x['moto_rss_kib_after_checkpoint'] for x in o) / 1024:.0f}"
            " MiB at most after a checkpoint"
        )
        if r.get("ratio"):
            print(f"    ratio checkpoint stasis/runc  {ck.verdict_text(r['ratio']['checkpoint'])}")
            print(f"    ratio restore    stasis/runc  {ck.verdict_text(r['ratio']['restore'])}")
        if st["floor_upload_s"] and st["floor_download_s"]:
            up = st["stasis_checkpoint_s"]["median"] - st["floor_upload_s"]["median"]
            down = st["stasis_restore_s"]["median"] - st["floor_download_s"]["median"]
            print(
                f"    (rough, not the verdict: minus moto's floors, checkpoint {up:.2f} s = "
                f"{up / st['runc_checkpoint_s']['median']:.2f} x runc, restore {down:.2f} s = "
                f"{down / st['runc_restore_s']['median']:.2f} x runc)"
            )
    if r.get("leftovers"):
        print(f"  WARNING: leftovers cleaned up by force: {r['leftovers']}")
    for e in r.get("cleanup_errors") or []:
        print(f"  WARNING: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=1024, help="touched memory (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="runs per side (default 3)")
    p.add_argument(
        "--floor-runs", type=int, default=1, help="runs that also measure moto's floors (1)"
    )
    p.add_argument("--version", default="1.7", help="containerd version of the bed (1.7)")
    p.add_argument(
        "--workdir-base",
        type=Path,
        default=Path("/var/tmp"),
        help="where runc's images, bundles and moto's log go (default /var/tmp)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = p.parse_args(argv)
    if args.mem_mib < 2 or args.runs < 1 or args.floor_runs < 0:
        p.error("--mem-mib >= 2, --runs >= 1, --floor-runs >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ck.precompile()
    ck.private_signing_key()
    if os.geteuid() != 0:
        print("bench/s3.py needs root (private containerd, runc, CRIU)", file=sys.stderr)
        return 2
    if not any((d / "containerd-shim-stasis-v2").is_file() for d in ck.shim_path()):
        print(f"containerd-shim-stasis-v2 not found in {ck.shim_path()}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "benchmark": "s3",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": {
            "mem_mib": args.mem_mib,
            "runs": args.runs,
            "floor_runs": args.floor_runs,
            "version": args.version,
            "workdir_base": str(args.workdir_base),
            "namespace": NAMESPACE,
            "workload": ck.mem_script(args.mem_mib),
            "target_ratio_at_most": TARGET,
        },
        "machine": ck.machine_info(),
        "result": {},
    }
    m = doc["machine"]
    print(
        f"stasis S3 checkpoint bench  {doc['timestamp']}  nproc {m['nproc']}  kernel "
        f"{m['kernel']}  cgroup {m['cgroup']}  {m['cpu']}  commit {m['repo_commit'][:12]}"
        f"{' (dirty)' if m['repo_dirty'] else ''}"
    )
    failed = False
    try:
        with ck.signals_as_interrupt():
            try:
                bench(args, doc["result"])
            except (
                ck.BenchError,
                RuntimeError,
                subprocess.SubprocessError,
                OSError,
                BotoCoreError,
                ClientError,
            ) as e:
                failed = True
                doc["result"]["error"] = f"{type(e).__name__}: {e}"
                print(f"\nERROR {e}", file=sys.stderr)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted; everything started was cleaned up", file=sys.stderr)
        ck.write_json(args.json, doc)
        return 130
    report(doc)
    ck.write_json(args.json, doc)
    print(f"\nraw numbers: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
