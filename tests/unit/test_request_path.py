"""The request path under grpcio-testing: decoding, error mapping, token checks, access log,
metrics, the call context."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc_testing
import jwt
import psycopg
import pytest
from agentplatform.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy.exc import DBAPIError, OperationalError

from shared.config import deadlines
from shared.data.db import unavailable_database
from shared.rpc.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.rpc.metrics import Metrics
from shared.rpc.request_path import REQUEST_ID_HEADER, RequestPath, principal_of
from shared.security.jwk import VerificationKey, thumbprint
from shared.security.tokens import Principal, StaticKeyProvider, TokenVerifier
from tests.helpers import FakeClock, Intercepted, error_detail, rich_status

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
SERVICE_NAME = SERVICE.full_name
DOMAIN = "test.agentplatform"
PUBLIC = {f"/{SERVICE_NAME}/GetJwks"}
ISSUER, AUDIENCE = "issuer", "audience"
SECRET_TEXT = "password=hunter2 at /srv/secret/path"


class ScriptedServicer:
    """GetJwks (public) and GetCurrentUser (authenticated) run whatever the test scripts."""

    def __init__(self) -> None:
        self.behavior: Callable[[Any], message.Message] = lambda _ctx: auth_pb2.GetJwksResponse()
        self.principals: list[Principal] = []

    def GetJwks(self, request: Any, context: Any) -> message.Message:
        return self.behavior(context)

    def GetCurrentUser(self, request: Any, context: Any) -> message.Message:
        self.principals.append(principal_of(context))
        self.behavior(context)
        return auth_pb2.GetCurrentUserResponse()


@dataclass
class Outcome:
    response: Any
    code: grpc.StatusCode
    details: str
    trailing: Sequence[tuple[str, Any]]

    @property
    def status(self) -> status_pb2.Status | None:
        return rich_status(self.trailing)

    def detail(self, kind: type[message.Message]) -> Any:
        assert self.status is not None
        return error_detail(self.status, kind)


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.kid = thumbprint(self.key.public_key())
        self.verifier = TokenVerifier(
            StaticKeyProvider([VerificationKey(self.kid, "EdDSA", self.key.public_key())]),
            issuer=ISSUER,
            audience=AUDIENCE,
            clock=self.clock,
        )
        self.servicer = ScriptedServicer()
        self.metrics = Metrics()
        self.path = RequestPath(
            domain=DOMAIN,
            verifier=self.verifier,
            public_methods=PUBLIC,
            metrics=self.metrics.rpc,
            translators=[unavailable_database],
            quiet_methods=[f"/{SERVICE_NAME}/GetJwks"],
        )
        self.server = grpc_testing.server_from_dictionary(
            {SERVICE: Intercepted(self.servicer, SERVICE_NAME, self.path)},
            grpc_testing.strict_real_time(),
        )

    def token(
        self, user_id: str, roles: Sequence[str] = ("user",), actor: str | None = None
    ) -> str:
        now = int(self.clock.now().timestamp())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user_id,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "roles": list(roles),
        }
        if actor is not None:
            claims["act"] = {"sub": actor}
        return jwt.encode(
            claims, self.key, algorithm="EdDSA", headers={"kid": self.kid, "typ": "at+jwt"}
        )

    def call(
        self,
        method: str = "GetJwks",
        metadata: Sequence[tuple[str, str]] = (),
        request: message.Message | None = None,
    ) -> Outcome:
        request = request or (
            auth_pb2.GetJwksRequest() if method == "GetJwks" else auth_pb2.GetCurrentUserRequest()
        )
        rpc = self.server.invoke_unary_unary(
            SERVICE.methods_by_name[method], tuple(metadata), request, None
        )
        response, trailing, code, details = rpc.termination()
        return Outcome(response, code, details, trailing)

    def metric(self, name: str, service: str, method: str, **labels: str) -> float | None:
        result: float | None = self.metrics.registry.get_sample_value(
            name, {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, **labels}
        )
        return result

    def raising(self, error: BaseException) -> None:
        def behavior(_ctx: Any) -> message.Message:
            raise error

        self.servicer.behavior = behavior


@pytest.fixture
def harness() -> Harness:
    return Harness()


# -- error mapping ----------------------------------------------------------------------

ERRORS: list[tuple[DomainError, grpc.StatusCode]] = [
    (InvalidArgument.field("name", "required"), grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated("who are you"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    (NotFound("no such agent", metadata={"agent": "a1"}), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS),
    (Aborted("etag mismatch", reason="ETAG_MISMATCH"), grpc.StatusCode.ABORTED),
    (ResourceExhausted("slow down", retry_after_seconds=1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("try later", retry_after_seconds=2), grpc.StatusCode.UNAVAILABLE),
    (Internal("broken"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_every_domain_error_maps_to_its_code_with_error_info(
    harness: Harness, error: DomainError, code: grpc.StatusCode
) -> None:
    harness.raising(error)
    outcome = harness.call()
    assert outcome.code == code
    assert outcome.details == error.message
    status = outcome.status
    assert status is not None
    assert status.code == code.value[0]
    assert status.message == error.message
    info = outcome.detail(error_details_pb2.ErrorInfo)
    assert info.reason == error.reason
    assert info.domain == DOMAIN
    assert dict(info.metadata) == error.metadata


def test_invalid_argument_carries_bad_request_field_violations(harness: Harness) -> None:
    harness.raising(
        InvalidArgument(
            [FieldViolation("email", "not a valid email address"), FieldViolation("password", "x")]
        )
    )
    outcome = harness.call()
    bad_request = outcome.detail(error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("email", "not a valid email address"),
        ("password", "x"),
    ]
    assert outcome.detail(error_details_pb2.RetryInfo) is None


@pytest.mark.parametrize(
    "error",
    [
        ResourceExhausted("locked", retry_after_seconds=899.25, reason="LOGIN_LOCKED"),
        Unavailable("busy", retry_after_seconds=899.25),
    ],
)
def test_retryable_errors_carry_retry_info(harness: Harness, error: DomainError) -> None:
    harness.raising(error)
    retry = harness.call().detail(error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 899
    assert retry.retry_delay.nanos == 250_000_000


def test_an_exceeded_quota_carries_quota_failure_and_no_retry_info(harness: Harness) -> None:
    harness.raising(
        ResourceExhausted(
            "you have 10 agents, the most allowed",
            reason="AGENT_QUOTA_EXCEEDED",
            quota_violations=(QuotaViolation("owner:42", "at most 10 agents per owner"),),
        )
    )
    outcome = harness.call()
    quota = outcome.detail(error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("owner:42", "at most 10 agents per owner")
    ]
    assert outcome.detail(error_details_pb2.RetryInfo) is None


def test_other_errors_carry_no_bad_request_or_retry_info(harness: Harness) -> None:
    harness.raising(NotFound("gone"))
    outcome = harness.call()
    assert outcome.detail(error_details_pb2.BadRequest) is None
    assert outcome.detail(error_details_pb2.RetryInfo) is None


def test_an_unexpected_exception_is_a_bare_internal_with_the_trace_in_the_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.raising(RuntimeError(SECRET_TEXT))
    with caplog.at_level(logging.ERROR, logger="agentplatform.rpc"):
        outcome = harness.call()
    assert outcome.code == grpc.StatusCode.INTERNAL
    assert outcome.details == "internal error"
    status = outcome.status
    assert status is not None
    assert status.message == "internal error"
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "INTERNAL"
    wire = repr(outcome.trailing) + outcome.details + str(status)
    for leak in ("hunter2", "RuntimeError", "Traceback", "/srv/secret"):
        assert leak not in wire
    (record,) = [r for r in caplog.records if r.name == "agentplatform.rpc"]
    assert record.getMessage() == f"unexpected error in /{SERVICE_NAME}/GetJwks"
    assert record.exc_info is not None
    assert SECRET_TEXT in caplog.text
    assert "Traceback" in caplog.text
    assert "test_request_path.py" in caplog.text  # the frame that raised


def test_a_database_that_does_not_answer_is_unavailable_with_retry_info(
    harness: Harness,
) -> None:
    harness.raising(
        OperationalError("SELECT 1", {}, Exception(f"connection refused {SECRET_TEXT}"))
    )
    outcome = harness.call()
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "DATABASE_UNAVAILABLE"
    assert outcome.detail(error_details_pb2.RetryInfo).retry_delay.seconds == 1
    assert "hunter2" not in repr(outcome.trailing) + outcome.details


@pytest.mark.parametrize(
    "server_error",
    [
        psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
    ],
    ids=["read-only (demoted primary)", "admin shutdown", "starting up"],
)
def test_a_server_that_is_no_longer_the_primary_is_unavailable_with_retry_info(
    harness: Harness, server_error: psycopg.Error
) -> None:
    """A write refused by a demoted primary (psycopg raises 25006 as an InternalError,
    which SQLAlchemy wraps as one): UNAVAILABLE, retry, not INTERNAL."""
    harness.raising(DBAPIError.instance("INSERT", {}, server_error, psycopg.Error))
    outcome = harness.call()
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "DATABASE_UNAVAILABLE"
    assert outcome.detail(error_details_pb2.RetryInfo).retry_delay.seconds == 1


def test_a_successful_call_has_no_error_details(harness: Harness) -> None:
    outcome = harness.call()
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.status is None


# -- token check ------------------------------------------------------------------------


def test_a_public_method_needs_no_token(harness: Harness) -> None:
    assert harness.call("GetJwks").code == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", ""),),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer "),),
    ],
)
def test_an_authenticated_method_without_a_bearer_token_is_unauthenticated(
    harness: Harness, metadata: tuple[tuple[str, str], ...]
) -> None:
    outcome = harness.call("GetCurrentUser", metadata)
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "MISSING_TOKEN"
    assert harness.servicer.principals == []


def test_an_invalid_token_is_unauthenticated(harness: Harness) -> None:
    forged = harness.token("u1")[:-4] + "AAAA"
    outcome = harness.call("GetCurrentUser", [("authorization", f"Bearer {forged}")])
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "INVALID_TOKEN"
    assert forged not in outcome.details


def test_a_valid_token_hands_the_principal_to_the_servicer(harness: Harness) -> None:
    token = harness.token("user-7", roles=("user", "admin"))
    outcome = harness.call("GetCurrentUser", [("authorization", f"bearer {token}")])
    assert outcome.code == grpc.StatusCode.OK
    (principal,) = harness.servicer.principals
    assert principal.user_id == "user-7"
    assert principal.roles == frozenset({"user", "admin"})


def test_principal_of_a_context_without_a_check_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        principal_of(object())


def test_library_services_need_no_token_and_are_not_access_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.access")
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request, request_deserializer=lambda data: data + b"!"
    )
    wrapped = harness.path.wrap("/grpc.health.v1.Health/Check", handler)
    context = FakeContext()
    assert wrapped.unary_unary(b"ping", context) == b"ping!"
    assert access_lines(caplog) == []
    handled = harness.metric(
        "grpc_server_handled_total", "grpc.health.v1.Health", "Check", grpc_code="OK"
    )
    assert handled == 1


# -- access log -------------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.rpc for r in caplog.records if r.name == "agentplatform.access"]  # type: ignore[attr-defined]


def test_each_call_logs_one_access_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.access")
    token = harness.token("user-9")
    caplog.set_level(logging.DEBUG, logger="agentplatform.access")  # GetJwks is quiet
    harness.call("GetJwks", [("x-request-id", "req-1")])
    harness.call("GetCurrentUser", [("authorization", f"Bearer {token}")])
    harness.call("GetCurrentUser")
    harness.raising(ResourceExhausted("slow", retry_after_seconds=1))
    harness.call("GetJwks")
    lines = access_lines(caplog)
    assert [(line["method"].rsplit("/", 1)[1], line["code"]) for line in lines] == [
        ("GetJwks", "OK"),
        ("GetCurrentUser", "OK"),
        ("GetCurrentUser", "UNAUTHENTICATED"),
        ("GetJwks", "RESOURCE_EXHAUSTED"),
    ]
    assert lines[0]["request_id"] == "req-1"
    assert lines[1]["request_id"]
    assert lines[1]["request_id"] != lines[2]["request_id"]
    assert [line["user_id"] for line in lines] == [None, "user-9", None, None]
    assert [line["actor"] for line in lines] == [None, None, None, None]
    assert all(line["duration_ms"] >= 0 and "peer" in line for line in lines)
    assert token not in caplog.text


def test_a_quiet_method_logs_its_successes_at_debug_and_its_failures_as_usual(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.access")
    harness.call("GetJwks")
    assert access_lines(caplog) == []  # a poll every 2 s per agent pod: not at INFO
    caplog.set_level(logging.DEBUG, logger="agentplatform.access")
    harness.call("GetJwks")
    assert [r.levelno for r in caplog.records if r.name == "agentplatform.access"] == [
        logging.DEBUG
    ]


def test_the_access_line_names_the_service_acting_for_the_user(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.access")
    harness.call(
        "GetCurrentUser", [("authorization", f"Bearer {harness.token('user-9', actor='svc-7')}")]
    )
    (line,) = access_lines(caplog)
    assert (line["code"], line["user_id"], line["actor"]) == ("OK", "user-9", "svc-7")


def test_access_log_levels_follow_the_code(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentplatform.access")
    for error in (NotFound("x"), Unavailable("x", retry_after_seconds=1), RuntimeError("x")):
        harness.raising(error)
        harness.call()
    levels = [r.levelno for r in caplog.records if r.name == "agentplatform.access"]
    assert levels == [logging.INFO, logging.WARNING, logging.ERROR]


class _Aborted(Exception):
    pass


class FakeContext:
    """Enough of grpcio's servicer context for a wrapped behaviour called directly."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = (), remaining: float | None = None):
        self.metadata = tuple(metadata)
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: Sequence[tuple[str, Any]] = ()
        self.headers: Sequence[tuple[str, Any]] = ()
        self.callbacks: list[Callable[[], None]] = []

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing = metadata

    def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.headers = metadata

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted

    def terminate(self) -> None:
        """What grpcio does when the call ends: run the callbacks."""
        for callback in self.callbacks:
            callback()


