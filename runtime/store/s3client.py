"""botocore as Stasis calls it: which failures another attempt may cure, and every
failure as one-line StasisError naming operation, target and endpoint, never the
secret. ``Client`` is what s3transfer calls: the store's own retries, failures mapped,
and no abort once the endpoint proved unreachable.

botocore is imported on first use.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from runtime.errors import InvalidArgument, NotFound, PermissionDenied, StasisError, Unavailable

_AUTH_CODES = frozenset(
    {"AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken", "Forbidden"}
    | {"InvalidAccessKeyId", "InvalidClientTokenId", "InvalidSecurity", "InvalidToken"}
    | {"SignatureDoesNotMatch", "TokenRefreshRequired", "UnrecognizedClientException"}
)
_THROTTLE_CODES = frozenset(
    {"RequestLimitExceeded", "RequestThrottled", "ServiceUnavailable", "SlowDown"}
    | {"Throttling", "ThrottlingException", "TooManyRequests"}
)
_TRANSIENT_CODES = _THROTTLE_CODES | {"InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"}
)
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def clean(what: object, secret: str | None) -> str:
    """One line of server or SDK text, never ``secret``."""
    text = " ".join(str(what).split())
    if secret and len(secret) >= 8:  # a shorter one would mangle words, and is no secret
        text = text.replace(secret, "***")
    return text if len(text) <= 300 else text[:297] + "..."


def stasis_error(e: BaseException, head: str, bucket: str, secret: str | None) -> StasisError:
    """botocore's ``e`` as one-line StasisError: ``head`` (operation, target, endpoint),
    then what failed, server and SDK text ``clean``."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message")
        detail = clean(f"{code}: {message}" if message else code or f"HTTP {status}", secret)
        if code == "NoSuchBucket":
            return NotFound(f"{head}: bucket {bucket} does not exist ({detail})")
        if code in _REGION_CODES or status == 301:
            return Unavailable(
                f"{head}: the bucket is in another region or behind another endpoint; "
                f"set storage.s3.region/endpoint ({detail})"
            )
        if code in _AUTH_CODES or status == 403:
            return PermissionDenied(
                f"{head}: access refused, check the credentials and the bucket's "
                f"permissions ({detail})"
            )
        if code in MISSING_KEY_CODES or status == 404:
            return NotFound(f"{head}: no such object ({detail})")
        if code in _THROTTLE_CODES or status in (429, 503):
            return Unavailable(f"{head}: throttled, still after retries ({detail})")
        if code == "InvalidBucketName":
            return InvalidArgument(f"{head}: invalid bucket name ({detail})")
        return Unavailable(f"{head}: {detail} (HTTP {status})")
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return PermissionDenied(
            f"{head}: no usable S3 credentials: set storage.s3.access_key_id and "
            "secret_access_key (or STASIS_S3_*), or the AWS variables or files"
        )
    if isinstance(e, bx.CredentialRetrievalError):
        return PermissionDenied(f"{head}: cannot load S3 credentials ({clean(e, secret)})")
    if isinstance(e, bx.ConnectTimeoutError):
        return Unavailable(f"{head}: cannot reach the endpoint (connect timed out)")
    if isinstance(e, bx.ConnectionError):
        return Unavailable(f"{head}: cannot reach the endpoint ({type(e).__name__})")
    if isinstance(e, bx.ReadTimeoutError):
        return Unavailable(f"{head}: the endpoint stopped answering (read timed out)")
    return Unavailable(f"{head}: {type(e).__name__}: {clean(e, secret)}")


def is_transient(e: BaseException) -> bool:
    """Whether trying the same request again may help (network, 5xx, throttling)."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError | bx.ConnectTimeoutError):
        return False  # a black-holed endpoint: botocore's attempts took long enough
    return isinstance(
        e,
        bx.ConnectionError
        | bx.HTTPClientError
        | bx.ReadTimeoutError
        | bx.ResponseStreamingError
        | bx.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    )


def is_unreachable(e: BaseException) -> bool:
    from botocore import exceptions as bx

    cause = e.__cause__ if isinstance(e, StasisError) else e
    return isinstance(cause, bx.ConnectionError)


class Client:
    """The client s3transfer calls: PUTs, part uploads and completions get the
    store's own retries (botocore does not retry a body that broke off
    mid-stream), every failure is mapped, and once the endpoint proved
    unreachable no abort is attempted (``gc`` collects the rest)."""

    def __init__(self, s3: Any, call: Callable[..., Any], retry: Callable[..., Any]) -> None:
        self._s3 = s3
        self._call = call  # the store's: failures mapped
        self._retry = retry  # the store's: failures mapped, transient ones tried again
        self.unreachable = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def _run(self, op: str, retry: bool, kwargs: dict[str, Any], name: str) -> Any:
        key = str(kwargs.get("Key"))
        try:
            if retry:
                return self._retry(op, key, getattr(self._s3, name), **kwargs)
            return self._call(op, key, getattr(self._s3, name), **kwargs)
        except StasisError as e:
            self.unreachable = self.unreachable or is_unreachable(e)
            raise

    def put_object(self, **kwargs: Any) -> Any:
        return self._run("put", True, kwargs, "put_object")

    def upload_part(self, **kwargs: Any) -> Any:
        return self._run(f"upload part {kwargs['PartNumber']} of", True, kwargs, "upload_part")

    def create_multipart_upload(self, **kwargs: Any) -> Any:
        return self._run("create multipart upload", False, kwargs, "create_multipart_upload")

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        return self._run("complete multipart upload", True, kwargs, "complete_multipart_upload")

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        if self.unreachable:
            raise Unavailable(f"{kwargs.get('Key')}: endpoint unreachable, left for gc")
        return self._run("abort multipart upload", False, kwargs, "abort_multipart_upload")


class Watch:
    """An s3transfer subscriber: queues the transfer's future once it is done, and
    gives an upload whose parts would outnumber S3's limit an upper bound of its
    size (s3transfer then picks bigger parts)."""

    def __init__(self, done: queue.SimpleQueue[Any], size_bound: int | None = None) -> None:
        self._done = done
        self._size_bound = size_bound

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size_bound is not None:
            future.meta.provide_transfer_size(self._size_bound)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._done.put(future)
