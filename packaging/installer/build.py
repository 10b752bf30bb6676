"""Builds the Stasis installer image without Docker: an OCI image tarball.

    python packaging/installer/build.py OUTDIR [--wheels DIR]

writes OUTDIR/stasis-installer.tar (IMAGE_REF), which `ctr -n k8s.io images import`
takes. The image is busybox (Debian's busybox-static) plus /stasis: install.sh, the
containerd config tool, the wheels of Stasis and its dependencies (`pip wheel`, or those
in --wheels), a statically built exec shepherd (for nodes without a C compiler) and the
entrypoint, which installs into the host mounted at /host (packaging/manifests/).
Layers are built by ociimage.py, as the test bed's images are.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ociimage as images  # noqa: E402  (packaging/installer/ociimage.py)

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE_REF = f"docker.io/stasis/installer:{VERSION}"


def build_wheels(dest: Path) -> None:
    """Stasis and every dependency as wheels (pip's cache or the index)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--wheel-dir", str(dest), str(REPO)],
        check=True,
    )  # fmt: skip


def build_shepherd(dest: Path) -> bool:
    """Compiles shim/bootstrap/shepherd.c statically into dest; False without a compiler."""
    done = subprocess.run(
        [
            "cc",
            "-static",
            "-Os",
            "-s",
            "-Wall",
            "-o",
            str(dest),
            str(REPO / "shim/bootstrap/shepherd.c"),
        ],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def short_wheel_name(name: str) -> str:
    """The wheel's file name with one tag of each compressed tag set (the shortest): a
    USTAR layer holds names up to 100 characters, and pip takes any tag it supports."""
    parts = name.removesuffix(".whl").split("-")
    # Python 2 tags would make pip skip a py2.py3 wheel.
    tags = [
        min([x for x in t.split(".") if x != "py2"] or t.split("."), key=len) for t in parts[-3:]
    ]
    return "-".join([*parts[:-3], *tags]) + ".whl"


def payload(wheels: Path, work: Path) -> list[images.Entry]:
    """The /stasis tree of the image."""
    files: dict[str, tuple[bytes, int]] = {
        "install.sh": ((REPO / "install.sh").read_bytes(), 0o755),
        "entrypoint.sh": ((REPO / "packaging/installer/entrypoint.sh").read_bytes(), 0o755),
        "packaging/containerd_config.py": (
            (REPO / "packaging/containerd_config.py").read_bytes(),
            0o644,
        ),
    }
    for wheel in sorted(wheels.glob("*.whl")):
        files[f"wheels/{short_wheel_name(wheel.name)}"] = (wheel.read_bytes(), 0o644)
    if not any(name.startswith("wheels/stasis-") for name in files):
        raise SystemExit(f"no stasis wheel in {wheels}")
    shepherd = work / "stasis-exec-shepherd"
    if build_shepherd(shepherd):
        files["stasis-exec-shepherd"] = (shepherd.read_bytes(), 0o755)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name][0]).digest())
    files["payload.sha256"] = (digest.hexdigest().encode() + b"\n", 0o644)
    entries = [images.Entry(d, "dir") for d in ("stasis", "stasis/wheels", "stasis/packaging")]
    entries += [images.Entry(f"stasis/{n}", "file", mode=m, data=d) for n, (d, m) in files.items()]
    return entries


def build(outdir: Path, wheels: Path | None = None) -> Path:
    """Writes OUTDIR/stasis-installer.tar; returns its path."""
    busybox = images.DEFAULT_BUSYBOX
    if not images.is_static_elf(busybox):
        raise SystemExit(f"{busybox} is not static: apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if wheels is None:
            wheels = work / "wheels"
            build_wheels(wheels)
        entries = [*images.base_entries(busybox), *payload(wheels, work)]
        data = images.image_tar(IMAGE_REF, entries, entrypoint=["/bin/sh", "/stasis/entrypoint.sh"])
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "stasis-installer.tar"
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: build.py OUTDIR [--wheels DIR]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--wheels", type=Path, default=None)
    args = parser.parse_args(argv)
    path = build(args.outdir, args.wheels)
    print(f"{path}  {IMAGE_REF}  ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
