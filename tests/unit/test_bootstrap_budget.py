"""The import budget of the shim's per-container path, the one place where start-up
care is allowed (shim/bootstrap/): containerd runs ``start`` and ``delete`` on every
container, so what they import is fixed here, module by module. A new import there
must be added to BUDGET knowingly; everywhere else the code is ordinary Python.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What the entry module, start (with the zygote client) and delete may import, run by
# the launcher's interpreter (-I -S): nothing beyond these.
BUDGET = frozenset(
    {
        # the standard library's cheapest modules, and the C parts they sit on
        "__future__", "_collections_abc", "_json", "_sha256", "_socket", "_stat",
        "encodings.utf_8_sig", "genericpath", "os", "os.path", "posixpath", "stat",
        # ours
        "shim", "shim.main", "shim.bootstrap", "shim.bootstrap.flags",
        "shim.bootstrap.start", "shim.bootstrap.delete", "shim.bootstrap.zygote",
        "runtime", "runtime.names", "runtime.linux", "runtime.linux.leftovers",
    }
)  # fmt: skip

_PROBE = """
import sys
sys.path.insert(0, {repo!r})
before = set(sys.modules)
import shim.main
from shim.bootstrap import delete, start, zygote
start.bundle_facts({bundle!r}, "ctr")
start.socket_path("/run/containerd/containerd.sock", "k8s.io", "sandbox")
print(sorted(set(sys.modules) - before))
"""


def _imported(tmp_path: Path) -> set[str]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"annotations": {"io.kubernetes.cri.sandbox-id": "sb"}}
    (bundle / "config.json").write_text(json.dumps(config))
    code = _PROBE.format(repo=str(REPO), bundle=str(bundle))
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(ast.literal_eval(out))


def test_start_and_delete_stay_within_the_budget(tmp_path: Path) -> None:
    extra = sorted(_imported(tmp_path) - BUDGET)
    assert not extra, f"the shim's start/delete path now imports {extra}: see BUDGET"


def test_the_budget_has_nothing_unused(tmp_path: Path) -> None:
    """BUDGET names what the path imports today, so that it cannot grow unseen."""
    assert sorted(BUDGET - _imported(tmp_path)) == []
