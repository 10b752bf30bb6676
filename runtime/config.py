"""Stasis configuration: ``/etc/stasis/config.toml`` (or ``$STASIS_CONFIG``), then
``STASIS_*`` environment overrides; every key and variable: docs/configuration.md.

Every key is optional; unknown keys, wrong types and bad values are errors naming the
file (or variable) and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from runtime.errors import InvalidArgument

DEFAULT_PATH = "/etc/stasis/config.toml"
PATH_ENV = "STASIS_CONFIG"
DEFAULT_STORAGE_URL = "file:///var/lib/stasis/checkpoints"
DEFAULT_RESTORE_TIMEOUT_S = 600.0
# A day: a longer "timeout" is no bound at all, and asyncio wants a finite number.
MAX_RESTORE_TIMEOUT_S = 86400.0

Checksum = Literal["when_supported", "when_required"]
CHECKSUMS: tuple[Checksum, ...] = ("when_supported", "when_required")


@dataclass(frozen=True, repr=False)
class S3Config:
    """Credentials and endpoint for an ``s3://`` store; ``None`` means the SDK's default.

    ``checksum`` is the SDK's ``request_checksum_calculation``: ``when_required``
    suits S3-compatible servers that reject the newer default checksums.
    The repr masks the secret key.
    """

    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None
    endpoint: str | None = None
    checksum: Checksum = "when_supported"

    def __repr__(self) -> str:
        secret = None if self.secret_access_key is None else "***"
        return (
            f"S3Config(access_key_id={self.access_key_id!r}, secret_access_key={secret!r}, "
            f"region={self.region!r}, endpoint={self.endpoint!r}, checksum={self.checksum!r})"
        )


@dataclass(frozen=True)
class StorageConfig:
    """Where checkpoints live: ``url`` is ``file:///abs/dir`` or ``s3://bucket[/prefix]``."""

    url: str = DEFAULT_STORAGE_URL
    s3: S3Config = field(default_factory=S3Config)
    # Stores a restore may read besides ``url`` (file:// or s3:// URLs): the
    # annotation comes from whoever may create pods, the restore runs as root.
    restore_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncryptionConfig:
    """Client-side encryption of checkpoints at rest (``runtime.store.crypt``).

    ``key_file`` None: new checkpoints are stored unencrypted and encrypted
    ones cannot be opened. The file is read when a store is opened.
    """

    key_file: str | None = None


@dataclass(frozen=True)
class SigningConfig:
    """Checkpoint signatures (``runtime.store.signing``): the node's key, the keys it trusts.

    ``key_file`` None means ``runtime.store.signing.DEFAULT_KEY_FILE``
    (``/etc/stasis/signing.key``), created on the first checkpoint; restores
    always require a signature by a trusted key.
    """

    key_file: str | None = None
    trusted_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestorePolicy:
    """What a restore lets a checkpoint's rootfs diff put into a container, where a
    checkpoint may be restored (``cross_namespace``), and how long ``runc restore``
    may run (``timeout_seconds``) before the shim kills it."""

    allow_setuid: bool = True
    allow_devices: bool = True
    cross_namespace: bool = False
    timeout_seconds: float = DEFAULT_RESTORE_TIMEOUT_S


@dataclass(frozen=True)
class Limits:
    """How far untrusted input may make Stasis write (bytes)."""

    max_import_bytes: int = 256 << 30
    max_diff_bytes: int = 64 << 30
    reserve_bytes: int = 1 << 30


@dataclass(frozen=True)
class Config:
    """The whole Stasis configuration."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    restore: RestorePolicy = field(default_factory=RestorePolicy)
    limits: Limits = field(default_factory=Limits)
    signing: SigningConfig = field(default_factory=SigningConfig)


# TOML key -> S3Config field, and the environment variable that overrides it.
_S3_KEYS: dict[str, tuple[str, str]] = {
    "access_key_id": ("access_key_id", "STASIS_S3_ACCESS_KEY_ID"),
    "secret_access_key": ("secret_access_key", "STASIS_S3_SECRET_ACCESS_KEY"),
    "region": ("region", "STASIS_S3_REGION"),
    "endpoint": ("endpoint", "STASIS_S3_ENDPOINT"),
    "request_checksum_calculation": ("checksum", "STASIS_S3_REQUEST_CHECKSUM_CALCULATION"),
}
_STORAGE_URL_ENV = "STASIS_STORAGE_URL"
_RESTORE_SOURCES_ENV = "STASIS_RESTORE_SOURCES"
_KEY_FILE_ENV = "STASIS_ENCRYPTION_KEY_FILE"
_SIGNING_KEY_ENV = "STASIS_SIGNING_KEY_FILE"
_TRUSTED_KEYS_ENV = "STASIS_SIGNING_TRUSTED_KEYS"
_RESTORE_TIMEOUT_ENV = "STASIS_RESTORE_TIMEOUT_SECONDS"
_RESTORE_FLAGS = ("allow_setuid", "allow_devices", "cross_namespace")


def load(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration file, then apply environment overrides.

    ``env`` defaults to ``os.environ``; tests pass their own mapping.
    Raises InvalidArgument naming the file (or variable) and the key at fault.
    """
    env = os.environ if env is None else env
    explicit = env.get(PATH_ENV) or None
    path = explicit or DEFAULT_PATH
    config = Config()
    try:
        with open(path, "rb") as f:
            import tomllib  # only where a config file exists

            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit is not None:
            raise InvalidArgument(
                f"config file {path} (named by {PATH_ENV}) does not exist"
            ) from None
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise InvalidArgument(f"config file {path}: not valid TOML: {e}") from e
    except OSError as e:
        raise InvalidArgument(f"config file {path}: cannot read: {e.strerror or e}") from e
    else:
        config = _from_toml(data, path)
    return _apply_env(config, env)


