"""Kubernetes' CRI conformance suite (critest, cri-tools v1.34.0) on containerd 2.1 and
2.3, run twice on each containerd with the same images, one run after the other: first
with containerd's runc shim (handler `runc`, the reference), then with Stasis (handler
`stasis`).

The images critest pulls are rebuilt offline (tests/bed/critest_images.py), pushed to
a local registry and reached under their real names through hosts.toml mirrors for
registry.k8s.io and gcr.io. Each run's per-spec results come from ginkgo's JSON report;
a summary (passed/failed/skipped/wall time per handler, the failed specs, the specs
skipped by one handler only) goes to the terminal and to critest-summary.txt in the
test's temporary directory, beside each run's log and report.

Holds for the reference: no failures (else the bed is unsound). Holds for Stasis: no
failures, at least as many passes as runc, the same skipped specs, and at most 1.5x
runc's wall time. On containerd 2.1 only, the specs it withholds from a runtime type
other than runc's may skip (CONTAINERD_GAPS, with the reason); 2.3 allows no difference
at all. Specs that cannot run here
for either runtime are skipped by name (SKIPS, each with its reason). Host ports
12000-12003 must be free (critest's fixed port-mapping and port-forward ports).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bed import critest_images
from bed.containerd import (
    CRI_NAMESPACE,
    STASIS_HANDLER,
    Containerd,
    bed_missing,
    cache_dir,
    images_dir,
)
from bed.registry import Registry, registry_missing
from conftest import shim_path

pytestmark = [pytest.mark.integration, pytest.mark.conformance]

CRI_TOOLS_VERSION = "v1.34.0"
CRI_TOOLS_DIR = cache_dir() / f"cri-tools-{CRI_TOOLS_VERSION}"
CRITEST = CRI_TOOLS_DIR / "critest"
CRICTL = CRI_TOOLS_DIR / "crictl"
IMAGES = images_dir() / "critest"
SETUP_HINT = "run `bash tests/bed/setup.sh` as root"

# containerd 2.1: Debian's, what the rest of the suite uses; 2.3: the first release line
# whose CRI reads every runtime type's features (built by tests/bed/setup.sh).
CONTAINERD_VERSIONS = ("2.1", "2.3")
REFERENCE = "runc"
HANDLERS = (REFERENCE, STASIS_HANDLER)  # run in this order
# critest's fixed host ports: port mapping, port forward, host-network port forward, and
# the host-network nginx image's own port.
HOST_PORTS = (12000, 12001, 12002, 12003)
# One spec order for both runs (critest randomises it), so that they are comparable.
SEED = 20250
# ginkgo's limit for one run; the process gets GRACE more to write its report.
RUN_TIMEOUT = 2400
GRACE = 120
# The limit of one CRI call (critest's default is 300s): kubelet's default
# --runtime-request-timeout. A call that hangs fails its spec after this long.
CRI_CALL_TIMEOUT = 120
CLEANUP_CALL_TIMEOUT = 30  # a pod the runtime cannot stop is left to the teardown
WALL_TIME_FACTOR = 1.5
MIRRORED = ("registry.k8s.io", "gcr.io")


@dataclass(frozen=True)
class Skip:
    """Specs critest must not run here, for either runtime."""

    pattern: str  # a Go regular expression ginkgo matches against the spec's full text
    reason: str


SKIPS = (
    Skip(
        r"\[k8s\.io\] AppArmor ",
        "this kernel has no AppArmor (/sys/module/apparmor is absent)",
    ),
    Skip(
        r"\[k8s\.io\] SELinux ",
        "SELinux is disabled on this kernel (critest only declares these specs when enabled)",
    ),
    Skip(
        r"\[k8s\.io\] Security Context UserNamespaces ",
        "pods with user namespaces need idmapped mounts, which bookworm's runc 1.1.5 lacks "
        "(containerd reports no user-namespace support for either handler)",
    ),
    Skip(
        r"public image with digest should be pulled and removed",
        f"pulls {critest_images.UNREPRODUCIBLE}, pinned by an upstream digest that no "
        "offline rebuild can have",
    ),
    Skip(
        r"benchmark",
        "benchmarks measure, they do not check conformance (critest skips them by default)",
    ),
)

# Specs runc passes that containerd 2.1 itself withholds from a handler of Stasis's
# runtime type: its CRI reads a handler's OCI features (recursive read-only mounts) only
# for runtime_type io.containerd.runc.v2 (introspectRuntimeFeatures; every type since
# containerd 2.2.7, 2.3.4 and 2.4), so these specs skip themselves with the message
# below. The shim answers containerd's -info with runc's features
# (tests/unit/test_shim_info.py), which containerd 2.3 shows by passing them. They are
# the only differences allowed, only on containerd 2.1, and only while they skip with
# that message.
CONTAINERD_GAPS = {
    "2.1": (
        Skip(
            r"recursive readonly mount",
            "containerd 2.1 introspects runtime features only for runtime_type "
            "io.containerd.runc.v2 (fixed in 2.2.7, 2.3.4 and 2.4)",
        ),
    ),
}
GAP_MESSAGE = "runtime does not implement recursive readonly mounts"

FAILED_STATES = frozenset({"failed", "panicked", "interrupted", "aborted", "timedout"})


def containerd_gap(run: CritestRun, name: str) -> Skip | None:
    """The CONTAINERD_GAPS entry that explains stasis skipping ``name``, if any."""
    spec = run.specs.get(name)
    if spec is None or spec.state != "skipped" or GAP_MESSAGE not in spec.message:
        return None
    gaps = CONTAINERD_GAPS.get(run.containerd, ())
    return next((g for g in gaps if re.search(g.pattern, name)), None)


@dataclass(frozen=True)
class Spec:
    """One spec's result from ginkgo's JSON report."""

    name: str  # the container texts and the spec's own text, joined by spaces
    state: str  # passed, skipped, failed, panicked, interrupted, aborted, timedout, pending
    seconds: float
    message: str = ""  # the failure or skip message
    location: str = ""  # file:line of the failure
    node: str = ""  # the node that failed: It, BeforeEach, AfterEach...


@dataclass
class CritestRun:
    """One critest run against one runtime handler."""

    handler: str
    containerd: str  # the containerd version it ran on ("2.1")
    wall: float
    returncode: int | None  # None: killed after RUN_TIMEOUT + GRACE
    log: Path
    report: Path
    specs: dict[str, Spec] = field(default_factory=dict)
    suite_failures: list[Spec] = field(default_factory=list)  # BeforeSuite and the like
    leftovers: list[str] = field(default_factory=list)  # pods/containers critest left
    unremovable: list[str] = field(default_factory=list)  # of those, what could not go

    def named(self, states: frozenset[str]) -> list[str]:
        return sorted(n for n, s in self.specs.items() if s.state in states)

    @property
    def passed(self) -> list[str]:
        return self.named(frozenset({"passed"}))

    @property
    def failed(self) -> list[str]:
        return self.named(FAILED_STATES)

    @property
    def skipped(self) -> list[str]:
        return self.named(frozenset({"skipped", "pending"}))

    @property
    def failures(self) -> list[Spec]:
        return [*self.suite_failures, *(self.specs[n] for n in self.failed)]


def skipped_by_list(name: str) -> Skip | None:
    """The SKIPS entry that names this spec, if any."""
    return next((s for s in SKIPS if re.search(s.pattern, name)), None)


def parse_report(run: CritestRun) -> None:
    """Fills run.specs and run.suite_failures from ginkgo's JSON report."""
    try:
        suites: list[dict[str, Any]] = json.loads(run.report.read_text())
    except (OSError, ValueError) as e:
        raise AssertionError(
            f"critest ({run.handler}) wrote no readable JSON report ({run.report}: {e}); "
            f"log: {run.log}\n{_tail(run.log)}"
        ) from e
    for suite in suites:
        for report in suite.get("SpecReports") or []:
            texts = [*(report.get("ContainerHierarchyTexts") or []), report.get("LeafNodeText", "")]
            failure = report.get("Failure") or {}
            where = failure.get("Location") or {}
            spec = Spec(
                name=" ".join(t for t in texts if t) or report.get("LeafNodeType", "?"),
                state=report.get("State", "?"),
                seconds=report.get("RunTime", 0) / 1e9,
                message=(failure.get("Message") or "").strip(),
                location=f"{where.get('FileName', '')}:{where.get('LineNumber', '')}"
                if where
                else "",
                node=failure.get("FailureNodeType") or "",
            )
            if report.get("LeafNodeType") == "It":
                run.specs[spec.name] = spec
            elif spec.state in FAILED_STATES:
                run.suite_failures.append(spec)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# -- the bed ---------------------------------------------------------------------------


