"""Server interceptors: per-call logging, error mapping and token checking.

Order on the server (outermost first): [tracing →] Metrics → AccessLog → ErrorMapping →
TokenCheck (shared/observability.py builds the chain). The three here wrap the unary
behaviour of our own services only; the library's health and reflection services pass
through untouched (not logged, and they need no token).

The servicer reads the caller with `principal_of(context)` and hands the Principal to the
service layer as an argument: no thread-locals, no globals.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.rpc.errors import (
    DomainError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.security.tokens import Principal, TokenVerifier

__all__ = [
    "REQUEST_ID_HEADER",
    "AccessLogInterceptor",
    "CallContext",
    "ErrorMappingInterceptor",
    "TokenCheckInterceptor",
    "principal_of",
    "request_id_from",
    "status_for",
]

_log = logging.getLogger("agentplatform.rpc")
_access = logging.getLogger("agentplatform.access")

Behavior = Callable[[Any, Any], Any]
OWN_SERVICES_PREFIX = "/agentplatform."


class CallContext:
    """The servicer context plus what the interceptors learned about the call."""

    __slots__ = ("_context", "principal", "request_id")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self.principal: Principal | None = None
        self.request_id = ""

    @staticmethod
    def of(context: Any) -> CallContext:
        return context if isinstance(context, CallContext) else CallContext(context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def principal_of(context: Any) -> Principal:
    """The caller that the token check authenticated; Unauthenticated if there is none."""
    principal = context.principal if isinstance(context, CallContext) else None
    if principal is None:
        raise Unauthenticated("missing access token", reason="MISSING_TOKEN")
    return principal


def _wrap(
    handler: grpc.RpcMethodHandler | None,
    method: str,
    wrapper: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None or not method.startswith(OWN_SERVICES_PREFIX):
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrapper(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item in details.invocation_metadata or ():
        if item.key == key:
            value = item.value
            return value.decode() if isinstance(value, bytes) else value
    return None


def status_for(error: DomainError, domain: str) -> grpc.Status:
    """The rich status (google.rpc.Status with details) for a domain error."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    ]
    if isinstance(error, InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, ResourceExhausted) and error.quota_violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in error.quota_violations
                ]
            )
        )
    elif isinstance(error, ResourceExhausted | Unavailable):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return rpc_status.to_status(status)


class ErrorMappingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Domain errors → status + google.rpc details; anything else → a bare INTERNAL."""

    def __init__(
        self,
        domain: str,
        translators: Iterable[Callable[[Exception], DomainError | None]] = (),
    ) -> None:
        self._domain = domain
        # Turn infrastructure failures the caller can retry (a database that does not
        # answer) into domain errors instead of INTERNAL.
        self._translators = tuple(translators)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        return _wrap(continuation(details), details.method, self._mapped)

    def _mapped(self, behavior: Behavior) -> Behavior:
        domain = self._domain

        def call(request: Any, context: Any) -> Any:
            try:
                return behavior(request, context)
            except DomainError as error:
                _abort(context, status_for(error, domain))
            except Exception as exc:
                translated = self._translate(exc)
                if translated is not None:
                    _log.warning("%s: %s", translated.reason, exc.__class__.__name__)
                    _abort(context, status_for(translated, domain))
                _log.exception("unexpected error", extra={"request_id": _request_id(context)})
                _abort(context, status_for(Internal("internal error"), domain))
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return call

    def _translate(self, exc: Exception) -> DomainError | None:
        for translate in self._translators:
            translated = translate(exc)
            if translated is not None:
                return translated
        return None


def _abort(context: Any, status: grpc.Status) -> None:
    """What `abort_with_status` does, spelled out so grpcio-testing's context runs it too."""
    context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.details)


def _request_id(context: Any) -> str:
    return context.request_id if isinstance(context, CallContext) else ""


