"""Our protos/ must match containerd's and ttrpc's protobuf definitions on the wire.

The reference .proto files come from Debian packages that
tests/bed/proto_sources.sh unpacks under
$STASIS_CACHE/proto-sources/ (default /var/cache/stasis-testbed). They are
compiled here, at test time, with grpc_tools' protoc into FileDescriptorSets;
ours are read from the generated *_pb2 modules (which `genprotos.py --check`
ties to the .proto files). Four suites are checked:

* bookworm: containerd 1.6.20 (gogo-annotated) with cgroups 1.0.4;
* sid: containerd 2.1.9's api module with cgroups 3.x, where
  containerd.types.Envelope stands for our (1.x layout)
  containerd.services.events.ttrpc.v1.Envelope;
* bookworm-runtimeoptions: containerd 1.6.20's runtimeoptions.v1 (a suite of
  its own: it imports gogo.proto under another name than the bookworm files);
* ttrpc: trixie's ttrpc 1.2.4 request.proto. Debian ships only a stub
  proto/status.proto there (package-less `Status` with just `code`), which
  stands for our ttrpc.Status; upstream ttrpc uses google.rpc.Status, whose
  other fields (message = 2, details = 3) ours has and the stub lacks.

For every message, enum and service we define in a suite's packages, the
counterpart's fields are compared by number: name, type, type_name (the
resolved full name, after the suite's renames), label, oneof, packed, and
map_entry on messages; enum values by name and number; service methods by
name, input/output type and streaming. Every differing item is reported.
Anything of ours without a counterpart, or any field the counterpart lacks,
must be in the suite's allow-lists (which are themselves checked for stale
entries), and everything the reference files declare must be defined by us.

Without the reference sources the tests fail (run bash
tests/bed/proto_sources.sh) unless STASIS_SKIP_INTEGRATION=1, which skips them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = pathlib.Path(os.environ.get("STASIS_CACHE", "/var/cache/stasis-testbed")) / "proto-sources"
GOCODE = "usr/share/gocode/src"
CONTAINERD = "github.com/containerd/containerd"

FDP = descriptor_pb2.FieldDescriptorProto


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, for functools.cache
class Suite:
    name: str
    # <name> under CACHE -> the version its .package file must show (regex)
    sources: dict[str, str]
    # include directories, relative to CACHE (grpc_tools' own is added)
    includes: tuple[str, ...]
    # reference files, relative to an include directory: everything they
    # declare must be defined by us (their imports are compiled, not required)
    files: tuple[str, ...]
    # our packages this suite checks
    packages: frozenset[str]
    # reference full name -> our full name, for types that moved
    renames: dict[str, str] = dataclasses.field(default_factory=dict)
    # our messages/enums with no counterpart in this reference -> why
    no_counterpart: dict[str, str] = dataclasses.field(default_factory=dict)
    # (our message, our field) absent from the counterpart -> why
    extra_fields: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)


CONTAINERD_PACKAGES = frozenset(
    {
        "containerd.types",
        "containerd.v1.types",
        "containerd.task.v2",
        "containerd.events",
        "containerd.services.events.ttrpc.v1",
        "containerd.services.containers.v1",
        "containerd.runc.v1",
        "io.containerd.cgroups.v1",
        "io.containerd.cgroups.v2",
    }
)

CGROUPS2_PSI = "cgroups 1.x predates pressure stall information (added in cgroups 3)"
CGROUPS2_PEAK = "cgroups 1.x predates memory.peak / memory.swap.peak (added in cgroups 3)"
RUNTIME_INFO = "containerd 2.0 added runtime introspection (shim -info)"

SUITES = (
    Suite(
        name="bookworm",
        sources={
            "containerd-bookworm": r"_1\.6\.",
            "cgroups-bookworm": r"_1\.",
            "gogo-protobuf-bookworm": r"_1\.3\.",
        },
        includes=(
            f"containerd-bookworm/{GOCODE}",
            f"cgroups-bookworm/{GOCODE}",
            f"gogo-protobuf-bookworm/{GOCODE}/github.com/gogo/protobuf",
        ),
        files=(
            f"{CONTAINERD}/runtime/v2/task/shim.proto",
            f"{CONTAINERD}/api/types/mount.proto",
            f"{CONTAINERD}/api/types/task/task.proto",
            f"{CONTAINERD}/api/events/task.proto",
            f"{CONTAINERD}/api/services/ttrpc/events/v1/events.proto",
            f"{CONTAINERD}/api/services/containers/v1/containers.proto",
            f"{CONTAINERD}/runtime/v2/runc/options/oci.proto",
            "github.com/containerd/cgroups/stats/v1/metrics.proto",
            "github.com/containerd/cgroups/v2/stats/metrics.proto",
        ),
        packages=CONTAINERD_PACKAGES,
        no_counterpart={
            "io.containerd.cgroups.v2.PSIData": CGROUPS2_PSI,
            "io.containerd.cgroups.v2.PSIStats": CGROUPS2_PSI,
            "containerd.types.RuntimeRequest": RUNTIME_INFO,
            "containerd.types.RuntimeVersion": RUNTIME_INFO,
            "containerd.types.RuntimeInfo": RUNTIME_INFO,
            "containerd.types.RuntimeInfo.AnnotationsEntry": RUNTIME_INFO,
        },
        extra_fields={
            ("containerd.runc.v1.Options", "task_api_address"): "added in containerd 2.0",
            ("containerd.runc.v1.Options", "task_api_version"): "added in containerd 2.0",
            ("containerd.services.containers.v1.Container", "sandbox"): "added in containerd 2.0",
            ("io.containerd.cgroups.v2.CPUStat", "psi"): CGROUPS2_PSI,
            ("io.containerd.cgroups.v2.MemoryStat", "psi"): CGROUPS2_PSI,
            ("io.containerd.cgroups.v2.IOStat", "psi"): CGROUPS2_PSI,
            ("io.containerd.cgroups.v2.MemoryStat", "max_usage"): CGROUPS2_PEAK,
            ("io.containerd.cgroups.v2.MemoryStat", "swap_max_usage"): CGROUPS2_PEAK,
        },
    ),
    Suite(
        name="sid",
        sources={
            "containerd-api-sid": r"_2\.",
            "cgroups-sid": r"_3\.",
        },
        includes=(f"containerd-api-sid/{GOCODE}", f"cgroups-sid/{GOCODE}"),
        files=(
            f"{CONTAINERD}/api/runtime/task/v2/shim.proto",
            f"{CONTAINERD}/api/types/mount.proto",
            f"{CONTAINERD}/api/types/task/task.proto",
            f"{CONTAINERD}/api/types/event.proto",
            f"{CONTAINERD}/api/events/task.proto",
            f"{CONTAINERD}/api/services/ttrpc/events/v1/events.proto",
            f"{CONTAINERD}/api/services/containers/v1/containers.proto",
            f"{CONTAINERD}/api/types/runc/options/oci.proto",
            f"{CONTAINERD}/api/types/runtimeoptions/v1/api.proto",
            f"{CONTAINERD}/api/types/introspection.proto",
            "github.com/containerd/cgroups/v3/cgroup1/stats/metrics.proto",
            "github.com/containerd/cgroups/v3/cgroup2/stats/metrics.proto",
        ),
        packages=CONTAINERD_PACKAGES | {"runtimeoptions.v1"},
        renames={
            # 2.x moved the envelope to api/types/event.proto, fields unchanged
            "containerd.types.Envelope": "containerd.services.events.ttrpc.v1.Envelope",
        },
        extra_fields={
            ("containerd.runc.v1.Options", "criu_path"): "removed in containerd 2.0 (reserved 8)",
        },
    ),
    Suite(
        # its own suite: 1.6's runtimeoptions imports gogo.proto by its full path,
        # which clashes with the bookworm suite's "gogoproto/gogo.proto"
        name="bookworm-runtimeoptions",
        sources={"containerd-bookworm": r"_1\.6\.", "gogo-protobuf-bookworm": r"_1\.3\."},
        includes=(f"containerd-bookworm/{GOCODE}", f"gogo-protobuf-bookworm/{GOCODE}"),
        files=(f"{CONTAINERD}/pkg/runtimeoptions/v1/api.proto",),
        packages=frozenset({"runtimeoptions.v1"}),
        extra_fields={
            ("runtimeoptions.v1.Options", "config_body"): "added in containerd 1.7",
        },
    ),
    Suite(
        name="ttrpc",
        sources={"ttrpc-trixie": r"_1\.2\."},
        includes=(f"ttrpc-trixie/{GOCODE}/github.com/containerd/ttrpc",),
        files=("request.proto", "proto/status.proto"),
        packages=frozenset({"ttrpc"}),
        renames={"Status": "ttrpc.Status"},
        extra_fields={
            (
                "ttrpc.Status",
                "message",
            ): "Debian's status.proto is a stub; google.rpc.Status has it",
            (
                "ttrpc.Status",
                "details",
            ): "Debian's status.proto is a stub; google.rpc.Status has it",
        },
    ),
)


# ---------------------------------------------------------------- descriptor index


@dataclasses.dataclass
class Index:
    messages: dict[str, descriptor_pb2.DescriptorProto] = dataclasses.field(default_factory=dict)
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = dataclasses.field(default_factory=dict)
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = dataclasses.field(
        default_factory=dict
    )
    file_of: dict[str, str] = dataclasses.field(default_factory=dict)
    package_of: dict[str, str] = dataclasses.field(default_factory=dict)

    def add_file(self, f: descriptor_pb2.FileDescriptorProto) -> None:
        prefix = f"{f.package}." if f.package else ""

        def walk(msgs: Any, enums: Any, scope: str) -> None:
            for e in enums:
                self._put(self.enums, scope + e.name, e, f)
            for m in msgs:
                self._put(self.messages, scope + m.name, m, f)
                walk(m.nested_type, m.enum_type, f"{scope}{m.name}.")

        walk(f.message_type, f.enum_type, prefix)
        for s in f.service:
            self._put(self.services, prefix + s.name, s, f)

    def _put(self, table: dict[str, Any], name: str, value: Any, f: Any) -> None:
        table[name] = value
        self.file_of[name] = f.name
        self.package_of[name] = f.package

    def names_in(self, files: set[str]) -> set[str]:
        return {n for n, f in self.file_of.items() if f in files}


def _pb2_modules() -> Iterator[str]:
    for p in sorted((ROOT / "protos").rglob("*_pb2.py")):
        yield ".".join(p.relative_to(ROOT).with_suffix("").parts)


@functools.cache
def ours() -> Index:
    index = Index()
    for name in _pb2_modules():
        module = importlib.import_module(name)
        index.add_file(
            descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        )
    return index


def _check_sources(suite: Suite) -> None:
    missing = [n for n in suite.sources if not (CACHE / n / ".package").is_file()]
    if missing:
        msg = (
            f"reference proto sources missing under {CACHE}: {', '.join(missing)}; "
            "run bash tests/bed/proto_sources.sh"
        )
        if os.environ.get("STASIS_SKIP_INTEGRATION") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    for name, version in suite.sources.items():
        package = (CACHE / name / ".package").read_text().strip()
        if not re.search(version, package):
            pytest.fail(
                f"{CACHE / name} holds {package}, expected a version matching {version!r}; "
                f"remove it and run bash tests/bed/proto_sources.sh"
            )


@functools.cache
def reference(suite: Suite) -> tuple[Index, frozenset[str]]:
    """The suite's compiled reference: an Index and the names its files declare."""
    _check_sources(suite)
    grpc_tools = importlib.util.find_spec("grpc_tools")
    assert grpc_tools is not None and grpc_tools.origin is not None, "grpcio-tools missing"
    includes = [f"-I{CACHE / d}" for d in suite.includes]
    includes.append(f"-I{pathlib.Path(grpc_tools.origin).parent / '_proto'}")
    with tempfile.TemporaryDirectory() as tmp:
        target = pathlib.Path(tmp) / "reference.pb"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv))",
            *includes,
            "--include_imports",
            f"--descriptor_set_out={target}",
            *suite.files,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"protoc failed on the {suite.name} reference:\n{proc.stderr}")
        fds = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())
    index = Index()
    for f in fds.file:
        index.add_file(f)
    return index, frozenset(index.names_in(set(suite.files)))