def _tools_missing() -> str | None:
    for binary in (CRITEST, CRICTL):
        if not os.access(binary, os.X_OK):
            return f"{binary} not found: {SETUP_HINT} (it builds cri-tools {CRI_TOOLS_VERSION})"
    if why := critest_images.missing(IMAGES):
        return f"{why}: {SETUP_HINT}"
    return registry_missing()


def _busy_ports() -> list[int]:
    busy = []
    for port in HOST_PORTS:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def _split_ref(ref: str) -> tuple[str, str, str]:
    """registry host, repository, tag of a reference (tag defaults to latest)."""
    host, _, rest = ref.partition("/")
    repository, _, tag = rest.rpartition(":")
    if not repository or "/" in tag:
        repository, tag = rest, "latest"
    return host, repository, tag


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A local registry serving every critest image under its upstream repository and
    tag, mirrored for registry.k8s.io and gcr.io."""
    if why := _tools_missing():
        pytest.fail(why, pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("critest-registry"))
    reg.start()
    try:
        for upstream in MIRRORED:
            reg.mirror(upstream)
        for ref, tar in critest_images.built(IMAGES).items():
            host, repository, tag = _split_ref(ref)
            assert host in MIRRORED, ref
            tags = critest_images.SAME_IMAGE_TAGS.get(ref, [tag])
            reg.push_layout(tar, repository, tags)
        yield reg
    finally:
        reg.stop()


@dataclass
class Bed:
    """The containerd critest runs against, and what the runs left in it."""

    containerd: Containerd
    emptied: bool = True  # every run's leftovers were looked for (and removed if possible)
    unremovable: bool = False  # some pod could not be stopped: its mounts stay to the end


@pytest.fixture(scope="module", params=CONTAINERD_VERSIONS, ids=lambda v: f"ctrd{v}")
def bed(request: pytest.FixtureRequest, registry: Registry) -> Iterator[Bed]:
    """A containerd of its own with CRI (runc and stasis handlers, CNI bridge with
    portmap, stream server on 127.0.0.1), pulling through the registry's mirrors; one
    per version, one version after the other."""
    version: str = request.param
    if why := bed_missing([version]):
        pytest.fail(f"containerd {version}: {why} (it builds containerd 2.3)", pytrace=False)
    c = Containerd.in_run_dir(
        version,
        shim_path(),
        namespace=CRI_NAMESPACE,
        cri=True,
        registry_config_path=registry.hosts_dir,
        cni_port_mappings=True,
        log_level="info",
    )
    made = Bed(c)
    try:
        c.start()
        # The pinned sandbox image: containerd does not pull it.
        c.import_image(critest_images.built(IMAGES)[critest_images.PAUSE])
        yield made
    finally:
        if c.pid is not None and not made.emptied:
            # A run cut short leaves pods: CNI DEL removes their NAT rules.
            with contextlib.suppress(CrictlError):
                _remove_leftovers(c)
        left = c.stop()
    # Pods a runtime could not stop are reported by the tests; their mounts stay here.
    if left and not made.unremovable:
        pytest.fail(f"containerd {version} for critest left behind (now cleaned up): {left}")


class CrictlError(Exception):
    """crictl failed or did not answer in time."""


def crictl(containerd: Containerd, *args: str, timeout: int = CRI_CALL_TIMEOUT) -> str:
    """crictl against containerd, each CRI call limited to timeout seconds."""
    endpoint = f"unix://{containerd.address}"
    cmd = [str(CRICTL), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint]
    try:
        result = subprocess.run(
            [*cmd, "--timeout", f"{timeout}s", *args],
            capture_output=True, text=True, timeout=timeout + 30,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise CrictlError(f"crictl {shlex.join(args)}: no answer in {e.timeout}s") from e
    if result.returncode != 0:
        errors = [ln for ln in result.stderr.splitlines() if "level=warning" not in ln]
        raise CrictlError(f"crictl {shlex.join(args)} failed: {' '.join(errors)}")
    return result.stdout


def _remove_leftovers(containerd: Containerd) -> tuple[list[str], list[str]]:
    """Removes the pods and containers critest left in CRI (best effort: the pods a
    runtime cannot stop stay, for containerd's teardown), so that the next run starts
    empty, and the images critest pulled (the pinned sandbox image stays). Returns what
    was left, and the removals that failed."""
    pods = crictl(containerd, "pods", "-q").split()
    containers = crictl(containerd, "ps", "-a", "-q").split()
    left = [f"pod {p[:13]}" for p in pods] + [f"container {c[:13]}" for c in containers]
    failed = []
    for pod in pods:
        try:
            crictl(containerd, "rmp", "--force", pod, timeout=CLEANUP_CALL_TIMEOUT)
        except CrictlError as e:
            failed.append(f"pod {pod[:13]}: {e}")
    with contextlib.suppress(CrictlError):
        crictl(containerd, "rmi", "--prune", timeout=CLEANUP_CALL_TIMEOUT)
    return left, failed


def _shm_segments() -> dict[int, tuple[int, int, int]]:
    """System V shared memory: shmid -> (size, creator pid, attaches)."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            f = line.split()
            found[int(f[1])] = (int(f[3]), int(f[4]), int(f[6]))
    return found


def _remove_critest_shm(before: dict[int, tuple[int, int, int]]) -> None:
    """critest's HostIpc specs create a 1 MiB segment with `ipcmk -M 1048576` on the
    host and never remove it: remove the new ones (unattached, creator gone)."""
    for shmid, (size, cpid, attaches) in _shm_segments().items():
        if shmid in before or size != 1048576 or attaches:
            continue
        if not Path(f"/proc/{cpid}").exists():
            subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, check=False)


