"""Exit codes of processes that are not our children, from the kernel's process
events connector (netlink, NETLINK_CONNECTOR / CN_IDX_PROC).

A process the shim does not parent (an exec handed to the container's init
before a checkpoint, or one restored from a checkpoint) can be watched for its
end with a pidfd, but only its parent can ``wait`` for its status. The
connector reports every exit on the host with its wait status; ``ExitCodes``
keeps those of the PIDs it was asked about. It needs CAP_NET_ADMIN and the
initial network namespace, which the shim has; where it cannot subscribe, the
code of such an exit is unknown (``None``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

from runtime.linux.proc import exit_code

log = logging.getLogger("stasis.procevents")

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXIT = 0x80000000

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXIT = struct.Struct("=IIII")  # pid, tgid, exit_code, exit_signal
NLMSG_DONE = 3
_SO_RCVBUFFORCE = 33  # socket.SO_RCVBUFFORCE (Linux), needs CAP_NET_ADMIN
_RCVBUF = 8 << 20


def _request(op: int) -> bytes:
    body = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
    return _NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def parse_exits(data: bytes) -> list[tuple[int, int]]:
    """(tgid, raw wait status) of each process-exit event in a netlink datagram
    (thread exits other than the thread group leader's are skipped)."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, offset)[0]
        if length < _NLMSG.size or offset + length > len(data):
            break
        at = offset + _NLMSG.size + _CN_MSG.size
        if at + _EVENT_HEAD.size + _EXIT.size <= offset + length:
            what = _EVENT_HEAD.unpack_from(data, at)[0]
            if what == PROC_EVENT_EXIT:
                pid, tgid, status, _ = _EXIT.unpack_from(data, at + _EVENT_HEAD.size)
                if pid == tgid:
                    out.append((tgid, status))
        offset += (length + 3) & ~3
    return out


class ExitCodes:
    """Collects the exit codes of chosen PIDs from the process events connector.

    Not thread-safe: use from one thread (the shim's event loop). Call
    ``drain`` before ``code`` so that queued events are read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop  # drains as events arrive, so the socket never overflows
        self._sock: socket.socket | None = None
        self._wanted: set[int] = set()
        self._codes: dict[int, int] = {}

    def watch(self, pid: int) -> None:
        """Remember the exit code of ``pid`` when it ends (subscribes on first use)."""
        self._wanted.add(pid)
        if self._sock is None:
            self._sock = self._subscribe()
            if self._sock is not None and self._loop is not None:
                self._loop.add_reader(self._sock.fileno(), self.drain)

    def _subscribe(self) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            log.warning("no process events (exit codes of adopted processes unknown): %s", e)
            return None
        try:
            # Every exit on the host arrives here: a roomy buffer keeps a burst of
            # them (a busy node, a test run) from overflowing it (ENOBUFS).
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, CN_IDX_PROC))
            sock.send(_request(PROC_CN_MCAST_LISTEN))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("no process events (exit codes of adopted processes unknown): %s", e)
            return None
        return sock

    def drain(self) -> None:
        """Read every queued event, keeping the codes of watched PIDs."""
        if self._sock is None:
            return
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost; later ones still come
                log.warning("process events: %s", e)
                continue
            for pid, status in parse_exits(data):
                if pid in self._wanted:
                    self._codes[pid] = exit_code(status)

    def code(self, pid: int) -> int | None:
        """The exit code of a watched ``pid`` that ended (None when not seen);
        stops watching it."""
        self.drain()
        self._wanted.discard(pid)
        found = self._codes.pop(pid, None)
        if not self._wanted:
            self.close()
        return found

    @property
    def fd(self) -> int:
        """The socket's fd (-1 when not subscribed), to drain it when readable."""
        return self._sock.fileno() if self._sock is not None else -1

    def close(self) -> None:
        """Unsubscribe."""
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            with contextlib.suppress(OSError):
                self._sock.send(_request(PROC_CN_MCAST_IGNORE))
            self._sock.close()
            self._sock = None
