"""Tests for runtime.config: the TOML file, environment overrides, errors and the masked secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import (
    DEFAULT_PATH,
    DEFAULT_STORAGE_URL,
    Config,
    S3Config,
    StorageConfig,
    check_storage_url,
    load,
)
from runtime.errors import InvalidArgument

FULL = """
[storage]
url = "s3://bucket/prefix"

[storage.s3]
access_key_id = "AKIDEXAMPLE"
secret_access_key = "wJalrXUtnFEMI/K7MDENG"
region = "eu-west-1"
endpoint = "https://minio.example:9000"
request_checksum_calculation = "when_required"
"""


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {"STASIS_CONFIG": str(path)}


def test_defaults_without_a_file(tmp_path: Path) -> None:
    # The default path is absent on a test machine; an env without STASIS_CONFIG reads it.
    if Path(DEFAULT_PATH).exists():
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    config = load({})
    assert config == Config()
    assert config.storage.url == DEFAULT_STORAGE_URL == "file:///var/lib/stasis/checkpoints"
    assert config.storage.s3 == S3Config()
    assert config.storage.s3.checksum == "when_supported"


def test_full_file(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL))
    assert config == Config(
        StorageConfig(
            url="s3://bucket/prefix",
            s3=S3Config(
                access_key_id="AKIDEXAMPLE",
                secret_access_key="wJalrXUtnFEMI/K7MDENG",
                region="eu-west-1",
                endpoint="https://minio.example:9000",
                checksum="when_required",
            ),
        )
    )


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")) == Config()


def test_only_url(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[storage]\nurl = "file:///mnt/nas/ckpt"\n'))
    assert config.storage.url == "file:///mnt/nas/ckpt"
    assert config.storage.s3 == S3Config()


def test_absolute_path_becomes_file_url(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[storage]\nurl = "/mnt/nas/ckpt"\n'))
    assert config.storage.url == "file:///mnt/nas/ckpt"


def test_env_overrides_file(tmp_path: Path) -> None:
    env = write(tmp_path, FULL) | {
        "STASIS_STORAGE_URL": "file:///srv/ckpt",
        "STASIS_S3_ACCESS_KEY_ID": "other-id",
        "STASIS_S3_SECRET_ACCESS_KEY": "other-secret",
        "STASIS_S3_REGION": "us-east-1",
        "STASIS_S3_ENDPOINT": "http://127.0.0.1:9000",
        "STASIS_S3_REQUEST_CHECKSUM_CALCULATION": "WHEN_SUPPORTED",
    }
    config = load(env)
    assert config.storage.url == "file:///srv/ckpt"
    assert config.storage.s3 == S3Config(
        access_key_id="other-id",
        secret_access_key="other-secret",
        region="us-east-1",
        endpoint="http://127.0.0.1:9000",
        checksum="when_supported",
    )


def test_env_without_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(InvalidArgument, match=r"absent\.toml"):
        load({"STASIS_CONFIG": str(missing)})


def test_env_only_partial_override(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL) | {"STASIS_S3_REGION": "ap-south-1"})
    assert config.storage.url == "s3://bucket/prefix"
    assert config.storage.s3.region == "ap-south-1"
    assert config.storage.s3.access_key_id == "AKIDEXAMPLE"


def test_empty_env_var_is_unset(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL) | {"STASIS_STORAGE_URL": "", "STASIS_S3_REGION": ""})
    assert config.storage.url == "s3://bucket/prefix"
    assert config.storage.s3.region == "eu-west-1"


def test_load_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = write(tmp_path, '[storage]\nurl = "file:///a/b"\n')
    monkeypatch.setenv("STASIS_CONFIG", env["STASIS_CONFIG"])
    monkeypatch.setenv("STASIS_STORAGE_URL", "file:///c/d")
    assert load().storage.url == "file:///c/d"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[storage]\nulr = "file:///x"\n', "storage.ulr"),
        ('[storage.s3]\nsecret = "x"\n', "storage.s3.secret"),
        ("[gpu]\nenabled = true\n", "gpu"),
        ("storage = 3\n", "storage"),
        ('[storage]\ns3 = "x"\n', "storage.s3"),
        ("[storage]\nurl = 3\n", "storage.url"),
        ('[storage]\nurl = "ftp://host/x"\n', "storage.url"),
        ('[storage]\nurl = "relative/dir"\n', "storage.url"),
        ('[storage]\nurl = "file://relative"\n', "storage.url"),
        ('[storage]\nurl = "s3://"\n', "storage.url"),
        ("[storage.s3]\nregion = 1\n", "storage.s3.region"),
        ('[storage.s3]\nrequest_checksum_calculation = "always"\n', "request_checksum_calculation"),
        ('[storage.s3]\nendpoint = "minio:9000"\n', "storage.s3.endpoint"),
    ],
)
def test_malformed_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    env = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as caught:
        load(env)
    assert env["STASIS_CONFIG"] in str(caught.value)
    assert key in str(caught.value)


def test_not_toml_names_file_and_line(tmp_path: Path) -> None:
    env = write(tmp_path, "[storage\nurl = \n")
    with pytest.raises(InvalidArgument, match=r"config\.toml: not valid TOML.*line 1"):
        load(env)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory where the file should be: reading fails with an OSError.
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(InvalidArgument, match=r"dir\.toml: cannot read"):
        load({"STASIS_CONFIG": str(tmp_path / "dir.toml")})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STASIS_STORAGE_URL", "http://nope"),
        ("STASIS_S3_ENDPOINT", "nope"),
        ("STASIS_S3_REQUEST_CHECKSUM_CALCULATION", "sometimes"),
    ],
)
def test_bad_env_names_the_variable(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=var):
        load(write(tmp_path, "") | {var: value})


def test_repr_masks_the_secret(tmp_path: Path) -> None:
    config = load(write(tmp_path, FULL))
    for text in (repr(config), str(config), repr(config.storage), repr(config.storage.s3)):
        assert "wJalrXUtnFEMI" not in text
        assert "secret_access_key='***'" in text
        assert "AKIDEXAMPLE" in text  # the key id is not secret, and helps debugging
    assert "secret_access_key=None" in repr(S3Config())


def test_secret_never_in_errors(tmp_path: Path) -> None:
    env = write(tmp_path, FULL.replace("when_required", "bogus"))
    with pytest.raises(InvalidArgument) as caught:
        load(env)
    assert "wJalrXUtnFEMI" not in str(caught.value)


def test_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.storage = StorageConfig()  # type: ignore[misc]


def test_check_storage_url() -> None:
    assert check_storage_url("/x", "here") == "file:///x"
    assert check_storage_url("file:///x", "here") == "file:///x"
    assert check_storage_url("s3://b", "here") == "s3://b"
    with pytest.raises(InvalidArgument, match=r"^here: "):
        check_storage_url("x", "here")


def test_restore_sources_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\nrestore_sources = ["/mnt/nas", "s3://b/p"]\n')
    cfg = load({"STASIS_CONFIG": str(path)})
    assert cfg.storage.restore_sources == ("file:///mnt/nas", "s3://b/p")
    env = {"STASIS_CONFIG": str(path), "STASIS_RESTORE_SOURCES": "file:///x, /y"}
    assert load(env).storage.restore_sources == ("file:///x", "file:///y")
    path.write_text('[storage]\nrestore_sources = "/mnt/nas"\n')
    with pytest.raises(InvalidArgument, match="restore_sources must be a list"):
        load({"STASIS_CONFIG": str(path)})
    path.write_text('[storage]\nrestore_sources = ["relative"]\n')
    with pytest.raises(InvalidArgument, match=r"restore_sources\[0\]"):
        load({"STASIS_CONFIG": str(path)})


def test_encryption_key_file_from_file_and_environment(tmp_path: Path) -> None:
    env = write(tmp_path, '[encryption]\nkey_file = "/etc/stasis/checkpoint.key"\n')
    cfg = load(env)
    assert cfg.encryption.key_file == "/etc/stasis/checkpoint.key"
    assert cfg.storage == StorageConfig()  # the other tables keep their defaults
    assert load({**env, "STASIS_ENCRYPTION_KEY_FILE": "/k"}).encryption.key_file == "/k"
    assert load({**env, "STASIS_ENCRYPTION_KEY_FILE": ""}).encryption.key_file == (
        "/etc/stasis/checkpoint.key"
    )
    assert load(write(tmp_path, "")).encryption.key_file is None
    env = write(tmp_path, '[encryption]\nkey_file = ""\n')
    assert load(env).encryption.key_file is None
    # The environment keeps the file's encryption when it overrides storage.
    env = write(tmp_path, '[encryption]\nkey_file = "/k"\n')
    assert load({**env, "STASIS_STORAGE_URL": "/s"}).encryption.key_file == "/k"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[encryption]\nkey_file = "relative.key"\n', "encryption.key_file: 'relative.key'"),
        ("[encryption]\nkey_file = 3\n", "encryption.key_file must be a string"),
        ('[encryption]\nkey = "/k"\n', "unknown key encryption.key"),
        ('encryption = "/k"\n', "encryption must be a table"),
    ],
)
def test_bad_encryption_config(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        load(write(tmp_path, text))
    with pytest.raises(InvalidArgument, match="STASIS_ENCRYPTION_KEY_FILE"):
        load({"STASIS_CONFIG": "", "STASIS_ENCRYPTION_KEY_FILE": "k"})


def test_restore_policy(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[restore]\nallow_setuid = false\n")
    cfg = load({"STASIS_CONFIG": str(path)})
    assert (cfg.restore.allow_setuid, cfg.restore.allow_devices) == (False, True)
    path.write_text('[restore]\nallow_devices = "no"\n')
    with pytest.raises(InvalidArgument, match=r"restore\.allow_devices must be true or false"):
        load({"STASIS_CONFIG": str(path)})
    path.write_text("[restore]\nallow_everything = true\n")
    with pytest.raises(InvalidArgument, match=r"unknown key restore\.allow_everything"):
        load({"STASIS_CONFIG": str(path)})


def test_restore_timeout_from_file_and_environment(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).restore.timeout_seconds == 600.0
    env = write(tmp_path, "[restore]\ntimeout_seconds = 90\n")
    assert load(env).restore.timeout_seconds == 90.0
    assert load(env | {"STASIS_RESTORE_TIMEOUT_SECONDS": "2.5"}).restore.timeout_seconds == 2.5
    assert load(env | {"STASIS_RESTORE_TIMEOUT_SECONDS": ""}).restore.timeout_seconds == 90.0


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("0", r"restore\.timeout_seconds: 0 must be more than 0"),
        ("-5", r"restore\.timeout_seconds: -5 must be more than 0"),
        ("1e9", r"restore\.timeout_seconds: 1000000000\.0 must be .* at most 86400"),
        ("nan", r"restore\.timeout_seconds: nan must be"),
        ('"10"', r"restore\.timeout_seconds must be a number of seconds, not str"),
        ("true", r"restore\.timeout_seconds must be a number of seconds, not bool"),
    ],
)
def test_bad_restore_timeout_in_file(tmp_path: Path, value: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        load(write(tmp_path, f"[restore]\ntimeout_seconds = {value}\n"))


@pytest.mark.parametrize("value", ["soon", "0", "inf", "-1"])
def test_bad_restore_timeout_in_environment(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument, match="STASIS_RESTORE_TIMEOUT_SECONDS"):
        load(write(tmp_path, "") | {"STASIS_RESTORE_TIMEOUT_SECONDS": value})
