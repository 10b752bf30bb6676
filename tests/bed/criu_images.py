"""Edits CRIU image files as an attacker with a text editor would: decoded with
CRIU's own .proto files (compiled at test time from the test bed's CRIU source),
changed, and written back in CRIU's framing (two magic words, then entries, each
a little-endian u32 size and a protobuf message)."""

from __future__ import annotations

import importlib
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from bed.containerd import cache_dir

_MODULES: dict[str, ModuleType] = {}


def _criu_protos() -> Path:
    found = sorted(cache_dir().glob("criu-*/images/core.proto"))
    if not found:
        raise RuntimeError("no CRIU source with images/*.proto in the test bed cache")
    return found[-1].parent


def module(name: str, out: Path) -> ModuleType:
    """CRIU's ``<name>_pb2`` module, compiled into ``out`` on first use."""
    if name not in _MODULES:
        import grpc_tools

        src = _criu_protos()
        include = Path(grpc_tools.__file__).parent / "_proto"
        out.mkdir(parents=True, exist_ok=True)
        protos = sorted(p.name for p in src.glob("*.proto"))
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{include}",
             f"--python_out={out}", *protos],
            check=True, cwd=src,
        )  # fmt: skip
        sys.path.insert(0, str(out))
        try:
            _MODULES[name] = importlib.import_module(f"{name}_pb2")
        finally:
            sys.path.remove(str(out))
    return _MODULES[name]


def edit_core(img: Path, out: Path, change: Any) -> None:
    """Decode the core entry of ``img`` (a core-PID.img), let ``change(entry)``
    edit it in place, and write it back."""
    core = module("core", out)
    data = img.read_bytes()
    (size,) = struct.unpack_from("<I", data, 8)
    entry = core.core_entry()
    entry.ParseFromString(data[12 : 12 + size])
    change(entry)
    body = entry.SerializeToString()
    img.write_bytes(data[:8] + struct.pack("<I", len(body)) + body + data[12 + size :])