def run_critest(bed: Bed, handler: str, outdir: Path) -> CritestRun:
    """critest against the bed's containerd with the runtime handler; its JSON report
    parsed, what it left in CRI removed."""
    endpoint = f"unix://{bed.containerd.address}"
    run = CritestRun(
        handler,
        containerd=bed.containerd.version,
        wall=0.0,
        returncode=None,
        log=outdir / f"critest-{handler}.log",
        report=outdir / f"critest-{handler}.json",
    )
    cmd = [
        str(CRITEST),
        f"--runtime-endpoint={endpoint}",
        f"--image-endpoint={endpoint}",
        f"--runtime-handler={handler}",
        f"--runtime-service-timeout={CRI_CALL_TIMEOUT}s",
        f"--ginkgo.json-report={run.report}",
        f"--ginkgo.seed={SEED}",
        f"--ginkgo.timeout={RUN_TIMEOUT}s",
        "--ginkgo.no-color",
        *(f"--ginkgo.skip={s.pattern}" for s in SKIPS),
    ]
    start = time.monotonic()
    bed.emptied = False
    with run.log.open("wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=outdir,
            start_new_session=True,
        )  # fmt: skip
        try:
            run.returncode = proc.wait(RUN_TIMEOUT + GRACE)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted (^C): end the run we started
                proc.kill()
                proc.wait()
    run.wall = time.monotonic() - start
    parse_report(run)
    try:
        run.leftovers, run.unremovable = _remove_leftovers(bed.containerd)
    except CrictlError as e:
        run.unremovable = [f"(not listed: {e})"]
    bed.emptied = True
    bed.unremovable = bed.unremovable or bool(run.unremovable)
    return run