# ---------------------------------------------------------------- comparison


def _ours_name(suite: Suite, ref_name: str) -> str:
    return suite.renames.get(ref_name, ref_name)


def _ref_name(suite: Suite, our_name: str) -> str:
    back = {v: k for k, v in suite.renames.items()}
    return back.get(our_name, our_name)


def _type_name(suite: Suite, type_name: str) -> str:
    """A field's resolved type name, in our naming ('' for scalars)."""
    if not type_name:
        return ""
    return "." + _ours_name(suite, type_name.lstrip("."))


def _field_facts(
    suite: Suite | None, msg: descriptor_pb2.DescriptorProto, f: FDP
) -> dict[str, object]:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    type_name = _type_name(suite, f.type_name) if suite else f.type_name
    return {
        "name": f.name,
        "type": FDP.Type.Name(f.type),
        "type_name": type_name,
        "label": FDP.Label.Name(f.label),
        "oneof": oneof,
        "proto3_optional": f.proto3_optional,
        "packed": f.options.packed if f.options.HasField("packed") else None,
    }


def _ours_in(suite: Suite, table: dict[str, Any]) -> list[str]:
    return sorted(n for n in table if ours().package_of[n] in suite.packages)


def compare_messages(suite: Suite) -> tuple[list[str], set[object]]:
    """Differences between our messages and the suite's, and the allowances used."""
    ref, _ = reference(suite)
    problems: list[str] = []
    used: set[object] = set()
    for name in _ours_in(suite, ours().messages):
        mine = ours().messages[name]
        theirs = ref.messages.get(_ref_name(suite, name))
        if theirs is None:
            if name in suite.no_counterpart:
                used.add(name)
            else:
                problems.append(f"message {name}: no counterpart in the reference")
            continue
        where = f"message {name}" + (
            f" (reference {_ref_name(suite, name)})" if _ref_name(suite, name) != name else ""
        )
        if mine.options.map_entry != theirs.options.map_entry:
            problems.append(
                f"{where}: map_entry ours={mine.options.map_entry} "
                f"reference={theirs.options.map_entry}"
            )
        my_fields = {f.number: f for f in mine.field}
        their_fields = {f.number: f for f in theirs.field}
        for number in sorted(my_fields.keys() | their_fields.keys()):
            a, b = my_fields.get(number), their_fields.get(number)
            if a is not None and b is not None:
                fa = _field_facts(None, mine, a)
                fb = _field_facts(suite, theirs, b)
                for key in fa:
                    if fa[key] != fb[key]:
                        problems.append(
                            f"{where}: field {number} ({a.name}): "
                            f"{key} ours={fa[key]!r} reference={fb[key]!r}"
                        )
            elif a is not None:
                clash = [f.number for f in theirs.field if f.name == a.name]
                if clash:
                    problems.append(
                        f"{where}: field {a.name} is {number} in ours, {clash[0]} in the reference"
                    )
                elif (name, a.name) in suite.extra_fields:
                    used.add((name, a.name))
                else:
                    problems.append(f"{where}: field {a.name} = {number} not in the reference")
            else:
                assert b is not None
                problems.append(f"{where}: reference field {b.name} = {number} missing from ours")
    return problems, used