def test_the_token_check_denies_by_default_even_outside_our_services(harness: Harness) -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    wrapped = harness.path.wrap("/other.v1.Thing/Do", handler)
    context = FakeContext()
    with pytest.raises(_Aborted):
        wrapped.unary_unary(b"", context)
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED


def test_a_streaming_method_needs_a_token_before_it_starts(harness: Harness) -> None:
    seen: list[Principal] = []

    def watch(request: Any, context: Any) -> Any:
        seen.append(principal_of(context))
        yield b"event"

    handler = grpc.unary_stream_rpc_method_handler(watch)
    wrapped = harness.path.wrap("/agentplatform.agent.v1.AgentService/WatchAgents", handler)

    context = FakeContext()
    with pytest.raises(_Aborted):
        list(wrapped.unary_stream(b"", context))
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert seen == []

    token = harness.token("user-9")
    allowed = FakeContext([("authorization", f"Bearer {token}"), (REQUEST_ID_HEADER, "r-1")])
    assert list(wrapped.unary_stream(b"", allowed)) == [b"event"]
    assert [p.user_id for p in seen] == ["user-9"]
    assert allowed.headers == ((REQUEST_ID_HEADER, "r-1"),)


# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" * 3, b"\x12\x02\xc3\x28"])
def test_a_body_that_does_not_parse_is_invalid_argument_before_any_token_check(
    harness: Harness, body: bytes
) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request,
        request_deserializer=auth_pb2.RegisterRequest.FromString,
    )
    wrapped = harness.path.wrap(f"/{SERVICE_NAME}/GetCurrentUser", handler)
    context = FakeContext()
    with pytest.raises(_Aborted):
        wrapped.unary_unary(body, context)
    assert context.aborted is not None
    code, message = context.aborted
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in message
    status = rich_status(context.trailing)
    assert error_detail(status, error_details_pb2.ErrorInfo).reason == "MALFORMED_REQUEST"
    assert (
        harness.metric(
            "grpc_server_handled_total", SERVICE_NAME, "GetCurrentUser", grpc_code="InvalidArgument"
        )
        == 1
    )


