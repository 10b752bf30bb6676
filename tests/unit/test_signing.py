"""Signed checkpoints (runtime.store.signing) and namespace-bound restores, without containers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from runtime.cli import main as cli
from runtime.config import Config, RestorePolicy, SigningConfig, StorageConfig, load
from runtime.errors import AlreadyExists, DataLoss, InvalidArgument, PermissionDenied
from runtime.store.archive import export_tar, import_tar
from runtime.store.local import LocalStore
from runtime.store.memory import MemoryStore
from runtime.store.signing import SIG_FILE, Signing, key_id, load_private, write_private
from shim.checkpoint import take as checkpointing


def signed_store(root: Path, key: Path, *trusted: str) -> LocalStore:
    return LocalStore(str(root), signing=Signing(str(key), tuple(trusted)))


def commit(store: LocalStore | MemoryStore, name: str, meta: dict[str, object]) -> None:
    with store.begin(name) as w:
        w.write_bytes("checkpoint/pages-1.img", b"x" * 64)
        w.write_bytes("stasis.json", json.dumps(meta).encode())
        w.commit({})


def test_key_is_created_0600_in_a_0700_dir_and_never_overwritten(tmp_path: Path) -> None:
    key = tmp_path / "etc" / "signing.key"
    store = signed_store(tmp_path / "store", key)
    commit(store, "c1", {})
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert (tmp_path / "etc" / "signing.key.pub").exists()
    with pytest.raises(AlreadyExists):
        write_private(str(key))
    assert (tmp_path / "store" / "c1" / SIG_FILE).exists()
    store.open("c1").close()


def test_a_readable_private_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    write_private(str(key))
    key.chmod(0o644)
    with pytest.raises(PermissionDenied, match=r"signing key file .*mode 0644"):
        load_private(str(key))


def test_unsigned_checkpoint_is_refused(tmp_path: Path) -> None:
    commit(LocalStore(str(tmp_path / "store")), "c1", {})  # a store that does not sign
    store = signed_store(tmp_path / "store", tmp_path / "k")
    with pytest.raises(PermissionDenied, match=r"checkpoint c1 in .* is unsigned"):
        store.open("c1")


def test_another_nodes_key_is_refused_unless_trusted(tmp_path: Path) -> None:
    commit(signed_store(tmp_path / "store", tmp_path / "a" / "k"), "c1", {})
    with pytest.raises(PermissionDenied, match=r"checkpoint c1 .*signed by key [0-9a-f]{16}"):
        signed_store(tmp_path / "store", tmp_path / "b" / "k").open("c1")
    # trusted by file, and by directory of *.pub
    pub = str(tmp_path / "a" / "k.pub")
    signed_store(tmp_path / "store", tmp_path / "b" / "k", pub).open("c1").close()
    signed_store(tmp_path / "store", tmp_path / "b" / "k", str(tmp_path / "a")).open("c1").close()


def test_tampered_manifest_is_a_bad_signature(tmp_path: Path) -> None:
    store = signed_store(tmp_path / "store", tmp_path / "k")
    commit(store, "c1", {"namespace": "a"})
    manifest = tmp_path / "store" / "c1" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["metadata"]["namespace"] = "b"
    manifest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    with pytest.raises(DataLoss, match=r"checkpoint c1 .*bad signature"):
        store.open("c1")
    (tmp_path / "store" / "c1" / SIG_FILE).write_text("{nonsense")
    with pytest.raises(DataLoss, match=r"manifest\.sig is not valid JSON"):
        store.open("c1")


def test_memory_store_signs_and_verifies(tmp_path: Path) -> None:
    store = MemoryStore(signing=Signing(str(tmp_path / "k")))
    commit(store, "c1", {})
    store.open("c1").close()
    other = MemoryStore(signing=Signing(str(tmp_path / "k2")))
    other._checkpoints = store._checkpoints
    with pytest.raises(PermissionDenied, match="not trusted"):
        other.open("c1")


def test_config_signing_and_cross_namespace(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[signing]\nkey_file = "/k/signing.key"\ntrusted_keys = ["/k/trusted.d"]\n'
        "[restore]\ncross_namespace = true\n"
    )
    cfg = load({"STASIS_CONFIG": str(path)})
    assert cfg.signing == SigningConfig("/k/signing.key", ("/k/trusted.d",))
    assert cfg.restore.cross_namespace
    env = {
        "STASIS_CONFIG": str(path),
        "STASIS_SIGNING_KEY_FILE": "/e/key",
        "STASIS_SIGNING_TRUSTED_KEYS": "/e/a.pub, /e/b",
    }
    assert load(env).signing == SigningConfig("/e/key", ("/e/a.pub", "/e/b"))
    path.write_text('[signing]\nkey_file = "relative"\n')
    with pytest.raises(InvalidArgument, match=r"signing\.key_file: 'relative' must be an absolute"):
        load({"STASIS_CONFIG": str(path)})
    path.write_text("[signing]\ntrusted = []\n")
    with pytest.raises(InvalidArgument, match=r"unknown key signing\.trusted"):
        load({"STASIS_CONFIG": str(path)})
    assert not Config().restore.cross_namespace


def _cli_config(tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / f"config-{key.parent.name}.toml"
    cfg.write_text(
        f'[storage]\nurl = "file://{tmp_path}/store-{key.parent.name}"\n'
        f'[signing]\nkey_file = "{key}"\n'
    )
    monkeypatch.setenv("STASIS_CONFIG", str(cfg))
    monkeypatch.delenv("STASIS_SIGNING_KEY_FILE", raising=False)  # the config's key, then


def test_import_requires_trust_for_an_untrusted_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Node A writes and exports a checkpoint; the archive carries A's signature.
    _cli_config(tmp_path, tmp_path / "a" / "k", monkeypatch)
    commit(signed_store(tmp_path / "store-a", tmp_path / "a" / "k"), "c1", {})
    archive = str(tmp_path / "c1.tar")
    assert cli.main(["export", f"{tmp_path}/store-a/c1", archive]) == 0
    with tarfile.open(archive) as tar:
        assert tar.getnames()[:2] == ["manifest.json", SIG_FILE]
    # A trusts its own archive.
    assert cli.main(["import", archive, "--name", "back"]) == 0
    # Node B does not: refused, nothing stored; with --trust imported and re-signed.
    _cli_config(tmp_path, tmp_path / "b" / "k", monkeypatch)
    capsys.readouterr()
    assert cli.main(["import", archive]) == 1
    err = capsys.readouterr().err
    assert "not trusted here" in err and "--trust" in err
    assert not any(p.name == "c1" for p in (tmp_path / "store-b").iterdir())
    assert cli.main(["import", archive, "--trust"]) == 0
    assert "on the user's word (--trust)" in capsys.readouterr().err
    b = signed_store(tmp_path / "store-b", tmp_path / "b" / "k")
    b.open("c1").close()
    sig = json.loads((tmp_path / "store-b" / "c1" / SIG_FILE).read_text())
    assert sig["key_id"] == key_id(load_private(str(tmp_path / "b" / "k")).public_key())


def test_an_archive_without_manifest_needs_trust(tmp_path: Path) -> None:
    archive = tmp_path / "podman.tar"
    payload = tmp_path / "spec.dump"
    payload.write_text("{}")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, "spec.dump")
    store = signed_store(tmp_path / "store", tmp_path / "k")
    with pytest.raises(PermissionDenied, match=r"archive .* is unsigned .*--trust"):
        import_tar(store, str(archive), "p1")
    assert import_tar(store, str(archive), "p1", trust=True).name == "p1"
    store.open("p1").close()


def test_a_forged_archive_signature_is_refused_even_with_trust(tmp_path: Path) -> None:
    store = signed_store(tmp_path / "store", tmp_path / "k")
    commit(store, "c1", {"namespace": "a"})
    archive = tmp_path / "c1.tar"
    with store.open("c1") as reader:
        export_tar(reader, str(archive), store.signing)
    forged = tmp_path / "forged.tar"
    with tarfile.open(archive) as src, tarfile.open(forged, "w") as dst:
        for m in src:
            f = src.extractfile(m) if m.isreg() else None
            if m.name == "manifest.json" and f is not None:
                data = f.read().replace(b'"x"', b'"y"') + b" "
                m.size = len(data)
                import io

                f = io.BytesIO(data)
            dst.addfile(m, f)
    with pytest.raises(DataLoss, match="bad signature"):
        import_tar(store, str(forged), "c2", trust=True)


# -- namespaces ------------------------------------------------------------------------


def restore_config(tmp_path: Path, *, cross: bool = False) -> Config:
    return Config(
        StorageConfig(url=f"file://{tmp_path}/store"),
        signing=SigningConfig(str(tmp_path / "k")),
        restore=RestorePolicy(cross_namespace=cross),
    )


def test_restore_into_another_namespace_is_refused(tmp_path: Path) -> None:
    store = signed_store(tmp_path / "store", tmp_path / "k")
    commit(store, "c1", {"namespace": "ns-a"})
    commit(store, "k1", {"namespace": "k8s.io", "kube_namespace": "team-a"})
    cfg = restore_config(tmp_path)
    target = checkpointing.RestoreTarget
    plan = checkpointing.prepare_restore("c1", None, cfg, target=target("ns-a"))
    assert plan is not None
    plan.reader.close()
    with pytest.raises(PermissionDenied, match=r"containerd namespace 'ns-a', not 'ns-b'"):
        checkpointing.prepare_restore("c1", None, cfg, target=target("ns-b"))
    with pytest.raises(PermissionDenied, match=r"Kubernetes namespace 'team-a', not 'team-b'"):
        checkpointing.prepare_restore("k1", None, cfg, target=target("k8s.io", "team-b"))
    with pytest.raises(PermissionDenied, match=r"Kubernetes namespace 'team-a', not '\(none\)'"):
        checkpointing.prepare_restore("k1", None, cfg, target=target("k8s.io"))
    allowed = restore_config(tmp_path, cross=True)
    for ref, t in (("c1", target("ns-b")), ("k1", target("k8s.io", "team-b"))):
        plan = checkpointing.prepare_restore(ref, None, allowed, target=t)
        assert plan is not None
        plan.reader.close()


def test_a_grant_allows_exactly_its_checkpoint_and_namespace(tmp_path: Path) -> None:
    store = signed_store(tmp_path / "store", tmp_path / "k")
    commit(store, "k1", {"namespace": "k8s.io", "kube_namespace": "team-a"})
    commit(store, "k2", {"namespace": "k8s.io", "kube_namespace": "team-a"})
    cfg = restore_config(tmp_path)
    import hashlib

    with store.open("k1") as r:
        digest = hashlib.sha256(r.manifest.to_json()).hexdigest()
    grant = Signing(str(tmp_path / "k")).grant(digest, "team-b")
    target = checkpointing.RestoreTarget("k8s.io", "team-b", grant)
    plan = checkpointing.prepare_restore("k1", None, cfg, target=target)
    assert plan is not None
    plan.reader.close()
    with pytest.raises(PermissionDenied):  # another checkpoint
        checkpointing.prepare_restore("k2", None, cfg, target=target)
    with pytest.raises(PermissionDenied):  # another namespace
        checkpointing.prepare_restore(
            "k1", None, cfg, target=checkpointing.RestoreTarget("k8s.io", "team-c", grant)
        )
    untrusted = Signing(str(tmp_path / "other")).grant(digest, "team-b")
    with pytest.raises(PermissionDenied):  # a key nobody trusts
        checkpointing.prepare_restore(
            "k1", None, cfg, target=checkpointing.RestoreTarget("k8s.io", "team-b", untrusted)
        )


def test_namespace_check_reads_the_signed_stasis_json(tmp_path: Path) -> None:
    store = signed_store(tmp_path / "store", tmp_path / "k")
    commit(store, "c1", {"namespace": "ns-a"})
    (tmp_path / "store" / "c1" / "stasis.json").write_text(json.dumps({"namespace": "ns-b"}))
    with pytest.raises(DataLoss):
        checkpointing.prepare_restore(
            "c1", None, restore_config(tmp_path), target=checkpointing.RestoreTarget("ns-b")
        )


def test_trust_signs_an_older_unsigned_checkpoint_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint written before checkpoints were signed: refused, listed, removable,
    # and once `stasis trust` checked and signed it, restorable.
    key = tmp_path / "a" / "k"
    _cli_config(tmp_path, key, monkeypatch)
    commit(LocalStore(str(tmp_path / "store-a")), "old", {})
    commit(LocalStore(str(tmp_path / "store-a")), "gone", {})
    store = signed_store(tmp_path / "store-a", key)
    with pytest.raises(PermissionDenied, match="unsigned"):
        store.open("old")
    assert {i.name for i in store.list()} == {"old", "gone"}
    assert cli.main(["rm", "gone"]) == 0
    assert not (tmp_path / "store-a" / "gone").exists()
    assert cli.main(["rm", "no-such"]) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err

    assert cli.main(["trust", "old"]) == 0
    assert "signed by this node" in capsys.readouterr().out
    with store.open("old") as reader:
        reader.verify()
    # Nothing is signed that does not match its manifest.
    commit(LocalStore(str(tmp_path / "store-a")), "bad", {})
    (tmp_path / "store-a" / "bad" / "checkpoint" / "pages-1.img").write_bytes(b"y" * 64)
    assert cli.main(["trust", "bad"]) == 1
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "store-a" / "bad" / SIG_FILE).exists()
    with pytest.raises(PermissionDenied):
        store.open("bad")
