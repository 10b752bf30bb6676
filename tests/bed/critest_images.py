"""Builds, offline, the images the CRI conformance suite (critest, cri-tools v1.34.0) pulls.

No registry is reachable, so each image critest names is rebuilt from Debian files as an
OCI layout tar (the format of images.py) and later pushed to a local registry that
containerd reaches under the real names through hosts.toml mirrors (registry.py):

- the sandbox (pause) image the bed's CRI config pins: one static process that waits;
- the e2e busybox (critest's default container image): the busybox base, plus procps'
  pgrep and util-linux's ipcs with the libraries they load (the suite runs both; Debian's
  busybox has neither applet);
- nginx (port 80) and hostnet-nginx (port 12003): Debian's nginx binary and its libraries;
- httpd: busybox's httpd serving an index page on port 80, logging "httpd-foreground";
- nonewprivs: a set-uid-root program printing its effective uid, built with gcc -static;
- the user images (USER uid, name, uid:group, name:group), the predefined-group image
  (user 1000 in group 50000) and the plain test images (different images for different
  tags, or one image under several tags), as cri-tools' images/ Dockerfiles describe.

Every image but pause starts from a busybox base like the one the upstream images
start FROM: Debian's dynamically linked busybox (not busybox-static, whose shell runs
applets without exec'ing /bin/<applet>, so masking /bin/ls would not be seen) with
applets as hard links, glibc, and /etc/passwd and /etc/group with www-data.

`python tests/bed/critest_images.py OUTDIR --nginx-deb DEB --busybox-deb DEB` writes
OUTDIR/<name>.tar and OUTDIR/images.json ({reference: tar name}) and skips the work when
its inputs (this file, images.py, the .debs, the host binaries and libraries it copies)
are unchanged. The image pinned
by an upstream digest (test-image-digest@sha256:9700f9...) cannot be rebuilt: its spec
is skipped by the conformance test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging" / "installer"))
from ociimage import Entry, base_entries, image_tar, oci_arch

E2E = "registry.k8s.io/e2e-test-images/"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools/"
INDEX = "images.json"
STAMP = ".stamp"

PAUSE = "registry.k8s.io/pause:3.8"  # the sandbox image the bed's CRI config pins
BUSYBOX_E2E = E2E + "busybox:1.29-2"
NGINX = E2E + "nginx:1.14-2"
HTTPD = E2E + "httpd:2.4.39-4"
NONEWPRIVS = E2E + "nonewprivs:1.3"
HOSTNET_NGINX = CRI_TOOLS + f"hostnet-nginx-{oci_arch()}:latest"
# Pinned by an upstream digest: no rebuild has that digest.
UNREPRODUCIBLE = (
    CRI_TOOLS
    + "test-image-digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf"
)

HOST_TOOLS = (Path("/usr/bin/pgrep"), Path("/usr/bin/ipcs"))  # procps, util-linux

# Like the busybox image the cri-tools images start FROM: www-data is uid/gid 33.
PASSWD = b"""\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nginx:x:101:101:nginx:/var/cache/nginx:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = b"""\
root:x:0:
daemon:x:1:
www-data:x:33:
nginx:x:101:
nogroup:x:65534:
"""

NGINX_CONF = """\
user nginx;
worker_processes 1;
error_log stderr notice;
pid /var/run/nginx.pid;

events {
    worker_connections 64;
}

http {
    default_type text/html;
    access_log /dev/stdout;
    server {
        listen %d;
        server_name localhost;
        location / {
            root /usr/share/nginx/html;
            index index.html;
        }
    }
}
"""
INDEX_HTML = b"<!DOCTYPE html>\n<html><body><h1>Welcome to nginx!</h1></body></html>\n"

HTTPD_DOCROOT = "usr/local/apache2/htdocs"
HTTPD_FOREGROUND = f"""#!/bin/sh
echo "httpd-foreground: serving /{HTTPD_DOCROOT} on port 80"
exec httpd -f -v -p 80 -h /{HTTPD_DOCROOT}
""".encode()

# The sandbox image: sleeps in pause(2) until SIGINT/SIGTERM, reaping children; no
# other process (the bed's script pause runs `sleep`, which critest's pgrep would see).
PAUSE_C = b"""\
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
    (void)sig;
    _exit(0);
}

static void reap(int sig)
{
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void)
{
    struct sigaction sa = {0};

    sa.sa_handler = stop;
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, 0);
    for (;;)
        pause();
}
"""

NNP_C = b"""\
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    printf("Effective uid: %d\\n", (int)geteuid());
    return 0;
}
"""