# -- the summary --------------------------------------------------------------------


def _first_line(text: str, width: int = 320) -> str:
    """The line of a failure message that says what went wrong (gomega's "Unexpected
    error:" and the error's Go type come first), cut to width."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next(
        (ln for ln in lines if ln != "Unexpected error:" and not ln.startswith("<")),
        lines[0] if lines else "",
    )
    return line if len(line) <= width else line[: width - 3] + "..."


def summary(runs: dict[str, CritestRun], containerd_version: str) -> str:
    """The table and the lists the module docstring describes."""
    ref = runs[REFERENCE]
    out = [
        f"critest {CRI_TOOLS_VERSION} on containerd {containerd_version} "
        f"(seed {SEED}, per-run limit {RUN_TIMEOUT}s)",
        f"{'handler':<10}{'passed':>8}{'failed':>8}{'skipped':>9}{'wall':>10}  exit",
    ]
    for handler, run in runs.items():
        code = "killed" if run.returncode is None else str(run.returncode)
        failed = len(run.failed) + len(run.suite_failures)
        out.append(
            f"{handler:<10}{len(run.passed):>8}{failed:>8}{len(run.skipped):>9}"
            f"{run.wall:>9.1f}s  {code}"
        )
    for handler, run in runs.items():
        if run.failures:
            out.append(f"\nfailed with {handler} ({len(run.failures)}):")
            for spec in run.failures:
                out.append(f"  - {spec.name} [{spec.seconds:.1f}s]")
                out.append(f"      in {spec.node} at {spec.location}: {_first_line(spec.message)}")
        if run.leftovers or run.unremovable:
            pods = sum(1 for x in run.leftovers if x.startswith("pod "))
            out.append(
                f"\nleft behind by critest with {handler}: {pods} pods, "
                f"{len(run.leftovers) - pods} containers ({', '.join(run.leftovers)})"
            )
            if run.unremovable:
                out.append(f"  not removable ({len(run.unremovable)}), first: {run.unremovable[0]}")
    listed = [n for n in ref.skipped if skipped_by_list(n)]
    out.append(f"\nskipped by name for both handlers: {len(listed)} specs")
    for skip in SKIPS:
        count = sum(1 for n in listed if re.search(skip.pattern, n))
        out.append(f"  - {skip.pattern} ({count}): {skip.reason}")
    for handler, run in runs.items():
        others = [r for h, r in runs.items() if h != handler]
        for other in others:
            only = sorted(set(run.skipped) - set(other.skipped))
            if only:
                out.append(f"\nskipped by {handler} but not by {other.handler} ({len(only)}):")
                for name in only:
                    gap = containerd_gap(run, name)
                    why = f"allowed: {gap.reason}" if gap else _first_line(run.specs[name].message)
                    out.append(f"  - {name}: {why}")
    runtime_skips = sorted(n for n in ref.skipped if not skipped_by_list(n))
    if runtime_skips:
        out.append(f"\nskipped at run time by {REFERENCE} ({len(runtime_skips)}):")
        for name in runtime_skips:
            out.append(f"  - {name}: {_first_line(ref.specs[name].message)}")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, bed: Bed, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CritestRun]:
    """critest with each handler in HANDLERS order; the summary printed and saved."""
    busy = _busy_ports()
    if busy:
        pytest.fail(f"host ports {busy} are in use; critest needs {HOST_PORTS} free")
    outdir = tmp_path_factory.mktemp(f"critest-{bed.containerd.version}")
    shm_before = _shm_segments()
    result: dict[str, CritestRun] = {}
    try:
        for handler in HANDLERS:
            result[handler] = run_critest(bed, handler, outdir)
    finally:
        _remove_critest_shm(shm_before)
    version = (bed.containerd.prefix / ".version").read_text().strip()
    text = summary(result, version)
    (outdir / "critest-summary.txt").write_text(
        text + "".join(_details(run) for run in result.values())
    )
    # To the terminal whatever -s says: pytest's capture is suspended as capsys.disabled()
    # does, which a module-scoped fixture cannot request.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_sep("-", "critest summary")
            reporter.write(text)
            reporter.write_line(f"(logs, JSON reports and this summary: {outdir})")
    return result


def _details(run: CritestRun) -> str:
    """Every failure's full message, for the summary file."""
    parts = [f"\n== {run.handler}: full failure messages\n"] if run.failures else []
    for spec in run.failures:
        parts.append(f"\n--- {spec.name}\nin {spec.node} at {spec.location}\n{spec.message}\n")
    return "".join(parts)


