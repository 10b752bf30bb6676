"""Network namespace repairs after a restore.

When runc itself created a container's network namespace (no netns path in
the spec), CRIU restores the namespace with ``lo`` down and without its
addresses, so 127.0.0.1 is unreachable although the processes came back.
"""

from __future__ import annotations

import json
import logging
import os

from runtime.proc import Spawner

log = logging.getLogger("stasis.netns")


def owns_netns(bundle: str) -> bool:
    """True when the spec asks runc for a new network namespace (no path given)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return False
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return not ns.get("path")
    return False


async def ensure_loopback(spawner: Spawner, pid: int) -> None:
    """Bring ``lo`` up with 127.0.0.1/8 and ::1 in the network namespace of ``pid``."""
    enter = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip"]
    steps = (
        ["link", "set", "lo", "up"],
        ["addr", "replace", "127.0.0.1/8", "dev", "lo", "scope", "host"],
        ["-6", "addr", "replace", "::1/128", "dev", "lo"],
    )
    for step in steps:
        try:
            done = await spawner.run([*enter, *step])
        except OSError as e:
            log.warning("cannot repair loopback of pid %d: %s", pid, e)
            return
        if done.status != 0 and step[0] != "-6":  # IPv6 may be disabled
            log.warning("loopback repair of pid %d: ip %s exited %d", pid, step, done.status)
