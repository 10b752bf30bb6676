"""Adds (and removes) Stasis's CRI runtime handler to a containerd config, undoably.

Used by install.sh and the installer image; standard library only (Python >= 3.11).

    containerd_config.py configure   --config PATH --dropin PATH --state DIR [--version N]
    containerd_config.py unconfigure --config PATH --dropin PATH --state DIR

`configure` writes the drop-in (the `stasis` handler: runtime_type io.containerd.stasis.v2,
pod and container annotations `stasis.dev/*`) and adds its path to the config's top-level
`imports`, after a byte-for-byte backup of the config in DIR (or a note that there was
none, in which case the config written holds only `version` and `imports`). A file whose
content would not change is not rewritten. It prints one word: `changed` (containerd must
be restarted to see it), `unchanged`, or `present` (the config already has a `stasis`
handler of its own: nothing is touched). `unconfigure` puts the backup back when the
config is still what `configure` wrote (else it only takes the import out again), removes
the drop-in and prints `changed` or `unchanged`.

containerd 1.7 (config version 2) merges an imported file's plugin sections only one level
deep: a drop-in's `[plugins."io.containerd.grpc.v1.cri".containerd]` table replaces the
main config's whole table (its runtimes included). So for version 2 the drop-in carries a
copy of that table from the main config (and the default `runc` runtime when the config
names none), plus the `stasis` runtime; rerun `configure` after editing that table.
containerd 2.x (version 3) merges deeply: the drop-in holds the `stasis` runtime only.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

HANDLER = "stasis"
RUNTIME_TYPE = "io.containerd.stasis.v2"
ANNOTATIONS = ["stasis.dev/*"]
# The CRI runtime table's parent, by config version.
CRI_CONTAINERD = {
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    3: ("plugins", "io.containerd.cri.v1.runtime", "containerd"),
}
BACKUP = "containerd-config.orig"  # byte-for-byte copy of the config before configure
ABSENT = "containerd-config.absent"  # there was no config file before configure
WRITTEN = "containerd-config.written"  # sha256 of the config as configure left it
HEADER = "# Stasis: the `stasis` CRI runtime handler (written by install.sh; removed by\n"
HEADER += "# install.sh --uninstall). Imported from containerd's config.\n"


def _dig(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _imports(doc: dict[str, Any], config: Path) -> list[str]:
    found = []
    for entry in doc.get("imports", []):
        pattern = entry if os.path.isabs(entry) else str(config.parent / entry)
        found += sorted(glob.glob(pattern)) or [pattern]
    return found


def effective(config: Path, skip: Path) -> dict[str, Any]:
    """The config with its imports (except `skip`) deep-merged, as far as we need it."""
    doc = tomllib.loads(config.read_text()) if config.exists() else {}
    merged = copy.deepcopy(doc)
    for path in _imports(doc, config):
        if Path(path) != skip and os.path.isfile(path):
            _merge(merged, tomllib.loads(Path(path).read_text()))
    return merged


def containerd_version(doc: dict[str, Any]) -> int:
    """The config version: the file's, else that of the installed containerd."""
    if "version" in doc:
        return int(doc["version"])
    try:
        out = subprocess.run(
            ["containerd", "--version"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return 2
    match = re.search(r"\s v?(\d+)\.", out) or re.search(r" (\d+)\.\d+\.\d+", out)
    return 3 if match and int(match.group(1)) >= 2 else 2


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} into a containerd drop-in")


def dump_toml(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """TOML for nested tables of scalars and arrays (what a CRI runtime table holds)."""
    scalars = [(k, v) for k, v in tree.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    out = ""
    if prefix and (scalars or not tables):
        out += "\n[" + ".".join(_key(k) for k in prefix) + "]\n"
    for key, value in scalars:
        out += f"{'  ' * bool(prefix)}{_key(key)} = {_value(value)}\n"
    for key, value in tables:
        out += dump_toml(value, (*prefix, key))
    return out


def dropin_text(version: int, main: dict[str, Any]) -> str:
    """The drop-in for a config of `version` whose effective content is `main`."""
    if version not in CRI_CONTAINERD:
        raise SystemExit(
            f"containerd config version {version} is not supported (2: containerd 1.7, "
            "3: containerd 2.x); `containerd config migrate` converts older ones"
        )
    keys = CRI_CONTAINERD[version]
    table: dict[str, Any] = {}
    if version == 2:
        table = copy.deepcopy(_dig(main, keys) or {})
        runtimes = table.setdefault("runtimes", {})
        if not runtimes:  # the default runc runtime, which our table would otherwise hide
            runtimes["runc"] = {"runtime_type": "io.containerd.runc.v2"}
    table.setdefault("runtimes", {})[HANDLER] = {
        "runtime_type": RUNTIME_TYPE,
        "pod_annotations": ANNOTATIONS,
        "container_annotations": ANNOTATIONS,
    }
    tree: dict[str, Any] = {}
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = table
    return HEADER + f"version = {version}\n" + dump_toml(tree)


_IMPORTS = re.compile(r"^imports\s*=\s*\[([^\]]*)\][^\n]*\n?", re.MULTILINE)


def with_import(text: str, dropin: str) -> str:
    """text with dropin appended to its top-level imports (added when missing)."""
    header = re.search(r"^\s*\[", text, re.MULTILINE)
    top = text[: header.start()] if header else text
    match = _IMPORTS.search(top)
    if match is None:
        return f"imports = [{json.dumps(dropin)}]\n" + text
    entries = tomllib.loads(match.group(0))["imports"]
    if dropin in entries:
        return text
    line = "imports = [" + ", ".join(json.dumps(e) for e in [*entries, dropin]) + "]\n"
    return text[: match.start()] + line + text[match.end() :]


def without_import(text: str, dropin: str) -> str:
    """text with dropin taken out of its top-level imports again."""
    header = re.search(r"^\s*\[", text, re.MULTILINE)
    top = text[: header.start()] if header else text
    match = _IMPORTS.search(top)
    if match is None:
        return text
    entries = [e for e in tomllib.loads(match.group(0))["imports"] if e != dropin]
    line = ("imports = [" + ", ".join(json.dumps(e) for e in entries) + "]\n") if entries else ""
    return text[: match.start()] + line + text[match.end() :]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_if_changed(path: Path, data: bytes, like: Path | None = None) -> bool:
    """Atomically writes data to path unless it already holds exactly that; keeps the
    mode and owner of `like` (or of path) when there is one."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.stasis-tmp")
    tmp.write_bytes(data)
    ref = like if like is not None and like.exists() else path if path.exists() else None
    if ref is not None:
        shutil.copymode(ref, tmp)
        st = ref.stat()
        os.chown(tmp, st.st_uid, st.st_gid)
    else:
        tmp.chmod(0o644)
    os.replace(tmp, path)
    return True


def configure(config: Path, dropin: Path, state: Path, version: int | None) -> str:
    """See the module docstring; returns changed, unchanged or present."""
    state.mkdir(parents=True, exist_ok=True)
    main = effective(config, skip=dropin)
    runtimes = _dig(main, CRI_CONTAINERD.get(version or containerd_version(main), ("",)))
    own_doc = tomllib.loads(config.read_text()) if config.exists() else {}
    ours = str(dropin) in own_doc.get("imports", [])
    if not ours and isinstance(runtimes, dict) and HANDLER in (runtimes.get("runtimes") or {}):
        return "present"
    version = version or containerd_version(main)
    changed = write_if_changed(dropin, dropin_text(version, main).encode())
    if config.exists():
        original = config.read_bytes()
        if not ours:  # the config as it is now is the one to put back at uninstall
            write_if_changed(state / BACKUP, original, like=config)
            (state / ABSENT).unlink(missing_ok=True)
        text = with_import(original.decode(), str(dropin))
    else:
        (state / ABSENT).write_text(f"{config}\n")
        text = f"version = {version}\nimports = [{json.dumps(str(dropin))}]\n"
    changed |= write_if_changed(config, text.encode())
    write_if_changed(state / WRITTEN, (_sha(config.read_bytes()) + "\n").encode())
    return "changed" if changed else "unchanged"


def unconfigure(config: Path, dropin: Path, state: Path) -> str:
    """See the module docstring; returns changed or unchanged."""
    changed = False
    written = (state / WRITTEN).read_text().strip() if (state / WRITTEN).exists() else None
    restored = False
    if config.exists():
        current = config.read_bytes()
        if (state / ABSENT).exists() and _sha(current) == written:
            config.unlink()
            changed = restored = True
        elif (state / BACKUP).exists() and _sha(current) == written:
            changed = write_if_changed(config, (state / BACKUP).read_bytes())
            restored = True
        else:
            if written is not None:
                print(
                    f"{config} changed since install: only the Stasis import is taken out "
                    f"(the original stays in {state / BACKUP})",
                    file=sys.stderr,
                )
            text = without_import(current.decode(), str(dropin))
            changed = write_if_changed(config, text.encode())
    if dropin.exists():
        dropin.unlink()
        changed = True
        if dropin.parent.is_dir() and not any(dropin.parent.iterdir()):
            dropin.parent.rmdir()
    for name in (ABSENT, WRITTEN, *((BACKUP,) if restored else ())):
        (state / name).unlink(missing_ok=True)
    return "changed" if changed else "unchanged"


def main(argv: list[str] | None = None) -> int:
    """CLI: configure | unconfigure (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["configure", "unconfigure", "dropin"])
    parser.add_argument("--config", type=Path, default=Path("/etc/containerd/config.toml"))
    parser.add_argument("--dropin", type=Path, default=Path("/etc/containerd/conf.d/stasis.toml"))
    parser.add_argument("--state", type=Path, default=Path("/opt/stasis/install"))
    parser.add_argument("--version", type=int, default=None)
    args = parser.parse_args(argv)
    if args.action == "configure":
        print(configure(args.config, args.dropin, args.state, args.version))
    elif args.action == "unconfigure":
        print(unconfigure(args.config, args.dropin, args.state))
    else:  # the drop-in for a config without a CRI section of its own (packaging/containerd/)
        sys.stdout.write(dropin_text(args.version or 2, {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
