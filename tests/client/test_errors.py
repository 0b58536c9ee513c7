"""agentplatform.client.errors decodes the services' rich statuses into typed errors.

The statuses are made by the servers' own code (shared.rpc.request_path.status_for), so
these tests pin the client to the server's error model."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from agentplatform.client import errors
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from shared.rpc import errors as server_errors
from shared.rpc.request_path import status_for

DOMAIN = "agent.agentplatform"


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    """What a stub raises: an RpcError that is also a grpc.Call."""

    def __init__(
        self, code: grpc.StatusCode, details: str = "", trailers: tuple[Any, ...] = ()
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailers


def from_server(error: server_errors.DomainError, request_id: str = "req-1") -> FakeRpcError:
    status = status_for(error, DOMAIN, (("x-request-id", request_id),))
    return FakeRpcError(status.code, status.details, tuple(status.trailing_metadata))


def rich(code: grpc.StatusCode, *details: Any, message: str = "m") -> FakeRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return FakeRpcError(code, message, (("grpc-status-details-bin", status.SerializeToString()),))


def test_invalid_argument_carries_every_field_violation() -> None:
    error = errors.decode(
        from_server(
            server_errors.InvalidArgument(
                [
                    server_errors.FieldViolation("agent.name", "required"),
                    server_errors.FieldViolation("agent.tools[2].name", "too long"),
                ]
            )
        )
    )
    assert isinstance(error, errors.InvalidArgument)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == DOMAIN
    assert error.field_violations == (
        errors.FieldViolation("agent.name", "required"),
        errors.FieldViolation("agent.tools[2].name", "too long"),
    )
    assert error.request_id == "req-1"
    assert error.retry_delay is None
    assert not error.retryable
    assert "agent.name: required" in error.message


def test_resource_exhausted_with_retry_info_is_retryable_after_its_delay() -> None:
    error = errors.decode(
        from_server(
            server_errors.ResourceExhausted(
                "slow down", retry_after_seconds=1.25, reason="RATE_LIMITED"
            )
        )
    )
    assert isinstance(error, errors.ResourceExhausted)
    assert error.reason == "RATE_LIMITED"
    assert error.retry_delay == pytest.approx(1.25)
    assert error.retryable
    assert error.known_reason


def test_a_quota_failure_is_not_retryable() -> None:
    error = errors.decode(
        from_server(
            server_errors.ResourceExhausted(
                "too many agents",
                reason="AGENT_QUOTA_EXCEEDED",
                quota_violations=(server_errors.QuotaViolation("owners/u1", "at most 3"),),
            )
        )
    )
    assert isinstance(error, errors.ResourceExhausted)
    assert error.quota_violations == (errors.QuotaViolation("owners/u1", "at most 3"),)
    assert error.retry_delay is None
    assert not error.retryable


def test_unavailable_carries_the_delay_and_is_retryable() -> None:
    error = errors.decode(
        from_server(
            server_errors.Unavailable(
                "database down", retry_after_seconds=0.5, reason="DATABASE_UNAVAILABLE"
            )
        )
    )
    assert isinstance(error, errors.Unavailable)
    assert (error.reason, error.retry_delay, error.retryable) == (
        "DATABASE_UNAVAILABLE",
        0.5,
        True,
    )


def test_error_info_metadata_names_the_missing_scope() -> None:
    error = errors.decode(
        from_server(
            server_errors.PermissionDenied(
                "needs agents.write", reason="MISSING_SCOPE", metadata={"scope": "agents.write"}
            )
        )
    )
    assert isinstance(error, errors.PermissionDenied)
    assert error.metadata == {"scope": "agents.write"}
    assert error.missing_scope == "agents.write"


@pytest.mark.parametrize(
    ("error", "cls", "retryable"),
    [
        (server_errors.Unauthenticated("x", reason="TOKEN_EXPIRED"), errors.Unauthenticated, False),
        (server_errors.NotFound("x", reason="AGENT_NOT_FOUND"), errors.NotFound, False),
        (server_errors.AlreadyExists("x", reason="AGENT_NAME_TAKEN"), errors.AlreadyExists, False),
        (server_errors.Aborted("x", reason="ETAG_MISMATCH"), errors.Aborted, False),
        (server_errors.Aborted("x", reason="CONCURRENT_UPDATE"), errors.Aborted, True),
        (server_errors.Aborted("x", reason="REQUEST_IN_PROGRESS"), errors.Aborted, True),
        (server_errors.Internal("x"), errors.Internal, False),
    ],
)
def test_each_code_has_its_class(
    error: server_errors.DomainError, cls: type[errors.AgentPlatformError], retryable: bool
) -> None:
    decoded = errors.decode(from_server(error))
    assert type(decoded) is cls
    assert decoded.code is error.code
    assert decoded.reason == error.reason
    assert decoded.retryable is retryable


def test_every_status_code_but_ok_has_a_class_of_its_own() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        decoded = errors.decode(FakeRpcError(code, "bare"))
        assert decoded.code is code
        assert decoded.reason == code.name  # no ErrorInfo: the code's generic reason
        assert decoded.message == "bare"
    assert errors.decode(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED)).retryable is False


def test_an_unknown_reason_is_kept_as_a_string() -> None:
    error = errors.decode(
        rich(
            grpc.StatusCode.FAILED_PRECONDITION,
            error_details_pb2.ErrorInfo(reason="SOMETHING_NEW", domain="agent.agentplatform"),
        )
    )
    assert isinstance(error, errors.FailedPrecondition)
    assert error.reason == "SOMETHING_NEW"
    assert not error.known_reason
    assert len(error.details) == 1


def test_retry_info_is_decoded_from_any_position_and_unknown_details_are_kept() -> None:
    error = errors.decode(
        rich(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            error_details_pb2.DebugInfo(detail="ignored"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3, nanos=5)),
            error_details_pb2.ErrorInfo(reason="HASHING_BUSY"),
        )
    )
    assert error.reason == "HASHING_BUSY"
    assert error.retry_delay == pytest.approx(3.000000005)
    assert len(error.details) == 3


def test_the_pushback_trailer_stands_in_for_a_missing_retry_info() -> None:
    error = errors.decode(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x", (("grpc-retry-pushback-ms", "250"),))
    )
    assert error.retry_delay == 0.25
    bad = errors.decode(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x", (("grpc-retry-pushback-ms", "soon"),))
    )
    assert bad.retry_delay is None


def test_a_status_of_another_code_or_garbage_is_ignored() -> None:
    other = rich(grpc.StatusCode.NOT_FOUND, error_details_pb2.ErrorInfo(reason="AGENT_NOT_FOUND"))
    mismatched = FakeRpcError(grpc.StatusCode.INTERNAL, "boom", other.trailing_metadata())
    error = errors.decode(mismatched)
    assert (type(error), error.reason, error.message) == (errors.Internal, "INTERNAL", "boom")
    garbage = FakeRpcError(
        grpc.StatusCode.NOT_FOUND, "gone", (("grpc-status-details-bin", b"\xff\xff"),)
    )
    assert errors.decode(garbage).reason == "NOT_FOUND"


def test_str_names_code_reason_and_request_id() -> None:
    error = errors.decode(from_server(server_errors.NotFound("no agent", reason="AGENT_NOT_FOUND")))
    assert str(error) == "NOT_FOUND AGENT_NOT_FOUND: no agent, request req-1"
