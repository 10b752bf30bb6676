"""The error classes every Stasis layer raises.

Each class mirrors one gRPC status code; the shim's RPC edge converts them once
(``shim.daemon.task_api``), and the CLI prints them as one line. Lower layers chain the
cause with ``raise ... from``.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """gRPC status codes (google.rpc.Code), as carried by ttrpc responses."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class StasisError(Exception):
    """Base of all Stasis errors; ``code`` is the status it maps to."""

    code: Code = Code.UNKNOWN


class InvalidArgument(StasisError):
    """The request itself is wrong (bad id, malformed spec, unknown option)."""

    code = Code.INVALID_ARGUMENT


class PermissionDenied(StasisError):
    """The caller may not do this (storage credentials refused, access denied)."""

    code = Code.PERMISSION_DENIED


class NotFound(StasisError):
    """The container, process or checkpoint named does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(StasisError):
    """Something with that id or name exists already."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(StasisError):
    """The object is in a state where the operation is not allowed."""

    code = Code.FAILED_PRECONDITION


class Aborted(StasisError):
    """A concurrent change won: the object is no longer as it was read."""

    code = Code.ABORTED


class Unavailable(StasisError):
    """A dependency (runc, CRIU, storage, containerd) could not be reached or failed."""

    code = Code.UNAVAILABLE


class NotImplementedRPC(StasisError):
    """The operation is not implemented by this runtime."""

    code = Code.UNIMPLEMENTED


class DeadlineExceeded(StasisError):
    """The operation did not finish in time."""

    code = Code.DEADLINE_EXCEEDED


class ResourceExhausted(StasisError):
    """A size or count limit was exceeded."""

    code = Code.RESOURCE_EXHAUSTED


class Internal(StasisError):
    """A bug or an unexpected failure inside Stasis."""

    code = Code.INTERNAL


class DataLoss(StasisError):
    """Stored data is corrupt or incomplete (a checksum or size mismatch, a bad manifest)."""

    code = Code.DATA_LOSS