def _listing(specs: list[Spec]) -> str:
    return "\n".join(
        f"  {s.name}\n    in {s.node} at {s.location}: {_first_line(s.message)}" for s in specs
    )


# -- the checks ---------------------------------------------------------------------


def test_runc_reference_has_no_failures(runs: dict[str, CritestRun]) -> None:
    """The bed is sound: runc passes every spec that is not skipped."""
    run = runs[REFERENCE]
    assert run.specs, f"no specs in {run.report}"
    assert not run.failures, f"critest failed with runc:\n{_listing(run.failures)}"
    assert run.returncode == 0, f"critest exited {run.returncode} with runc; log: {run.log}"


def test_stasis_has_no_failures(runs: dict[str, CritestRun]) -> None:
    run = runs[STASIS_HANDLER]
    assert not run.failures, f"critest failed with stasis:\n{_listing(run.failures)}"
    assert run.returncode == 0, f"critest exited {run.returncode} with stasis; log: {run.log}"


def test_stasis_passes_at_least_what_runc_passes(runs: dict[str, CritestRun]) -> None:
    ref, run = runs[REFERENCE], runs[STASIS_HANDLER]
    gaps = {n for n in ref.passed if containerd_gap(run, n)}
    missing = sorted(set(ref.passed) - set(run.passed) - gaps)
    assert len(run.passed) >= len(ref.passed) - len(gaps), (
        f"stasis passed {len(run.passed)} specs, runc {len(ref.passed)} "
        f"({len(gaps)} withheld by containerd); passed with runc only: {missing}"
    )


