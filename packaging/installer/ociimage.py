"""OCI image tarballs built without Docker or a registry: deterministic layers (fixed
mtimes and owners, sorted entries) over Debian's static busybox, in an OCI image layout
that `ctr images import` takes. The installer image and the test bed's images use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import struct
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Applets the tests count on; every applet of the binary gets a link, these must be among them.
REQUIRED_APPLETS = frozenset(
    {
        "sh", "echo", "cat", "sleep", "ls", "touch", "rm", "mkdir", "seq", "true", "false",
        "wc", "head", "tail", "grep", "ps", "top", "dd", "env", "id", "hostname", "mount",
        "ip", "nc", "yes", "date", "kill", "printf", "stat", "sync", "timeout", "pidof",
    }
)  # fmt: skip


MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
FIXED_CREATED = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class Entry:
    """One file system entry of a layer."""

    path: str  # relative, no leading slash
    kind: str  # "dir", "file", "symlink" or "hardlink" (target: a path in the layer)
    mode: int = 0o755
    data: bytes = b""
    target: str = ""


@dataclass
class Layout:
    """Blobs of an OCI image layout, by digest."""

    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Stores data as a blob; returns its descriptor."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}


def canonical_json(obj: object) -> bytes:
    """JSON with sorted keys and no whitespace, so digests are reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def oci_arch() -> str:
    """This machine's architecture in OCI/Go spelling."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def is_static_elf(path: Path) -> bool:
    """True when the ELF file at path has no program interpreter (is statically linked)."""
    with path.open("rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only; all we target
            return False
        endian = "<" if ident[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", ident, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack(endian + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def busybox_applets(busybox: Path) -> list[str]:
    """The applets the busybox binary offers (all of REQUIRED_APPLETS, or it raises)."""
    out = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout
    names = {n for n in out.split() if "/" not in n and n != "busybox"}
    if missing := REQUIRED_APPLETS - names:
        raise SystemExit(f"{busybox} lacks applets the tests use: {sorted(missing)}")
    return sorted(names)


def base_entries(busybox: Path) -> list[Entry]:
    """Busybox with its applets in /bin, root's /etc/passwd and /etc/group, /tmp."""
    entries = [
        Entry("bin", "dir"),
        Entry("dev", "dir"),
        Entry("etc", "dir"),
        Entry("proc", "dir"),
        Entry("root", "dir", mode=0o700),
        Entry("sys", "dir"),
        Entry("tmp", "dir", mode=0o1777),
        Entry("usr", "dir"),
        Entry("usr/bin", "dir"),
        Entry("usr/sbin", "dir"),
        Entry("sbin", "dir"),
        Entry("var", "dir"),
        Entry("bin/busybox", "file", data=busybox.read_bytes()),
        Entry("etc/passwd", "file", mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/group", "file", mode=0o644, data=b"root:x:0:\n"),
        Entry("etc/hostname", "file", mode=0o644, data=b"stasis\n"),
        Entry("etc/hosts", "file", mode=0o644, data=b"127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
    ]
    entries += [Entry(f"bin/{a}", "symlink", target="busybox") for a in busybox_applets(busybox)]
    return entries


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed, deterministic layer tar of entries (sorted, mtime 0, root-owned)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        # Hard links after the files they name: an extractor needs the target first.
        for e in sorted(entries, key=lambda e: (e.kind == "hardlink", e.path)):
            info = tarfile.TarInfo(e.path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                info.mode = 0o777
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e.target
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return buf.getvalue()


def image_layout(
    ref: str,
    entries: list[Entry],
    *,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    user: str | None = None,
) -> tuple[Layout, dict[str, Any]]:
    """The blobs of a one-layer image for ref, and its OCI index (one manifest)."""
    layout = Layout()
    layer = layer_tar(entries)
    layer_desc = layout.add(layer, MT_LAYER)
    container_config: dict[str, Any] = {"Env": [ENV_PATH], "WorkingDir": "/"}
    if cmd is not None:
        container_config["Cmd"] = cmd
    if entrypoint is not None:
        container_config["Entrypoint"] = entrypoint
    if user is not None:
        container_config["User"] = user
    config = {
        "architecture": oci_arch(),
        "os": "linux",
        "created": FIXED_CREATED,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created": FIXED_CREATED, "created_by": "tests/bed/images.py"}],
    }
    config_desc = layout.add(canonical_json(config), MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = layout.add(canonical_json(manifest), MT_MANIFEST)
    # Like `docker save`: the full name for containerd, the tag for OCI tools.
    manifest_desc["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
    }
    manifest_desc["platform"] = {"architecture": oci_arch(), "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]}
    return layout, index


def image_tar(
    ref: str,
    entries: list[Entry],
    *,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    user: str | None = None,
) -> bytes:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as a tar, for ref."""
    layout, index = image_layout(ref, entries, cmd=cmd, entrypoint=entrypoint, user=user)
    files: list[tuple[str, bytes]] = [
        ("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", canonical_json(index)),
    ]
    files += [(f"blobs/sha256/{d.removeprefix('sha256:')}", b) for d, b in layout.blobs.items()]
    out = [Entry("blobs", "dir"), Entry("blobs/sha256", "dir")]
    out += [Entry(name, "file", mode=0o644, data=data) for name, data in files]
    return layer_tar(out)
