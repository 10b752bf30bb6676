"""Tests for runtime.linux.fsresolve: opening beneath a directory through no symlink and no ``..``.

Every rule is checked twice: through the kernel's ``openat2`` and through the
component-by-component walk used where the kernel lacks it (forced here by an
``ENOSYS`` from the syscall).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.linux import fsresolve


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _no_openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


@pytest.fixture(params=["openat2", "walk"])
def how(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(fsresolve, "_have_openat2", None)
    if request.param == "walk":
        monkeypatch.setattr(fsresolve, "_syscall_openat2", _no_openat2)
    else:
        try:
            os.close(fsresolve._syscall_openat2(-100, "/", os.O_PATH | os.O_CLOEXEC, 0))
        except OSError as e:
            if e.errno == errno.ENOSYS:
                pytest.skip("this kernel has no openat2")
            # RESOLVE_BENEATH refuses "/" (EXDEV): the syscall itself is there
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[int]:
    """``top/`` with ``a/b/f``, ``a/g``, ``lnk -> a``, ``a/flnk -> g``,
    ``out -> <outside dir>``, ``dangling -> nowhere``; yields a descriptor of ``top``."""
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_bytes(b"f")
    (top / "a" / "g").write_bytes(b"g")
    (top / "lnk").symlink_to("a")
    (top / "a" / "flnk").symlink_to("g")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (top / "out").symlink_to(tmp_path / "outside")
    (top / "dangling").symlink_to("nowhere")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def _read(dir_fd: int, rel: str) -> bytes:
    fd = fsresolve.open_beneath(dir_fd, rel, os.O_RDONLY)
    with open(fd, "rb") as f:
        return f.read()


def test_opens_real_paths(how: str, tree: int) -> None:
    before = _fds()
    assert _read(tree, "a/b/f") == b"f"
    assert _read(tree, "a/g") == b"g"
    assert _read(tree, "./a//b/f") == b"f"  # '.' and empty components are nothing
    fd = fsresolve.open_beneath(tree, "a/b", os.O_RDONLY | os.O_DIRECTORY)
    assert sorted(os.listdir(fd)) == ["f"]
    os.close(fd)
    fd = fsresolve.open_beneath(tree, "a", os.O_PATH)
    os.close(fd)
    assert _fds() == before
    assert fsresolve._have_openat2 is (how == "openat2")


@pytest.mark.parametrize(
    ("rel", "flags"),
    [
        ("lnk/g", os.O_RDONLY),  # a symlink on the way
        ("lnk/b/f", os.O_RDONLY),
        ("out/secret", os.O_RDONLY),  # a symlink leading out
        ("a/flnk", os.O_RDONLY),  # the last component
        ("a/flnk", os.O_PATH),  # O_PATH would otherwise open the link itself
        ("lnk", os.O_RDONLY | os.O_DIRECTORY),  # O_DIRECTORY | O_NOFOLLOW says ENOTDIR
        ("lnk", os.O_PATH | os.O_DIRECTORY),
        ("out", os.O_PATH),
        ("dangling", os.O_RDONLY),
    ],
)
def test_symlinks_are_refused(how: str, tree: int, rel: str, flags: int) -> None:
    before = _fds()
    with pytest.raises(OSError) as caught:
        fsresolve.open_beneath(tree, rel, flags)
    assert caught.value.errno == errno.ELOOP, caught.value
    assert _fds() == before


@pytest.mark.parametrize("rel", ["../top/a/g", "a/../a/g", "a/b/../../a/g", "/etc/passwd", ".."])
def test_dotdot_and_absolute_are_refused(how: str, tree: int, rel: str) -> None:
    with pytest.raises(OSError) as caught:
        fsresolve.open_beneath(tree, rel, os.O_RDONLY)
    assert caught.value.errno == errno.EXDEV, caught.value


def test_missing_and_wrong_kind(how: str, tree: int) -> None:
    before = _fds()
    with pytest.raises(FileNotFoundError):
        fsresolve.open_beneath(tree, "a/nope", os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        fsresolve.open_beneath(tree, "nope/f", os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        fsresolve.open_beneath(tree, "a/g/x", os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        fsresolve.open_beneath(tree, "a/g", os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(FileNotFoundError):
        fsresolve.open_beneath(tree, ".", os.O_RDONLY)  # nothing to open
    assert _fds() == before


def test_what_was_opened_stays_what_is_read(how: str, tree: int, tmp_path: Path) -> None:
    """A directory opened once is read through, whatever is renamed or linked later."""
    fd = fsresolve.open_beneath(tree, "a/b", os.O_RDONLY | os.O_DIRECTORY)
    try:
        top = tmp_path / "top"
        os.rename(top / "a", top / "moved")
        (top / "a").symlink_to(tmp_path / "outside")
        assert _read(fd, "f") == b"f"
        with pytest.raises(OSError) as caught:
            fsresolve.open_beneath(tree, "a/secret", os.O_RDONLY)
        assert caught.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_enosys_is_remembered(monkeypatch: pytest.MonkeyPatch, tree: int) -> None:
    calls = []

    def counting(dir_fd: int, rel: str, flags: int, mode: int) -> int:
        calls.append(rel)
        return _no_openat2(dir_fd, rel, flags, mode)

    monkeypatch.setattr(fsresolve, "_have_openat2", None)
    monkeypatch.setattr(fsresolve, "_syscall_openat2", counting)
    assert _read(tree, "a/g") == b"g"
    assert _read(tree, "a/b/f") == b"f"
    assert calls == ["a/g"] and fsresolve._have_openat2 is False


def test_other_openat2_errors_are_not_a_fallback(
    monkeypatch: pytest.MonkeyPatch, tree: int
) -> None:
    def denied(dir_fd: int, rel: str, flags: int, mode: int) -> int:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), rel)

    monkeypatch.setattr(fsresolve, "_have_openat2", None)
    monkeypatch.setattr(fsresolve, "_syscall_openat2", denied)
    with pytest.raises(PermissionError):
        fsresolve.open_beneath(tree, "a/g", os.O_RDONLY)


def test_fd_path_is_the_real_path(tmp_path: Path) -> None:
    (tmp_path / "real" / "d").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fd = os.open(tmp_path / "link" / "d", os.O_PATH | os.O_CLOEXEC)
    try:
        assert fsresolve.fd_path(fd) == str(tmp_path / "real" / "d")
        os.rename(tmp_path / "real" / "d", tmp_path / "real" / "e")
        assert fsresolve.fd_path(fd) == str(tmp_path / "real" / "e")
        os.rmdir(tmp_path / "real" / "e")
        with pytest.raises(FileNotFoundError):
            fsresolve.fd_path(fd)
    finally:
        os.close(fd)
