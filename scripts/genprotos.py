"""Generate (or, with --check, verify) the Python code for every .proto under protos/.

Generated modules live beside their .proto files and are committed; `--check`
regenerates into a temporary tree and fails if anything differs.

Every directory from protos/ down to each .proto must be a regular Python
package (imports read `protos.containerd.types.mount_pb2`): generation creates
any missing `__init__.py` (empty; existing ones are left alone) and `--check`
fails if one is missing.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(tree: pathlib.Path) -> set[pathlib.Path]:
    return {
        p.relative_to(tree)
        for pattern in ("*_pb2.py", "*_pb2.pyi")
        for p in (tree / "protos").rglob(pattern)
    }


def package_dirs() -> set[pathlib.Path]:
    """protos/ and every directory between it and a .proto, relative to ROOT."""
    dirs: set[pathlib.Path] = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        d = proto.parent.relative_to(ROOT)
        while d != pathlib.Path("."):
            dirs.add(d)
            d = d.parent
    return dirs


def missing_inits() -> list[pathlib.Path]:
    return sorted(
        d / "__init__.py" for d in package_dirs() if not (ROOT / d / "__init__.py").exists()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        generate(out)
        fresh = generated_files(out)
        if ns.check:
            missing = missing_inits()
            if missing:
                print("missing package files:", *map(str, missing), sep="\n  ", file=sys.stderr)
                print("run: python scripts/genprotos.py", file=sys.stderr)
            committed = generated_files(ROOT)
            stale = sorted(
                str(p)
                for p in fresh | committed
                if p not in fresh
                or p not in committed
                or not filecmp.cmp(out / p, ROOT / p, shallow=False)
            )
            if stale:
                print("generated protobuf code is stale:", *stale, sep="\n  ", file=sys.stderr)
                print("run: python scripts/genprotos.py", file=sys.stderr)
                return 1
            return 1 if missing else 0
        for p in generated_files(ROOT) - fresh:
            (ROOT / p).unlink()
        for p in fresh:
            (ROOT / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / p, ROOT / p)
        for init in missing_inits():
            (ROOT / init).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
