"""Typed errors decoded from a failed call's rich status.

The services answer every error with a `google.rpc.Status` in the `grpc-status-details-bin`
trailer: an `ErrorInfo` whose `reason` is an `agentplatform.errors.v1.ErrorReason` name
(always), a `BadRequest` with one violation per bad field (INVALID_ARGUMENT), a
`RetryInfo` with the delay to wait (RESOURCE_EXHAUSTED, UNAVAILABLE) and a `QuotaFailure`
for a used-up quota. `decode(rpc_error)` turns a `grpc.RpcError` into one exception class
per status code carrying all of it:

    try:
        agents.get(agent_id)
    except NotFound:
        ...
    except AgentPlatformError as error:
        log.warning("%s %s (request %s)", error.code.name, error.reason, error.request_id)

Only grpcio, protobuf and googleapis-common-protos are used (not grpcio-status).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from agentplatform.errors.v1 import errors_pb2

__all__ = [
    "DETAILS_TRAILER",
    "REQUEST_ID_TRAILER",
    "RETRY_PUSHBACK_TRAILER",
    "Aborted",
    "AgentPlatformError",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "decode",
    "error_class",
    "is_known_reason",
]

DETAILS_TRAILER = "grpc-status-details-bin"
REQUEST_ID_TRAILER = "x-request-id"
RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"

# ABORTED reasons after which the same request may simply be sent again (ETAG_MISMATCH
# needs a fresh read first, so it is not one of them).
_RETRYABLE_ABORTS = frozenset({"CONCURRENT_UPDATE", "REQUEST_IN_PROGRESS"})
_KNOWN_REASONS = frozenset(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def is_known_reason(reason: str) -> bool:
    """Whether `reason` is a value of agentplatform.errors.v1.ErrorReason (this client's
    version of it: a newer server may send reasons this client does not know)."""
    return reason in _KNOWN_REASONS


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field (google.rpc.BadRequest.FieldViolation): `field` is a path such as
    `agent.tools[2].name`."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exceeded quota (google.rpc.QuotaFailure.Violation): whose, and which limit."""

    subject: str
    description: str


class AgentPlatformError(Exception):
    """A failed call. `code` is the gRPC status code; `reason` the stable
    ErrorReason name from the ErrorInfo (a string: unknown reasons are kept as sent;
    the code's generic name when the server sent none); `metadata` the ErrorInfo's
    metadata (e.g. `scope` for MISSING_SCOPE); `retry_delay` the RetryInfo delay in
    seconds (or the grpc-retry-pushback-ms trailer's), None without one; `retryable`
    whether sending the same request again later may succeed."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: Sequence[FieldViolation] = (),
        quota_violations: Sequence[QuotaViolation] = (),
        request_id: str | None = None,
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: str = reason or self.code.name
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.quota_violations: tuple[QuotaViolation, ...] = tuple(quota_violations)
        self.request_id = request_id
        # Every detail as sent (google.protobuf.Any), the ones decoded above included.
        self.details: tuple[Any, ...] = tuple(details)

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again (after `retry_delay`)."""
        return False

    @property
    def known_reason(self) -> bool:
        """Whether `reason` is an ErrorReason this client knows."""
        return is_known_reason(self.reason)

    def __str__(self) -> str:
        where = f", request {self.request_id}" if self.request_id else ""
        return f"{self.code.name} {self.reason}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r}, "
            f"retry_delay={self.retry_delay!r}, request_id={self.request_id!r})"
        )


class Cancelled(AgentPlatformError):
    code = grpc.StatusCode.CANCELLED