def _files(entries: Iterable[Entry]) -> list[Entry]:
    """entries with later ones replacing earlier ones of the same path, and every
    parent directory present."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        by_path[e.path] = e
    for path in list(by_path):
        for parent in PurePosixPath(path).parents:
            if str(parent) != "." and str(parent) not in by_path:
                by_path[str(parent)] = Entry(str(parent), "dir")
    return list(by_path.values())


def libraries(binary: Path) -> list[Path]:
    """The shared libraries (this machine's) that ldd says binary loads."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 3 else words[0]
        if path.startswith("/"):
            found.append(Path(path))
        elif "linux-vdso" not in path:
            raise SystemExit(f"ldd {binary}: cannot place {line.strip()!r}")
    return found


def elf_with_libraries(binary: Path, dest: str) -> list[Entry]:
    """binary at dest plus the shared libraries it loads (at their paths)."""
    entries = [Entry(dest, "file", data=binary.read_bytes())]
    for lib in libraries(binary):
        entries.append(Entry(str(lib).lstrip("/"), "file", data=lib.read_bytes()))
    return entries


def _deb_binary(deb: Path, member: str, workdir: Path) -> Path:
    """deb's file at member (e.g. usr/sbin/nginx), unpacked under workdir."""
    root = workdir / deb.name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    binary = root / member
    if not binary.is_file():
        raise SystemExit(f"{deb} has no {member}")
    return binary


def _static_binary(workdir: Path, name: str, source: bytes) -> Path:
    """source (C) compiled and linked statically into workdir/name."""
    c_file, binary = workdir / f"{name}.c", workdir / name
    c_file.write_bytes(source)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(c_file)], check=True)
    return binary


def _hardlinked(entries: list[Entry]) -> list[Entry]:
    """entries with busybox's applet symlinks made hard links, as in the busybox image
    the upstream ones start from: masking /bin/ls (MaskedPaths) must not mask busybox."""
    return [
        Entry(e.path, "hardlink", target="bin/busybox")
        if e.kind == "symlink" and e.target == "busybox"
        else e
        for e in entries
    ]


def _nginx_entries(base: list[Entry], nginx: Path, port: int) -> list[Entry]:
    conf = (NGINX_CONF % port).encode()
    return _files(
        [
            *base,
            *elf_with_libraries(nginx, "usr/sbin/nginx"),
            Entry("etc/nginx/nginx.conf", "file", mode=0o644, data=conf),
            Entry("usr/share/nginx/html/index.html", "file", mode=0o644, data=INDEX_HTML),
            Entry("var/run", "dir"),
            Entry("var/lib/nginx", "dir"),
            Entry("var/log/nginx", "dir"),
            Entry("var/cache/nginx", "dir"),
        ]
    )


def images(busybox: Path, nginx: Path, nnp: Path, pause: Path) -> dict[str, bytes]:
    """{reference: OCI layout tar} for every image critest pulls that can be rebuilt."""
    users = [
        Entry("etc/passwd", "file", mode=0o644, data=PASSWD),
        Entry("etc/group", "file", mode=0o644, data=GROUP),
    ]
    base = _files(
        [
            *_hardlinked(base_entries(busybox)),
            *elf_with_libraries(busybox, "bin/busybox"),
            *users,
        ]
    )
    sh = ["sh"]
    e2e_busybox = [*base]
    for tool in HOST_TOOLS:
        e2e_busybox += elf_with_libraries(tool, f"usr/bin/{tool.name}")
    out: dict[str, bytes] = {
        PAUSE: image_tar(
            PAUSE, [Entry("pause", "file", data=pause.read_bytes())], entrypoint=["/pause"]
        ),
        BUSYBOX_E2E: image_tar(BUSYBOX_E2E, _files(e2e_busybox), cmd=sh),
        NGINX: image_tar(NGINX, _nginx_entries(base, nginx, 80), cmd=_nginx_cmd()),
        HOSTNET_NGINX: image_tar(
            HOSTNET_NGINX, _nginx_entries(base, nginx, 12003), cmd=_nginx_cmd()
        ),
        HTTPD: image_tar(
            HTTPD,
            _files(
                [
                    *base,
                    Entry(f"{HTTPD_DOCROOT}/index.html", "file", mode=0o644, data=INDEX_HTML),
                    Entry("usr/local/bin/httpd-foreground", "file", data=HTTPD_FOREGROUND),
                ]
            ),
            cmd=["httpd-foreground"],
        ),
        NONEWPRIVS: image_tar(
            NONEWPRIVS,
            _files([*base, Entry("usr/local/bin/nnp", "file", mode=0o4755, data=nnp.read_bytes())]),
            entrypoint=["/usr/local/bin/nnp"],
        ),
    }
    for name, user in [
        ("test-image-user-uid", "1002"),
        ("test-image-user-username", "www-data"),
        ("test-image-user-uid-group", "1003:1004"),
        ("test-image-user-username-group", "www-data:1004"),
    ]:
        ref = f"{CRI_TOOLS}{name}:latest"
        out[ref] = image_tar(ref, base, cmd=sh, user=user)
    predefined = CRI_TOOLS + "test-image-predefined-group:latest"
    out[predefined] = image_tar(
        predefined,
        _files(
            [
                *base,
                Entry(
                    "etc/passwd",
                    "file",
                    mode=0o644,
                    data=PASSWD + b"default-user:x:1000:1000::/home/default-user:/bin/sh\n",
                ),
                Entry(
                    "etc/group",
                    "file",
                    mode=0o644,
                    data=GROUP
                    + b"default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
                ),
                Entry("home/default-user", "dir"),
            ]
        ),
        cmd=sh,
        user="1000",
    )
    # Images told apart by a file named after them (images/image-test's ADD ${TEST}).
    for ref, marker in [
        (CRI_TOOLS + "test-image-latest:latest", "test-image-latest"),
        (CRI_TOOLS + "test-image-1:latest", "test-image-1"),
        (CRI_TOOLS + "test-image-2:latest", "test-image-2"),
        (CRI_TOOLS + "test-image-3:latest", "test-image-3"),
        (CRI_TOOLS + "test-image-tag:test", "test"),
        (CRI_TOOLS + "test-image-tag:all", "all"),
        (CRI_TOOLS + "test-image-tags:1", "same-image"),
    ]:
        out[ref] = image_tar(ref, _files([*base, Entry(marker, "file", mode=0o644)]), cmd=sh)
    return out