# The library's own services that need no token (probes, grpcurl's reflection).
PUBLIC_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class TokenCheckInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Requires a valid bearer access token on every method that is not listed as public
    (by name, or as one of PUBLIC_SERVICES): deny by default, streaming methods included."""

    def __init__(self, verifier: TokenVerifier, public_methods: Iterable[str]) -> None:
        self._verifier = verifier
        self._public = frozenset(public_methods)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method
        if handler is None or method in self._public or method.startswith(PUBLIC_SERVICES):
            return handler
        header = _metadata(details, "authorization")
        if handler.unary_unary is not None:
            # Checked inside the call, so the error-mapping interceptor sees Unauthenticated.
            return grpc.unary_unary_rpc_method_handler(
                self._checked(handler.unary_unary, header),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return self._checked_stream(handler, header)

    def _checked(self, behavior: Behavior, header: str | None) -> Behavior:
        def call(request: Any, context: Any) -> Any:
            ctx = CallContext.of(context)
            ctx.principal = self._verifier.verify(_bearer_token(header))
            return behavior(request, ctx)

        return call

    def _checked_stream(self, handler: Any, header: str | None) -> Any:
        """A streaming method: the token is checked before the stream starts."""
        try:
            principal: Principal | None = self._verifier.verify(_bearer_token(header))
            refusal = ""
        except Unauthenticated as error:
            principal, refusal = None, error.message

        def wrap(behavior: Behavior) -> Behavior:
            def call(request: Any, context: Any) -> Any:
                if principal is None:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
                ctx = CallContext.of(context)
                ctx.principal = principal
                return behavior(request, ctx)

            return call

        for kind, make in (
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(
                    wrap(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def _bearer_token(header: str | None) -> str:
    if not header:
        raise Unauthenticated("missing access token", reason="MISSING_TOKEN")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'", reason="MISSING_TOKEN")
    return token.strip()


REQUEST_ID_HEADER = "x-request-id"
# What a caller's request id may look like to be kept (and logged); anything else is
# replaced by a fresh id rather than copied into our logs.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id_from(details: grpc.HandlerCallDetails) -> str:
    """The caller's `x-request-id` if it is a sane token, else a new random one."""
    given = _metadata(details, REQUEST_ID_HEADER)
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class AccessLogInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """One log line per call: method, code, duration, peer, request id, user.

    The request id (the caller's `x-request-id`, or a generated one) is sent back at once
    as initial metadata (response headers), so the caller has it on errors too, whatever
    happens after; the servicer finds it in `CallContext.request_id`. (So a servicer
    cannot send initial metadata of its own: it would use trailing metadata.)"""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        return _wrap(
            continuation(details),
            method,
            lambda behavior: self._logged(behavior, method, request_id_from(details)),
        )

    @staticmethod
    def _logged(behavior: Behavior, method: str, request_id: str) -> Behavior:
        echoed = ((REQUEST_ID_HEADER, request_id),)

        def call(request: Any, context: Any) -> Any:
            ctx = CallContext.of(context)
            ctx.request_id = request_id
            start = time.perf_counter()
            try:
                context.send_initial_metadata(echoed)
                return behavior(request, ctx)
            finally:
                duration_ms = (time.perf_counter() - start) * 1000
                code = context.code() or grpc.StatusCode.OK
                level = _level_for(code)
                if _access.isEnabledFor(level):
                    _access.log(
                        level,
                        "%s %s %.1fms",
                        method,
                        code.name,
                        duration_ms,
                        extra={
                            "rpc": {
                                "method": method,
                                "code": code.name,
                                "duration_ms": round(duration_ms, 3),
                                "peer": context.peer(),
                                "request_id": request_id,
                                "user_id": ctx.principal.user_id if ctx.principal else None,
                            }
                        },
                    )

        return call


_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
_WARN_CODES = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
    }
)


def _level_for(code: grpc.StatusCode) -> int:
    """Log levels by status code, as go-grpc-middleware's DefaultServerCodeToLevel."""
    if code == grpc.StatusCode.OK or code in _CLIENT_CODES:
        return logging.INFO
    if code in _WARN_CODES:
        return logging.WARNING
    return logging.ERROR
