"""Lists the Debian Go library packages a Go source package builds against.

Usage: debian_go_deps.py DEBIAN_CONTROL PACKAGES_INDEX...

Reads the golang-*-dev names from the source's Build-Depends, follows their Depends
(only golang-*-dev names: the Go sources that go into a GOPATH, as dh-golang builds
against /usr/share/gocode) through the given Packages indexes (the first index that
has a package wins) and prints NAME=VERSION per line, sorted, for `apt-get download`.
Version constraints are not checked: the build that follows is the check. Exits 1,
naming them, when a Build-Depends or Depends name is in none of the indexes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

_CONSTRAINT = re.compile(r"\(.*?\)|\[.*?\]|<.*?>")


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """deb822 stanzas as field -> value (continuation lines joined with spaces)."""
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and last is not None:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if fields:
            yield fields


def _names(relation: str) -> list[list[str]]:
    """A Depends-style field as its alternatives' package names, per clause."""
    clauses = []
    for clause in relation.split(","):
        alts = [_CONSTRAINT.sub("", a).strip().split(":")[0] for a in clause.split("|")]
        clauses.append([a for a in alts if a])
    return [c for c in clauses if c]


def _is_go_lib(name: str) -> bool:
    return name.startswith("golang-") and name.endswith("-dev")


def closure(build_depends: str, indexes: list[str]) -> tuple[dict[str, str], list[str]]:
    """(name -> version of every golang-*-dev package needed, names found nowhere)."""
    versions: dict[str, str] = {}
    depends: dict[str, str] = {}
    provided: dict[str, str] = {}
    for text in indexes:
        for st in _stanzas(text):
            name = st.get("Package", "")
            if not name or name in versions:
                continue
            versions[name] = st.get("Version", "")
            depends[name] = st.get("Depends", "")
            for p in _names(st.get("Provides", "")):
                provided.setdefault(p[0], name)
    wanted: dict[str, str] = {}
    missing: list[str] = []
    todo = [c for c in _names(build_depends) if any(_is_go_lib(a) for a in c)]
    while todo:
        clause = todo.pop()
        libs = [a for a in clause if _is_go_lib(a)]
        found = next(
            (a if a in versions else provided[a] for a in libs if a in versions or a in provided),
            None,
        )
        if found is None:
            missing.append(" | ".join(clause))
            continue
        if found in wanted:
            continue
        wanted[found] = versions[found]
        todo += [c for c in _names(depends[found]) if any(_is_go_lib(a) for a in c)]
    return wanted, missing


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    control = next(_stanzas(Path(argv[1]).read_text()), {})
    if "Build-Depends" not in control:
        print(f"{argv[1]}: no Build-Depends in its first stanza", file=sys.stderr)
        return 1
    indexes = [Path(p).read_text(errors="replace") for p in argv[2:]]
    wanted, missing = closure(control["Build-Depends"], indexes)
    if missing:
        print(f"not in the Packages indexes: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    for name in sorted(wanted):
        print(f"{name}={wanted[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