# -- request ids and metrics ------------------------------------------------------------


def test_the_request_id_comes_back_in_the_trailers_on_success_and_on_error(
    harness: Harness,
) -> None:
    ok = harness.call("GetJwks", [("x-request-id", "req-ok")])
    assert (REQUEST_ID_HEADER, "req-ok") in ok.trailing
    harness.raising(NotFound("gone"))
    failed = harness.call("GetJwks", [("x-request-id", "req-failed")])
    assert (REQUEST_ID_HEADER, "req-failed") in failed.trailing
    assert failed.status is not None  # the rich status travels beside it
    generated = dict(harness.call("GetJwks").trailing)[REQUEST_ID_HEADER]
    assert generated not in ("", "req-ok")


def test_every_call_is_counted_with_its_code(harness: Harness) -> None:
    token = harness.token("user-1")
    harness.call("GetJwks")
    harness.call("GetCurrentUser", [("authorization", f"Bearer {token}")])
    harness.call("GetCurrentUser")
    started = harness.metric("grpc_server_started_total", SERVICE_NAME, "GetCurrentUser")
    assert started == 2
    assert (
        harness.metric("grpc_server_handled_total", SERVICE_NAME, "GetCurrentUser", grpc_code="OK")
        == 1
    )
    assert (
        harness.metric(
            "grpc_server_handled_total", SERVICE_NAME, "GetCurrentUser", grpc_code="Unauthenticated"
        )
        == 1
    )
    assert harness.metric("grpc_server_handling_seconds_count", SERVICE_NAME, "GetJwks") == 1
    assert harness.metric("grpc_server_msg_sent_total", SERVICE_NAME, "GetCurrentUser") == 1
    assert harness.metric("grpc_server_msg_received_total", SERVICE_NAME, "GetCurrentUser") == 2