def _nginx_cmd() -> list[str]:
    return ["nginx", "-g", "daemon off;"]


# One image under several tags: the registry gets the same manifest for each.
SAME_IMAGE_TAGS = {CRI_TOOLS + "test-image-tags:1": ["1", "2", "3"]}


def tar_name(ref: str) -> str:
    """The file name an image's tar gets in OUTDIR."""
    return ref.replace("/", "_").replace(":", "_") + ".tar"


def inputs_digest(binaries: list[Path]) -> str:
    """A digest of everything the images are made of (to skip a rebuild): this file,
    images.py, the binaries and the libraries they load."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    paths = [here / "critest_images.py", here / "images.py"]
    for binary in binaries:
        paths += [binary, *libraries(binary)]
    for path in paths:
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def built(outdir: Path) -> dict[str, Path]:
    """{reference: tar} from OUTDIR/images.json; raises FileNotFoundError if not built."""
    index = json.loads((outdir / INDEX).read_text())
    return {ref: outdir / name for ref, name in index.items()}


def missing(outdir: Path) -> str | None:
    """Why the images are not usable (a sentence), or None."""
    try:
        found = built(outdir)
    except (OSError, ValueError) as e:
        return f"critest images not built ({outdir / INDEX}: {e})"
    for ref, tar in found.items():
        if not tar.is_file():
            return f"critest image {ref} missing ({tar})"
    return None


def build(outdir: Path, nginx_deb: Path, busybox_deb: Path) -> dict[str, Path]:
    """Writes the image tars and images.json into outdir (unless up to date)."""
    for deb, package in ((nginx_deb, "nginx"), (busybox_deb, "busybox")):
        if not deb.is_file():
            raise SystemExit(f"{deb} missing: apt-get download {package}/bookworm")
    for tool in HOST_TOOLS:
        if not tool.is_file():
            raise SystemExit(f"{tool} missing: apt-get install procps util-linux")
    with tempfile.TemporaryDirectory(prefix="critest-images-") as tmp:
        work = Path(tmp)
        busybox = _deb_binary(busybox_deb, "bin/busybox", work)
        nginx = _deb_binary(nginx_deb, "usr/sbin/nginx", work)
        want = inputs_digest([busybox, nginx, *HOST_TOOLS])
        stamp = outdir / STAMP
        if stamp.is_file() and stamp.read_text().strip() == want and missing(outdir) is None:
            return built(outdir)
        nnp = _static_binary(work, "nnp", NNP_C)
        made = images(busybox, nginx, nnp, _static_binary(work, "pause", PAUSE_C))
    outdir.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for ref, data in made.items():
        path = outdir / tar_name(ref)
        part = path.with_suffix(".tmp")
        part.write_bytes(data)
        os.replace(part, path)
        index[ref] = path.name
    (outdir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    stamp.write_text(want + "\n")
    return built(outdir)


def main(argv: list[str] | None = None) -> int:
    """CLI: critest_images.py OUTDIR --nginx-deb DEB --busybox-deb DEB."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--nginx-deb", type=Path, required=True)
    parser.add_argument("--busybox-deb", type=Path, required=True)
    args = parser.parse_args(argv)
    for ref, path in build(args.outdir, args.nginx_deb, args.busybox_deb).items():
        print(f"{path.name}  {ref}  ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
