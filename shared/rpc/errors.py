"""Domain errors, each knowing its gRPC status code and a stable reason.

    DomainError
    ├── InvalidArgument      INVALID_ARGUMENT  (+ BadRequest field violations)
    ├── Unauthenticated      UNAUTHENTICATED
    ├── PermissionDenied     PERMISSION_DENIED
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── Aborted              ABORTED           (etag mismatch, lost race)
    ├── FailedPrecondition   FAILED_PRECONDITION (the system is not in the state the call needs)
    ├── ResourceExhausted    RESOURCE_EXHAUSTED (+ RetryInfo, + QuotaFailure for a quota)
    ├── Unavailable          UNAVAILABLE        (+ RetryInfo)
    ├── Unimplemented        UNIMPLEMENTED      (a method this server does not serve)
    └── Internal             INTERNAL           (never carries internals to the wire)

The service layer raises these; one interceptor (shared.rpc.interceptors) turns them into a
status with `google.rpc` details. Nothing else in the code sets a status code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: `field` is a path such as `agent.tools[2].name`."""

    field: str
    description: str


class DomainError(Exception):
    """An error the caller can act on; `reason` is a stable UPPER_SNAKE_CASE identifier."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: list[FieldViolation] | FieldViolation,
        *,
        message: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else violations
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or f"invalid request: {summary}", reason=reason)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """A single-field violation."""
        return cls(FieldViolation(field, description))


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class FailedPrecondition(DomainError):
    """The resource is not in a state the call needs (AIP-164: a soft-deleted one)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class _Retryable(DomainError):
    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = max(0.0, retry_after_seconds)


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exceeded quota (google.rpc.QuotaFailure): whose, and which limit."""

    subject: str
    description: str


class ResourceExhausted(_Retryable):
    """A rate limit or a busy resource (retry after the delay), or a quota the caller has
    used up (`quota_violations`; retrying does not help until something is freed)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float = 0.0,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        quota_violations: tuple[QuotaViolation, ...] = (),
    ) -> None:
        super().__init__(
            message, retry_after_seconds=retry_after_seconds, reason=reason, metadata=metadata
        )
        self.quota_violations = quota_violations


class Unavailable(_Retryable):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(DomainError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
