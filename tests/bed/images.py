"""Builds the test bed's OCI image tarballs without Docker or a registry.

`python tests/bed/images.py OUTDIR` writes OUTDIR/busybox.tar (BUSYBOX_REF) and
OUTDIR/pause.tar (PAUSE_REF), each an OCI image layout in a tar that
`ctr images import` takes. Everything is deterministic (fixed mtimes and owners,
sorted entries), so a rebuild from the same busybox binary gives the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging" / "installer"))

from ociimage import (
    DEFAULT_BUSYBOX,
    Entry,
    base_entries,
    image_tar,
    is_static_elf,
)

BUSYBOX_REF = "docker.io/stasis/busybox:test"
PAUSE_REF = "registry.k8s.io/pause:3.8"

# The pause image's entry: like Kubernetes' pause, it sleeps until SIGTERM/SIGINT.
# PID 1 ignores signals it has no handler for, hence the trap; `wait` lets it act at once.
PAUSE_SCRIPT = b"""#!/bin/sh
trap 'exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $!
done
"""


def build(outdir: Path, busybox: Path = DEFAULT_BUSYBOX) -> dict[str, Path]:
    """Writes busybox.tar and pause.tar into outdir; returns {ref: tar path}."""
    if not busybox.is_file():
        raise SystemExit(f"{busybox} missing: apt-get install busybox-static")
    if not is_static_elf(busybox):
        raise SystemExit(f"{busybox} is dynamically linked: install busybox-static")
    base = base_entries(busybox)
    images = {
        BUSYBOX_REF: ("busybox.tar", image_tar(BUSYBOX_REF, base, cmd=["sh"])),
        PAUSE_REF: (
            "pause.tar",
            image_tar(
                PAUSE_REF,
                [*base, Entry("pause", "file", data=PAUSE_SCRIPT)],
                entrypoint=["/pause"],
            ),
        ),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for ref, (name, data) in images.items():
        path = outdir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written[ref] = path
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI: images.py OUTDIR [--busybox PATH]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--busybox", type=Path, default=DEFAULT_BUSYBOX)
    args = parser.parse_args(argv)
    for ref, path in build(args.outdir, args.busybox).items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{path}  {ref}  (tar sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