def compare_enums(suite: Suite) -> tuple[list[str], set[object]]:
    ref, _ = reference(suite)
    problems: list[str] = []
    used: set[object] = set()
    for name in _ours_in(suite, ours().enums):
        theirs = ref.enums.get(_ref_name(suite, name))
        if theirs is None:
            if name in suite.no_counterpart:
                used.add(name)
            else:
                problems.append(f"enum {name}: no counterpart in the reference")
            continue
        mine = {v.name: v.number for v in ours().enums[name].value}
        refs = {v.name: v.number for v in theirs.value}
        for value in sorted(mine.keys() | refs.keys()):
            if mine.get(value) != refs.get(value):
                problems.append(
                    f"enum {name}: value {value} ours={mine.get(value)} reference={refs.get(value)}"
                )
    return problems, used


def compare_services(suite: Suite) -> list[str]:
    ref, _ = reference(suite)
    problems: list[str] = []
    for name in _ours_in(suite, ours().services):
        theirs = ref.services.get(_ref_name(suite, name))
        if theirs is None:
            problems.append(f"service {name}: no counterpart in the reference")
            continue
        mine = {m.name: m for m in ours().services[name].method}
        refs = {m.name: m for m in theirs.method}
        for method in sorted(mine.keys() | refs.keys()):
            a, b = mine.get(method), refs.get(method)
            if a is None or b is None:
                side = "ours" if a is None else "the reference"
                problems.append(f"service {name}: method {method} missing from {side}")
                continue
            fa = (a.input_type, a.output_type, a.client_streaming, a.server_streaming)
            fb = (
                _type_name(suite, b.input_type),
                _type_name(suite, b.output_type),
                b.client_streaming,
                b.server_streaming,
            )
            for key, x, y in zip(
                ("input_type", "output_type", "client_streaming", "server_streaming"),
                fa,
                fb,
                strict=True,
            ):
                if x != y:
                    problems.append(
                        f"service {name}: method {method}: {key} ours={x!r} reference={y!r}"
                    )
    return problems


