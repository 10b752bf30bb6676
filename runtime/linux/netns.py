"""Network namespace repairs after a restore.

When runc itself created a container's network namespace (no netns path in
the spec), CRIU restores the namespace with ``lo`` down and without its
addresses, so 127.0.0.1 is unreachable although the processes came back.

Bringing ``lo`` up makes the kernel give it 127.0.0.1/8 and ::1 again, as in a
fresh namespace. That is done in-process (a socket opened in the container's
namespace by a thread of its own, then ``SIOCSIFFLAGS``), on the critical path of
every restore; the ``ip`` commands remain for when it cannot be (no 127.0.0.1
afterwards, setns refused).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import threading

from runtime.linux.proc import Spawner

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


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8914, 0x8915
_IFF_UP = 0x1
_LOOPBACK = socket.inet_aton("127.0.0.1")


def _socket_in(pid: int) -> socket.socket:
    """An AF_INET socket of the network namespace of ``pid``. A socket belongs to the
    namespace it was created in; setns(2) switches the calling thread alone, so a
    thread of its own switches, creates it and switches back (and ends, should the
    way back fail, never to be reused in the wrong namespace)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    got: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(target, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into the network namespace of {pid}")
                finally:
                    os.close(target)
                try:
                    got.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                finally:
                    libc.setns(own, _CLONE_NEWNET)
            finally:
                os.close(own)
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=run, name=f"netns {pid}")
    t.start()
    t.join()
    if not got:
        raise OSError(errno.EIO, f"no socket in the network namespace of {pid}")
    result = got[0]
    if isinstance(result, BaseException):
        raise result
    return result


def loopback_up(pid: int) -> bool:
    """Bring ``lo`` up in the network namespace of ``pid`` without a process; True
    when it then has 127.0.0.1 (the kernel adds it, and ::1, as ``lo`` comes up)."""
    import fcntl

    with _socket_in(pid) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16xH", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[0]
        if not flags & _IFF_UP:
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
        try:
            addr = fcntl.ioctl(s, _SIOCGIFADDR, struct.pack("16s24x", b"lo"))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
        # struct ifreq: the name, then a sockaddr_in (family, port, address).
        return addr[20:24] == _LOOPBACK


async def ensure_loopback(spawner: Spawner, pid: int) -> None:
    """Bring ``lo`` up with 127.0.0.1/8 and ::1 in the network namespace of ``pid``."""
    try:
        if loopback_up(pid):
            return
    except OSError as e:
        log.debug("loopback of pid %d: %s; using ip", pid, e)
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