class Unknown(AgentPlatformError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(AgentPlatformError):
    """Fix the request: `field_violations` names each bad field (reason INVALID_ARGUMENT),
    or the body was not a request message (MALFORMED_REQUEST), or a request_id was reused
    for another request (REQUEST_ID_REUSED), a scope or grant is not allowed..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(AgentPlatformError):
    """The deadline passed (on this side, or the server gave up). Whether the call took
    effect is unknown, so it is not `retryable` in general: retry only what is safe to
    repeat (reads; a create with the same request_id)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(AgentPlatformError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentPlatformError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AgentPlatformError):
    """The caller may not do this; for MISSING_SCOPE, `metadata["scope"]` names the scope."""

    code = grpc.StatusCode.PERMISSION_DENIED

    @property
    def missing_scope(self) -> str | None:
        return self.metadata.get("scope") if self.reason == "MISSING_SCOPE" else None


class ResourceExhausted(AgentPlatformError):
    """A rate limit or a busy resource (retry after `retry_delay`, not sooner), or a quota
    used up (`quota_violations`; retrying does not help until something is freed)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def retryable(self) -> bool:
        return self.retry_delay is not None and not self.quota_violations


class FailedPrecondition(AgentPlatformError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(AgentPlatformError):
    """A conflict: ETAG_MISMATCH (read the agent again, then decide), or a transient one
    (CONCURRENT_UPDATE, REQUEST_IN_PROGRESS: the same request may be sent again)."""

    code = grpc.StatusCode.ABORTED

    @property
    def retryable(self) -> bool:
        return self.reason in _RETRYABLE_ABORTS


class OutOfRange(AgentPlatformError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(AgentPlatformError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(AgentPlatformError):
    """An unexpected server error; `request_id` finds it in the server's logs."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(AgentPlatformError):
    """The server (or what it depends on) cannot answer now: retry, after `retry_delay`
    when given (another replica may answer)."""

    code = grpc.StatusCode.UNAVAILABLE

    @property
    def retryable(self) -> bool:
        return True


class DataLoss(AgentPlatformError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(AgentPlatformError):
    """No valid credentials: MISSING_TOKEN, INVALID_TOKEN (get a new token), TOKEN_EXPIRED
    (refresh it), INVALID_CLIENT, INVALID_CREDENTIALS, INVALID_REFRESH_TOKEN..."""

    code = grpc.StatusCode.UNAUTHENTICATED


_CLASSES: dict[grpc.StatusCode, type[AgentPlatformError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[AgentPlatformError]:
    """The exception class of a status code (Unknown for OK or anything unexpected)."""
    return _CLASSES.get(code, Unknown)


def _trailer(trailers: Sequence[tuple[str, Any]], key: str) -> Any:
    for name, value in trailers:
        if name == key:
            return value
    return None


def _status_details(trailers: Sequence[tuple[str, Any]], code: grpc.StatusCode) -> Any:
    """The google.rpc.Status of the trailers, or None without a valid one (a status whose
    code differs from the call's is not the call's: ignored)."""
    raw = _trailer(trailers, DETAILS_TRAILER)
    if not isinstance(raw, bytes):
        return None
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return None
    if status.code != code.value[0]:
        return None
    return status


def _unpack(detail: any_pb2.Any, message_type: Any) -> Any:
    if not detail.Is(message_type.DESCRIPTOR):
        return None
    message = message_type()
    with contextlib.suppress(DecodeError):
        if detail.Unpack(message):
            return message
    return None


def decode(rpc_error: grpc.RpcError) -> AgentPlatformError:
    """The typed error of a failed call (a `grpc.RpcError` that is also a `grpc.Call`,
    as raised by any stub). Raise it `from` the original: `raise decode(e) from e`."""
    code_of = getattr(rpc_error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(rpc_error, "details", None)
    message = (details_of() if callable(details_of) else None) or ""
    trailers_of = getattr(rpc_error, "trailing_metadata", None)
    trailers = tuple((trailers_of() if callable(trailers_of) else None) or ())

    reason: str | None = None
    domain = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    violations: list[FieldViolation] = []
    quotas: list[QuotaViolation] = []
    details: tuple[Any, ...] = ()
    status = _status_details(trailers, code)
    if status is not None:
        message = status.message or message
        details = tuple(status.details)
        for detail in details:
            if (info := _unpack(detail, error_details_pb2.ErrorInfo)) is not None:
                reason, domain, metadata = info.reason or None, info.domain, dict(info.metadata)
            elif (bad := _unpack(detail, error_details_pb2.BadRequest)) is not None:
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif (retry := _unpack(detail, error_details_pb2.RetryInfo)) is not None:
                retry_delay = max(0.0, retry.retry_delay.ToNanoseconds() / 1e9)
            elif (quota := _unpack(detail, error_details_pb2.QuotaFailure)) is not None:
                quotas += [QuotaViolation(v.subject, v.description) for v in quota.violations]
    if retry_delay is None:
        retry_delay = _pushback(_trailer(trailers, RETRY_PUSHBACK_TRAILER))
    request_id = _trailer(trailers, REQUEST_ID_TRAILER)
    return error_class(code)(
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
        field_violations=violations,
        quota_violations=quotas,
        request_id=request_id if isinstance(request_id, str) else None,
        details=details,
    )


def _pushback(value: Any) -> float | None:
    """grpc-retry-pushback-ms as seconds (a negative or malformed value: none)."""
    if not isinstance(value, str):
        return None
    try:
        ms = int(value)
    except ValueError:
        return None
    return ms / 1000 if ms >= 0 else None
