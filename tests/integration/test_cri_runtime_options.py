"""A Stasis CRI handler's ``options`` table reaches runc (containerd 2.1).

containerd sends runc's Options only to runtime type io.containerd.runc.v2; a handler
of Stasis's type gets runtimeoptions.v1.Options: the table itself as TOML, or only the
file its ConfigPath names. Either way runc must run as the keys say. Observed here
through CRI with BinaryName (a wrapper that records runc's arguments, then runs runc)
and Root (runc's --root: the containers' runc state lies under it), in the table and
in a ConfigPath file; a misspelt key fails the pod with an error naming it.
SystemdCgroup travels the same way (it needs a systemd to observe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from bed.containerd import CRI_NAMESPACE, Containerd, images_dir
from bed.cri import CriClient, Pods, cri_missing
from bed.workload import IMAGE
from conftest import shim_path

pytestmark = pytest.mark.integration

BODY = "stasis-body"  # BinaryName and Root in the options table
FILE = "stasis-file"  # Root in the file ConfigPath names
TYPO = "stasis-typo"
CRI_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CriClient, Path]]:
    if why := cri_missing("v1"):
        pytest.fail(why, pytrace=False)
    d = tmp_path_factory.mktemp("runtime-options")
    wrapper = d / "runc-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {d / "runc-argv"}\nexec runc "$@"\n')
    wrapper.chmod(0o755)
    conf = d / "stasis-options.toml"
    conf.write_text(f"Root = '{d / 'root-file'}'\n")
    c = Containerd.in_run_dir(
        "2.1", shim_path(), namespace=CRI_NAMESPACE, cri=True,
        stasis_handlers={
            BODY: {"BinaryName": str(wrapper), "Root": str(d / "root-body")},
            FILE: {"ConfigPath": str(conf)},
            TYPO: {"SystemCgroup": True},
        },
    )  # fmt: skip
    try:
        c.start()
        c.import_image(images_dir() / "pause.tar")
        c.import_image(images_dir() / "busybox.tar")
        with CriClient(c.address, d / "cri") as cri:
            yield cri, d
    finally:
        left = c.stop()
    if left:
        pytest.fail(f"containerd 2.1 with CRI left behind (now cleaned up): {left}")


@contextlib.contextmanager
def _pod(cri: CriClient, d: Path, handler: str) -> Iterator[tuple[str, str]]:
    """A pod on ``handler`` with one sleeping container: (sandbox id, container id)."""
    pods = Pods(cri, d / "logs", handler, CRI_TIMEOUT)
    try:
        sandbox, config = pods.run(handler)
        yield sandbox, pods.container(sandbox, config, IMAGE, ["sleep", "600"], name="c")
    finally:
        pods.remove_all()


def test_binary_name_and_root_in_the_options_table(bed: tuple[CriClient, Path]) -> None:
    cri, d = bed
    root = d / "root-body" / CRI_NAMESPACE  # the runc shim's layout: <Root>/<namespace>
    with _pod(cri, d, BODY) as (sandbox, cid):
        for id_ in (sandbox, cid):
            assert (root / id_ / "state.json").is_file(), f"no runc state of {id_} in {root}"
        argv = (d / "runc-argv").read_text().splitlines()
        creates = [a for a in argv if a.startswith(f"--root {root} ") and " create " in a]
        assert any(cid in a for a in creates), argv
        assert any(sandbox in a for a in creates), argv
    assert not list(root.iterdir())  # runc's state went with the pod


def test_root_in_the_file_config_path_names(bed: tuple[CriClient, Path]) -> None:
    cri, d = bed
    root = d / "root-file" / CRI_NAMESPACE
    with _pod(cri, d, FILE) as (_, cid):
        assert (root / cid / "state.json").is_file(), f"no runc state of {cid} in {root}"
    assert not list(root.iterdir())


def test_a_misspelt_option_fails_the_pod_naming_it(bed: tuple[CriClient, Path]) -> None:
    cri, d = bed
    with pytest.raises(grpc.RpcError) as e, _pod(cri, d, TYPO):
        pass
    assert "unknown key 'SystemCgroup'" in str(e.value), e.value
