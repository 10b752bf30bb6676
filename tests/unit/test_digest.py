"""TailDigester hashes files while they are written; the store trusts only unchanged ones."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from runtime.capture.digest import KnownDigest, TailDigester
from runtime.store.local import LocalStore


def _write_slowly(path: Path, chunks: list[bytes], delay: float = 0.005) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
            f.flush()
            time.sleep(delay)


def test_digests_files_written_while_following(tmp_path: Path) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(6)]
    d = TailDigester(str(tmp_path), poll=0.001).start()
    writer = threading.Thread(target=_write_slowly, args=(tmp_path / "pages-1.img", chunks))
    writer.start()
    (tmp_path / "small.img").write_bytes(b"tiny")
    writer.join()
    got = d.finish()
    whole = b"".join(chunks)
    assert got["pages-1.img"].sha256 == hashlib.sha256(whole).hexdigest()
    assert got["pages-1.img"].size == len(whole)
    assert "small.img" not in got, "small files are left to the commit"


def test_a_file_that_shrank_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(os.urandom(6 << 20))
    d = TailDigester(str(tmp_path), poll=0.001).start()
    time.sleep(0.1)
    with open(path, "r+b") as f:
        f.truncate(5 << 20)
    assert "pages-1.img" not in d.finish()


def test_store_uses_known_digests_only_for_unchanged_files(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "store"))
    with store.begin("c1") as w:
        path = w.path("checkpoint/pages-1.img")
        data = os.urandom(5 << 20)
        Path(path).write_bytes(data)
        st = os.stat(path)
        right = KnownDigest(hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns, st.st_ino)
        info = w.commit({}, {"checkpoint/pages-1.img": right})
    with store.open(info.name) as r:
        r.verify()

    with store.begin("c2") as w:
        path = w.path("checkpoint/pages-1.img")
        Path(path).write_bytes(data)
        st = os.stat(path)
        # A digest that no longer matches the file's stat is ignored: the commit re-reads.
        stale = KnownDigest("0" * 64, st.st_size, st.st_mtime_ns - 1, st.st_ino)
        info = w.commit({}, {"checkpoint/pages-1.img": stale})
    with store.open(info.name) as r:
        r.verify()
        assert r.manifest.files["checkpoint/pages-1.img"].sha256 == right.sha256
