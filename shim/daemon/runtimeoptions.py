"""The runtime options a Create carries, read into the RuncOptions Stasis honours.

containerd sends runc's Options (containerd.runc.v1.Options) only to runtime type
io.containerd.runc.v2. A CRI handler of any other type, Stasis's
io.containerd.stasis.v2 among them, gets runtimeoptions.v1.Options instead: the
handler's ``options`` table as TOML in config_body, or, when that table sets
ConfigPath, only that path (the runtime reads the file itself; containerd 1.6
sends nothing else). Both are read here with the key names of runc's Options as
containerd writes them for runc (SystemdCgroup, BinaryName, Root, NoPivotRoot,
NoNewKeyring), matched regardless of case as containerd matches them for runc.

Guarantees: the other keys of runc's Options and runtimeoptions' own are accepted
and have no effect (logged); any other key, a value of the wrong type, a relative
Root, TOML that does not parse, more than MAX_TOML bytes, or a ConfigPath that is
not an absolute path to a readable regular file is an InvalidArgument naming it.
The file is opened only after it is found to be a regular file, and read bounded.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from typing import Any

from protos.containerd.runc.v1 import options_pb2
from protos.containerd.runtimeoptions.v1 import options_pb2 as runtimeoptions_pb2
from runtime.errors import InvalidArgument
from shim.task.container import RuncOptions

log = logging.getLogger("stasis.runtimeoptions")

RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
MAX_TOML = 64 << 10  # an options table is a few lines

# lower-cased key -> (its name in runc's Options, RuncOptions field, type)
_HONOURED: dict[str, tuple[str, str, type]] = {
    "systemdcgroup": ("SystemdCgroup", "systemd_cgroup", bool),
    "binaryname": ("BinaryName", "binary_name", str),
    "root": ("Root", "root", str),
    "nopivotroot": ("NoPivotRoot", "no_pivot_root", bool),
    "nonewkeyring": ("NoNewKeyring", "no_new_keyring", bool),
}
# The rest of runc's Options (CriuPath: 1.x only), then runtimeoptions' own fields.
_IGNORED = frozenset(
    {
        "shimcgroup",
        "iouid",
        "iogid",
        "criupath",
        "criuimagepath",
        "criuworkpath",
        "taskapiaddress",
        "taskapiversion",
        "typeurl",
        "configpath",
        "configbody",
    }
)


def decode(type_url: str, value: bytes) -> RuncOptions:
    """The RuncOptions in a Create's options (an Any's type URL and bytes).

    Other types, and no options, give the defaults.
    """
    if type_url.endswith(RUNC_OPTIONS):
        o = options_pb2.Options()
        o.ParseFromString(value)
        return RuncOptions(
            root=o.root,
            binary_name=o.binary_name,
            systemd_cgroup=o.systemd_cgroup,
            no_pivot_root=o.no_pivot_root,
            no_new_keyring=o.no_new_keyring,
        )
    if type_url.endswith(RUNTIME_OPTIONS):
        r = runtimeoptions_pb2.Options()
        r.ParseFromString(value)
        if r.config_path:
            return from_toml(_read_config(r.config_path), f"ConfigPath {r.config_path}")
        return from_toml(r.config_body, "the handler's options table")
    return RuncOptions()


def from_toml(data: bytes, source: str) -> RuncOptions:
    """RuncOptions from a TOML table with runc's Options' key names; ``source``
    names where it came from in errors."""
    if len(data) > MAX_TOML:
        raise InvalidArgument(f"runtime options ({source}): over {MAX_TOML} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"runtime options ({source}): not TOML: {e}") from e
    fields: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, val in table.items():
        folded = key.lower()
        if folded in seen:
            raise InvalidArgument(
                f"runtime options ({source}): {key!r} and {seen[folded]!r} are the same key"
            )
        seen[folded] = key
        if folded in _IGNORED:
            log.info("runtime options (%s): %s has no effect on Stasis", source, key)
            continue
        if folded not in _HONOURED:
            known = ", ".join(name for name, _, _ in _HONOURED.values())
            raise InvalidArgument(
                f"runtime options ({source}): unknown key {key!r} (Stasis reads {known})"
            )
        name, field, kind = _HONOURED[folded]
        if type(val) is not kind:
            want = "a boolean" if kind is bool else "a string"
            raise InvalidArgument(f"runtime options ({source}): {name} must be {want}, not {val!r}")
        fields[field] = val
    root = fields.get("root", "")
    if root and not os.path.isabs(root):
        raise InvalidArgument(f"runtime options ({source}): Root {root!r} is not absolute")
    return RuncOptions(**fields)


def _read_config(path: str) -> bytes:
    """The bytes of the file ConfigPath names, at most MAX_TOML + 1 of them."""
    what = f"runtime options: ConfigPath {path!r}"
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} is not an absolute path")
    # stat first: opening a FIFO or a device could block or act on it.
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidArgument(f"{what}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{what} is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidArgument(f"{what}: {e.strerror}") from e
    with open(fd, "rb", closefd=True) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the stat
            raise InvalidArgument(f"{what} is not a regular file")
        return fh.read(MAX_TOML + 1)