def _report(suite: Suite, what: str, problems: list[str]) -> str:
    return f"{len(problems)} {what} difference(s) against {suite.name}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------- tests

suites = pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])


@suites
def test_messages_match(suite: Suite) -> None:
    problems, used = compare_messages(suite)
    _, enum_used = compare_enums(suite)
    allowed = set(suite.no_counterpart) | set(suite.extra_fields)
    stale = allowed - used - enum_used
    problems += [f"allow-list entry {s!r} is no longer needed" for s in sorted(map(str, stale))]
    assert not problems, _report(suite, "message", problems)


@suites
def test_enums_match(suite: Suite) -> None:
    problems, _ = compare_enums(suite)
    assert not problems, _report(suite, "enum", problems)


@suites
def test_services_match(suite: Suite) -> None:
    problems = compare_services(suite)
    assert not problems, _report(suite, "service", problems)


@suites
def test_reference_fully_defined(suite: Suite) -> None:
    """Everything the reference files declare exists in ours (under its renamed name)."""
    _, declared = reference(suite)
    mine = set(ours().messages) | set(ours().enums) | set(ours().services)
    missing = sorted(
        f"{n} (as {_ours_name(suite, n)})" if _ours_name(suite, n) != n else n
        for n in declared
        if _ours_name(suite, n) not in mine
    )
    assert not missing, _report(suite, "missing-definition", missing)


# Stasis's own API: no outside definition to conform to.
OWN_PACKAGES = frozenset({"stasis.v1"})


def test_every_package_is_checked() -> None:
    checked = set().union(*(s.packages for s in SUITES)) | OWN_PACKAGES
    unchecked = sorted(set(ours().package_of.values()) - checked)
    assert not unchecked, f"packages no conformance suite covers: {unchecked}"


def test_no_gogo_or_fieldpath_options() -> None:
    offenders = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        text = proto.read_text()
        code = re.sub(r"//[^\n]*", "", text)
        if re.search(r"gogoproto|fieldpath|containerd\.plugin", code):
            offenders.append(str(proto.relative_to(ROOT)))
    for name in _pb2_modules():
        module = importlib.import_module(name)
        for dep in module.DESCRIPTOR.dependencies:
            if not dep.name.startswith(("google/protobuf/", "protos/")):
                offenders.append(f"{module.DESCRIPTOR.name} imports {dep.name}")
    assert not offenders, offenders


def test_genprotos_check() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genprotos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