def _from_toml(data: dict[str, Any], path: str) -> Config:
    _only(data, {"storage", "encryption", "restore", "limits", "signing"}, path, "")
    storage = _table(data, "storage", path, "")
    _only(storage, {"url", "s3", "restore_sources"}, path, "storage.")
    s3 = _table(storage, "s3", path, "storage.")
    _only(s3, set(_S3_KEYS), path, "storage.s3.")

    url = DEFAULT_STORAGE_URL
    if "url" in storage:
        where = f"config file {path}: storage.url"
        url = check_storage_url(_string(storage["url"], where), where)
    s3_fields: dict[str, str] = {}
    for key, (attr, _) in _S3_KEYS.items():
        if key in s3:
            where = f"config file {path}: storage.s3.{key}"
            s3_fields[attr] = _s3_value(attr, _string(s3[key], where), where)
    sources: tuple[str, ...] = ()
    if "restore_sources" in storage:
        where = f"config file {path}: storage.restore_sources"
        value = storage["restore_sources"]
        if not isinstance(value, list):
            raise InvalidArgument(f"{where} must be a list, not {type(value).__name__}")
        sources = tuple(
            check_storage_url(_string(v, f"{where}[{i}]"), f"{where}[{i}]")
            for i, v in enumerate(value)
        )
    encryption = _table(data, "encryption", path, "")
    _only(encryption, {"key_file"}, path, "encryption.")
    key_file = None
    if "key_file" in encryption:
        where = f"config file {path}: encryption.key_file"
        key_file = _key_file(_string(encryption["key_file"], where), where)
    restore = _table(data, "restore", path, "")
    _only(restore, {*_RESTORE_FLAGS, "timeout_seconds"}, path, "restore.")
    policy: dict[str, Any] = {}
    for key in _RESTORE_FLAGS:
        if key in restore:
            if not isinstance(restore[key], bool):
                raise InvalidArgument(
                    f"config file {path}: restore.{key} must be true or false, "
                    f"not {type(restore[key]).__name__}"
                )
            policy[key] = restore[key]
    if "timeout_seconds" in restore:
        where = f"config file {path}: restore.timeout_seconds"
        policy["timeout_seconds"] = _timeout(restore["timeout_seconds"], where)
    limits = _table(data, "limits", path, "")
    _only(limits, set(_LIMIT_KEYS), path, "limits.")
    sizes: dict[str, int] = {}
    for key in _LIMIT_KEYS:
        if key in limits:
            value = limits[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(
                    f"config file {path}: limits.{key} must be a number of bytes (>= 0), "
                    f"not {value!r}"
                )
            sizes[key] = value
    return Config(
        StorageConfig(url=url, s3=S3Config(**cast(Any, s3_fields)), restore_sources=sources),
        EncryptionConfig(key_file=key_file),
        RestorePolicy(**policy),
        Limits(**sizes),
        _signing_from_toml(data, path),
    )


def _signing_from_toml(data: dict[str, Any], path: str) -> SigningConfig:
    signing = _table(data, "signing", path, "")
    _only(signing, {"key_file", "trusted_keys"}, path, "signing.")
    key_file = None
    if "key_file" in signing:
        where = f"config file {path}: signing.key_file"
        key_file = _key_file(_string(signing["key_file"], where), where)
    trusted: tuple[str, ...] = ()
    if "trusted_keys" in signing:
        where = f"config file {path}: signing.trusted_keys"
        value = signing["trusted_keys"]
        if not isinstance(value, list):
            raise InvalidArgument(f"{where} must be a list, not {type(value).__name__}")
        trusted = tuple(
            _absolute(_string(v, f"{where}[{i}]"), f"{where}[{i}]") for i, v in enumerate(value)
        )
    return SigningConfig(key_file, trusted)


_LIMIT_KEYS = ("max_import_bytes", "max_diff_bytes", "reserve_bytes")


def _apply_env(config: Config, env: Mapping[str, str]) -> Config:
    url = config.storage.url
    if value := env.get(_STORAGE_URL_ENV):
        url = check_storage_url(value, f"environment variable {_STORAGE_URL_ENV}")
    s3 = config.storage.s3
    for attr, var in _S3_KEYS.values():
        if value := env.get(var):
            fields: dict[str, Any] = {attr: _s3_value(attr, value, f"environment variable {var}")}
            s3 = replace(s3, **fields)
    sources = config.storage.restore_sources
    if value := env.get(_RESTORE_SOURCES_ENV):
        where = f"environment variable {_RESTORE_SOURCES_ENV}"
        sources = tuple(check_storage_url(v.strip(), where) for v in value.split(",") if v.strip())
    encryption = config.encryption
    if value := env.get(_KEY_FILE_ENV):
        encryption = EncryptionConfig(_key_file(value, f"environment variable {_KEY_FILE_ENV}"))
    signing = config.signing
    if value := env.get(_SIGNING_KEY_ENV):
        where = f"environment variable {_SIGNING_KEY_ENV}"
        signing = replace(signing, key_file=_absolute(value, where))
    if value := env.get(_TRUSTED_KEYS_ENV):
        where = f"environment variable {_TRUSTED_KEYS_ENV}"
        trusted = tuple(_absolute(v.strip(), where) for v in value.split(",") if v.strip())
        signing = replace(signing, trusted_keys=trusted)
    restore = config.restore
    if value := env.get(_RESTORE_TIMEOUT_ENV):
        where = f"environment variable {_RESTORE_TIMEOUT_ENV}"
        try:
            seconds: object = float(value)
        except ValueError:
            raise InvalidArgument(f"{where}: {value!r} is not a number of seconds") from None
        restore = replace(restore, timeout_seconds=_timeout(seconds, where))
    return replace(
        config,
        storage=StorageConfig(url=url, s3=s3, restore_sources=sources),
        encryption=encryption,
        restore=restore,
        signing=signing,
    )


def _timeout(value: object, where: str) -> float:
    """A restore timeout: seconds, more than 0 and at most MAX_RESTORE_TIMEOUT_S."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{where} must be a number of seconds, not {type(value).__name__}")
    if not 0 < value <= MAX_RESTORE_TIMEOUT_S:  # NaN fails this too
        raise InvalidArgument(
            f"{where}: {value!r} must be more than 0 and at most {MAX_RESTORE_TIMEOUT_S:g} seconds"
        )
    return float(value)


def _absolute(path: str, where: str) -> str:
    """An absolute path (a key file, a trusted key); InvalidArgument else."""
    if not path.startswith("/"):
        raise InvalidArgument(f"{where}: {path!r} must be an absolute path")
    return path


def _key_file(path: str, where: str) -> str | None:
    """An absolute key file path; "" means none."""
    if not path:
        return None
    if not path.startswith("/"):
        raise InvalidArgument(f"{where}: {path!r} must be an absolute path")
    return path


def check_storage_url(url: str, where: str) -> str:
    """Validate a storage URL; an absolute path becomes a ``file://`` URL.

    ``where`` says where the value came from, for the error message.
    """
    if url.startswith("/"):
        return "file://" + url
    if url.startswith("file://"):
        if not url[len("file://") :].startswith("/"):
            raise InvalidArgument(f"{where}: {url!r} must be file:///absolute/path")
        return url
    if url.startswith("s3://"):
        if not url[len("s3://") :].split("/", 1)[0]:
            raise InvalidArgument(f"{where}: {url!r} names no bucket (s3://bucket/prefix)")
        return url
    raise InvalidArgument(
        f"{where}: {url!r} is not a storage URL (file:///absolute/path or s3://bucket/prefix)"
    )


def _s3_value(attr: str, value: str, where: str) -> str:
    if attr == "checksum":
        value = value.strip().lower()
        if value not in CHECKSUMS:
            raise InvalidArgument(f"{where}: {value!r} must be one of {', '.join(CHECKSUMS)}")
    elif attr == "endpoint" and not value.startswith(("http://", "https://")):
        raise InvalidArgument(f"{where}: {value!r} must be an http:// or https:// URL")
    return value


def _only(table: dict[str, Any], allowed: set[str], path: str, prefix: str) -> None:
    for key in table:
        if key not in allowed:
            known = ", ".join(prefix + k for k in sorted(allowed))
            raise InvalidArgument(
                f"config file {path}: unknown key {prefix}{key} (known here: {known})"
            )


def _table(parent: dict[str, Any], key: str, path: str, prefix: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"config file {path}: {prefix}{key} must be a table, not {type(value).__name__}"
        )
    return cast(dict[str, Any], value)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string, not {type(value).__name__}")
    return value