def test_stasis_skips_what_runc_skips(runs: dict[str, CritestRun]) -> None:
    ref, run = runs[REFERENCE], runs[STASIS_HANDLER]
    only_stasis = sorted(
        n for n in set(run.skipped) - set(ref.skipped) if not containerd_gap(run, n)
    )
    only_runc = sorted(set(ref.skipped) - set(run.skipped))
    assert not only_stasis and not only_runc, (
        "skipped by stasis only: "
        + "; ".join(f"{n} ({_first_line(run.specs[n].message)})" for n in only_stasis)
        + f"\nskipped by runc only: {only_runc}"
    )


def test_stasis_wall_time_within_limit(runs: dict[str, CritestRun]) -> None:
    ref, run = runs[REFERENCE], runs[STASIS_HANDLER]
    assert run.wall <= WALL_TIME_FACTOR * ref.wall, (
        f"critest took {run.wall:.1f}s with stasis, {ref.wall:.1f}s with runc "
        f"(limit {WALL_TIME_FACTOR}x)"
    )


@pytest.mark.parametrize("handler", HANDLERS)
def test_critest_leaves_nothing_behind(runs: dict[str, CritestRun], handler: str) -> None:
    """critest removes the pods and containers it made (with this handler's help)."""
    run = runs[handler]
    assert not run.leftovers and not run.unremovable, (
        f"left behind with {handler}: {run.leftovers}; not removable: {run.unremovable}"
    )
