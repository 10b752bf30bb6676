"""A private OCI registry for integration tests: Debian's `docker-registry` on loopback.

containerd 2.1's CRI restore from a checkpoint archive pulls the checkpoint's base
image (config.dump's rootfsImageRef) from its registry even when the image is in the
local store; with no registry reachable the restore fails. This serves one on
127.0.0.1:<free port>, storage and config in a directory of the caller's, and writes
a containerd hosts directory (certs.d layout) for it:

    registry = Registry(workdir)
    registry.start()
    containerd.ctr("images", "push", "--plain-http", registry.ref("stasis/busybox:test"), ...)
    ...
    registry.stop()  # ends the process this object started (by PID), removes nothing else

push_layout() uploads an OCI layout tar (images.py) over the registry's HTTP API, no
containerd needed; mirror() makes containerd pull a public registry's names from here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from email.message import Message
from pathlib import Path

BINARY = "docker-registry"  # Debian's docker-registry package (distribution 2.x)
SETUP_HINT = "install it with `apt-get install docker-registry` (tests/bed/setup.sh does)"


def registry_missing() -> str | None:
    """Why a registry cannot be started (a sentence), or None."""
    if shutil.which(BINARY) is None:
        return f"{BINARY} not found: {SETUP_HINT}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """One docker-registry process serving plain HTTP on 127.0.0.1, private to workdir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "config.yml"
        self.storage = self.workdir / "storage"
        self.log_path = self.workdir / "registry.log"
        # containerd's registry config_path: <hosts_dir>/<host:port>/hosts.toml
        self.hosts_dir = self.workdir / "certs.d"
        self._proc: subprocess.Popen[bytes] | None = None

    def ref(self, name: str) -> str:
        """``name`` (``repo:tag``) as a reference on this registry."""
        return f"{self.host}/{name}"

    def config_yml(self) -> str:
        return f"""\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: {self.host}
"""

    def hosts_toml(self) -> str:
        return f"""\
server = "http://{self.host}"

[host."http://{self.host}"]
  capabilities = ["pull", "resolve", "push"]
"""

    def mirror(self, upstream: str) -> None:
        """Makes containerd (registry config_path = hosts_dir) pull and resolve
        ``upstream``'s names (e.g. "registry.k8s.io") from this registry: repository
        upstream/a/b is served here as a/b."""
        hosts = self.hosts_dir / upstream / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(
            f'server = "https://{upstream}"\n\n'
            f'[host."http://{self.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )

    def push_layout(self, tar: Path, repository: str, tags: Iterable[str]) -> str:
        """Uploads the one image of an OCI layout tar as repository:tag for each tag;
        returns its manifest digest."""
        with tarfile.open(tar) as layout:

            def blob(digest: str) -> bytes:
                member = layout.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
                if member is None:
                    raise ValueError(f"{tar}: blob {digest} missing")
                return member.read()

            index_file = layout.extractfile("index.json")
            if index_file is None:
                raise ValueError(f"{tar}: no index.json")
            index = json.loads(index_file.read())
            if len(index["manifests"]) != 1:
                raise ValueError(f"{tar}: {len(index['manifests'])} manifests, want 1")
            desc = index["manifests"][0]
            manifest = blob(desc["digest"])
            parsed = json.loads(manifest)
            for part in [parsed["config"], *parsed["layers"]]:
                self._put_blob(repository, part["digest"], blob(part["digest"]))
            for tag in tags:
                self._request(
                    "PUT",
                    f"/v2/{repository}/manifests/{tag}",
                    manifest,
                    {"Content-Type": desc["mediaType"]},
                )
            return str(desc["digest"])

    def _put_blob(self, repository: str, digest: str, data: bytes) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"blob {digest} does not match its content")
        try:
            self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
            return  # already there
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        started = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        location = urllib.parse.urljoin(f"http://{self.host}", started["Location"])
        sep = "&" if "?" in location else "?"
        self._request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(digest)}",
            data,
            {"Content-Type": "application/octet-stream"},
        )

    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """One registry API call; returns the reply's headers (HTTPError when not 2xx)."""
        url = path if path.startswith("http") else f"http://{self.host}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=60) as reply:
            reply.read()
            return reply.headers

    def start(self, timeout: float = 20.0) -> None:
        """Starts the registry and waits until /v2/ answers."""
        if why := registry_missing():
            raise RuntimeError(why)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_yml())
        hosts = self.hosts_dir / self.host / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(self.hosts_toml())
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise RuntimeError(f"{BINARY} exited with {code} at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{BINARY} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process this object started (SIGKILL after timeout) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"