def test_counts_from_many_threads_add_up(harness: Harness) -> None:
    def calls() -> None:
        for _ in range(200):
            harness.call("GetJwks")

    threads = [threading.Thread(target=calls) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (
        harness.metric("grpc_server_handled_total", SERVICE_NAME, "GetJwks", grpc_code="OK") == 1600
    )
    assert harness.metric("grpc_server_handling_seconds_count", SERVICE_NAME, "GetJwks") == 1600


# -- tokens -----------------------------------------------------------------------------


def test_an_expired_token_has_a_reason_of_its_own(harness: Harness) -> None:
    token = harness.token("user-1")
    harness.clock.advance(3600)
    outcome = harness.call("GetCurrentUser", [("authorization", f"Bearer {token}")])
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    assert outcome.detail(error_details_pb2.ErrorInfo).reason == "TOKEN_EXPIRED"


# -- the call context: deadlines, early ends, shutdown ------------------------------------


def _scripted(behavior: Callable[[Any, Any], Any]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior)


def test_the_current_call_knows_the_callers_deadline(harness: Harness) -> None:
    seen: list[float | None] = []

    def behavior(request: Any, call: Any) -> bytes:
        seen.append(deadlines.remaining())
        return b""

    wrapped = harness.path.wrap(f"/{SERVICE_NAME}/GetJwks", _scripted(behavior))
    wrapped.unary_unary(b"", FakeContext(remaining=2.5))
    wrapped.unary_unary(b"", FakeContext(remaining=None))
    assert seen[0] is not None
    assert 0 < seen[0] <= 2.5
    assert seen[1] is None
    assert deadlines.remaining() is None  # outside a call


def test_end_hooks_run_when_the_call_ends_before_its_work(harness: Harness) -> None:
    context = FakeContext()
    ended: list[str] = []

    def behavior(request: Any, call: Any) -> bytes:
        scope = deadlines.current_call.get()
        assert scope is not None
        scope.on_end(lambda: ended.append("early"))
        context.terminate()  # the caller cancels while the work runs
        return b""

    harness.path.wrap(f"/{SERVICE_NAME}/GetJwks", _scripted(behavior)).unary_unary(b"", context)
    assert ended == ["early"]


def test_end_hooks_do_not_run_for_a_call_that_finished(harness: Harness) -> None:
    context = FakeContext()
    ended: list[str] = []

    def behavior(request: Any, call: Any) -> bytes:
        scope = deadlines.current_call.get()
        assert scope is not None
        scope.on_end(lambda: ended.append("early"))
        return b""

    harness.path.wrap(f"/{SERVICE_NAME}/GetJwks", _scripted(behavior)).unary_unary(b"", context)
    context.terminate()  # grpcio runs the callbacks of every call when it ends
    assert ended == []


def test_a_call_ended_at_shutdown_is_unavailable_so_that_clients_retry(harness: Harness) -> None:
    started, release = threading.Event(), threading.Event()

    def behavior(request: Any, call: Any) -> bytes:
        scope = deadlines.current_call.get()
        assert scope is not None
        scope.on_end(release.set)  # e.g. a database statement cancelled
        started.set()
        release.wait(10)
        raise OperationalError("SELECT", {}, Exception("canceling statement"))

    wrapped = harness.path.wrap(f"/{SERVICE_NAME}/GetJwks", _scripted(behavior))
    context = FakeContext()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            wrapped.unary_unary(b"", context)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(10)
    assert len(harness.path.in_flight) == 1
    assert harness.path.in_flight.terminate() == 1
    thread.join(10)
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.UNAVAILABLE
    status = rich_status(context.trailing)
    assert error_detail(status, error_details_pb2.ErrorInfo).reason == "SHUTTING_DOWN"
    assert error_detail(status, error_details_pb2.RetryInfo) is not None
    assert len(harness.path.in_flight) == 0
