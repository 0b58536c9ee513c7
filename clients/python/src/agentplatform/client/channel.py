"""`connect()`: a channel to auth_svc or agent_svc with deadlines, retries and tokens.

What a channel from `connect` does for every unary call (the generated stubs' and the
typed clients' alike):

- **Deadline**: a call without `timeout` gets its method's default (DEFAULT_TIMEOUTS,
  else `default_timeout`); the service config carries the same values.
- **Token**: with `credentials` (a TokenSource), `authorization: Bearer <token>` is added.
  On UNAUTHENTICATED with reason TOKEN_EXPIRED or INVALID_TOKEN the token is dropped, a
  fresh one fetched, and the call sent once more (once: a second refusal is raised).
- **UNAVAILABLE** is retried by gRPC itself (the service config's retryPolicy: up to 4
  attempts, exponential backoff from 0.1 s), for the methods in RETRIED_ON_UNAVAILABLE
  only. The servers put their RetryInfo delay in the `grpc-retry-pushback-ms` trailer, and
  gRPC waits exactly that long before the next attempt. A retry throttle (gRFC A6) stops
  retrying when most calls fail. Those methods are safe to repeat: reads; CreateAgent
  (the typed client always sends a request_id, so a repeat returns the first response);
  UpdateAgent and DeleteAgent (a repeat of one that took effect gets ABORTED ETAG_MISMATCH
  with an etag, NOT_FOUND for a delete: read again); RollbackAgent (a repeat rolls back
  to the same configuration: no new revision) and TagAgentRevision (the same pointer
  again); UndeleteAgent, UntagAgentRevision and PurgeAgent (a repeat of one that took
  effect gets ALREADY_EXISTS AGENT_NOT_DELETED, NOT_FOUND ALIAS_NOT_FOUND, NOT_FOUND:
  read again); Login, Logout.
- **RESOURCE_EXHAUSTED with a RetryInfo** (rate limits, busy hashing, LOGIN_LOCKED) is
  retried here after exactly that delay, if the delay ends before the call's deadline
  (else it is raised at once, not slept through), at most MAX_ATTEMPTS attempts. A
  RESOURCE_EXHAUSTED with a QuotaFailure (AGENT_QUOTA_EXCEEDED) is never retried.
- **Streams** (STREAMS: WatchAgents) get the token too, but no default deadline and no
  retries: AgentsClient.watch resumes them itself.
- **Never retried** (NEVER_RETRIED): RefreshToken, because every use rotates the refresh
  token: a repeat of a call that reached the server presents the rotated-out token, and
  after the reuse grace window (AUTH_REFRESH_REUSE_GRACE_SECONDS, 5 s; a pushback delay
  can be longer) that revokes the whole token family, logging the user out everywhere.
  IssueToken, because a private_key_jwt assertion may be used once: the TokenClient retries
  it itself with a fresh assertion. Register and ChangePassword, which are not idempotent
  (EMAIL_TAKEN, WRONG_PASSWORD after a first attempt that took effect).

Streaming calls (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentplatform.client.credentials import TokenSource
from agentplatform.client.errors import decode

__all__ = [
    "DEFAULT_TIMEOUTS",
    "MAX_ATTEMPTS",
    "NEVER_RETRIED",
    "RETRIED_ON_UNAVAILABLE",
    "CallPolicy",
    "PolicyChannel",
    "connect",
    "intercept",
    "service_config",
]

AGENT = "agentplatform.agent.v1.AgentService"
AUTH = "agentplatform.auth.v1.AuthService"
TOKEN = "agentplatform.auth.v1.TokenService"
ACCOUNTS = "agentplatform.auth.v1.ServiceAccountService"

# Default deadlines (seconds) per method; others get `default_timeout`. Password hashing
# queues (Login, Register, ChangePassword) and big list pages get more.
DEFAULT_TIMEOUT = 10.0
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    f"/{AUTH}/Login": 15.0,
    f"/{AUTH}/Register": 15.0,
    f"/{AUTH}/ChangePassword": 15.0,
    f"/{AGENT}/ListAgents": 20.0,
}
RETRIED_ON_UNAVAILABLE: frozenset[str] = frozenset(
    {
        f"/{AGENT}/CreateAgent",
        f"/{AGENT}/GetAgent",
        f"/{AGENT}/BatchGetAgents",
        f"/{AGENT}/ListModels",
        f"/{AGENT}/ListAgents",
        f"/{AGENT}/UpdateAgent",
        f"/{AGENT}/DeleteAgent",
        f"/{AGENT}/UndeleteAgent",
        f"/{AGENT}/PurgeAgent",
        f"/{AGENT}/ListAgentRevisions",
        f"/{AGENT}/RollbackAgent",
        f"/{AGENT}/TagAgentRevision",
        f"/{AGENT}/UntagAgentRevision",
        f"/{AUTH}/Login",
        f"/{AUTH}/Logout",
        f"/{AUTH}/GetJwks",
        f"/{AUTH}/GetCurrentUser",
        f"/{ACCOUNTS}/GetServiceAccount",
        f"/{ACCOUNTS}/ListServiceAccounts",
    }
)
NEVER_RETRIED: frozenset[str] = frozenset(
    {
        f"/{AUTH}/RefreshToken",
        f"/{AUTH}/Register",
        f"/{AUTH}/ChangePassword",
        f"/{TOKEN}/IssueToken",
    }
)
# Server-streaming methods: no default deadline.
STREAMS: frozenset[str] = frozenset({f"/{AGENT}/WatchAgents"})
# Attempts of one call on RESOURCE_EXHAUSTED with a RetryInfo (the first included).
MAX_ATTEMPTS = 3
# The reasons after which a fresh token is fetched and the call sent once more.
REFRESH_REASONS = frozenset({"TOKEN_EXPIRED", "INVALID_TOKEN"})


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _names(methods: Iterable[str]) -> list[dict[str, str]]:
    names = []
    for method in sorted(methods):
        service, name = method.lstrip("/").split("/")
        names.append({"service": service, "method": name})
    return names


def service_config(
    *,
    default_timeout: float = DEFAULT_TIMEOUT,
    timeouts: Mapping[str, float] = DEFAULT_TIMEOUTS,
    retries: bool = True,
) -> dict[str, Any]:
    """The channel's service config (gRFC A6 retries, per-method timeouts)."""
    retry_policy = {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    configs: list[dict[str, Any]] = []
    by_timeout: dict[tuple[float, bool], list[str]] = {}
    for method in RETRIED_ON_UNAVAILABLE | NEVER_RETRIED | set(timeouts):
        retried = retries and method in RETRIED_ON_UNAVAILABLE
        key = (timeouts.get(method, default_timeout), retried)
        by_timeout.setdefault(key, []).append(method)
    for (timeout, retried), methods in sorted(by_timeout.items()):
        config: dict[str, Any] = {"name": _names(methods), "timeout": _duration(timeout)}
        if retried:
            config["retryPolicy"] = retry_policy
        configs.append(config)
    # Streams: no deadline (the config's most specific name wins over the service's).
    configs.append({"name": _names(STREAMS)})
    # Every other method of the four services: the default deadline, no retries.
    configs.append(
        {
            "name": [{"service": s} for s in (AGENT, AUTH, TOKEN, ACCOUNTS)],
            "timeout": _duration(default_timeout),
        }
    )
    return {
        "methodConfig": configs,
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


@dataclass(frozen=True)
class CallPolicy:
    """What the channel adds to each unary call (see the module's docstring)."""

    credentials: TokenSource | None = None
    default_timeout: float | None = DEFAULT_TIMEOUT
    timeouts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    max_attempts: int = MAX_ATTEMPTS
    never_retried: frozenset[str] = NEVER_RETRIED
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def timeout_for(self, method: str) -> float | None:
        return self.timeouts.get(method, self.default_timeout)


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __init__(self, inner: Any, method: str, policy: CallPolicy) -> None:
        self._inner = inner
        self._method = method
        self._policy = policy

    def __call__(  # noqa: PLR0917 - grpc.UnaryUnaryMultiCallable's signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] | None = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        response, _ = self.with_call(
            request, timeout, metadata, credentials, wait_for_ready, compression
        )
        return response

    def with_call(  # noqa: PLR0917 - grpc.UnaryUnaryMultiCallable's signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] | None = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> tuple[Any, Any]:
        policy = self._policy
        if timeout is None:
            timeout = policy.timeout_for(self._method)
        deadline = None if timeout is None else policy.clock() + timeout
        extra = _extra(credentials, wait_for_ready, compression)
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            token = policy.credentials.token() if policy.credentials is not None else None
            remaining = None if deadline is None else max(0.0, deadline - policy.clock())
            try:
                return self._inner.with_call(  # type: ignore[no-any-return]
                    request, timeout=remaining, metadata=_with_token(metadata, token), **extra
                )
            except grpc.RpcError as rpc_error:
                if token is not None and not refreshed and _expired_token(rpc_error):
                    assert policy.credentials is not None
                    policy.credentials.invalidate(token)
                    refreshed = True
                    continue
                delay = self._pushback(rpc_error, attempt, deadline)
                if delay is None:
                    raise
                policy.sleep(delay)

    def _pushback(self, rpc_error: Any, attempt: int, deadline: float | None) -> float | None:
        """The delay after which to send the call again, or None to raise its error:
        RESOURCE_EXHAUSTED with a RetryInfo whose delay ends before the deadline."""
        policy = self._policy
        if (
            rpc_error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
            or self._method in policy.never_retried
            or attempt >= policy.max_attempts
        ):
            return None
        error = decode(rpc_error)
        delay = error.retry_delay
        if not error.retryable or delay is None:
            return None
        if deadline is not None and policy.clock() + delay >= deadline:
            return None
        return delay

    def future(  # noqa: PLR0917 - grpc.UnaryUnaryMultiCallable's signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] | None = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """The call as a future: the token and the deadline, without this layer's retries
        (gRPC's own UNAVAILABLE retries still apply)."""
        policy = self._policy
        if timeout is None:
            timeout = policy.timeout_for(self._method)
        token = policy.credentials.token() if policy.credentials is not None else None
        extra = _extra(credentials, wait_for_ready, compression)
        return self._inner.future(
            request, timeout=timeout, metadata=_with_token(metadata, token), **extra
        )


class _UnaryStream:
    """A server-streaming method: the token is added; no deadline unless given (a stream
    lives as long as its reader wants), no retries (the reader resumes: AgentsClient.watch)."""

    def __init__(self, inner: Any, policy: CallPolicy) -> None:
        self._inner = inner
        self._policy = policy

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] | None = None,
        **extra: Any,
    ) -> Any:
        credentials = self._policy.credentials
        token = credentials.token() if credentials is not None else None
        return self._inner(request, timeout=timeout, metadata=_with_token(metadata, token), **extra)


def _expired_token(rpc_error: Any) -> bool:
    """UNAUTHENTICATED for a reason a fresh token cures."""
    return bool(
        rpc_error.code() == grpc.StatusCode.UNAUTHENTICATED
        and decode(rpc_error).reason in REFRESH_REASONS
    )


def _extra(credentials: Any, wait_for_ready: bool | None, compression: Any) -> dict[str, Any]:
    """Only the options that are set (grpc_testing's channels take no others)."""
    extra: dict[str, Any] = {}
    if credentials is not None:
        extra["credentials"] = credentials
    if wait_for_ready is not None:
        extra["wait_for_ready"] = wait_for_ready
    if compression is not None:
        extra["compression"] = compression
    return extra


def _with_token(
    metadata: Sequence[tuple[str, Any]] | None, token: str | None
) -> list[tuple[str, Any]] | None:
    if token is None:
        return list(metadata) if metadata is not None else None
    kept = [(k, v) for k, v in metadata or () if k.lower() != "authorization"]
    return [*kept, ("authorization", f"Bearer {token}")]


class PolicyChannel(grpc.Channel):  # type: ignore[misc]
    """A grpc.Channel whose unary calls follow a CallPolicy; everything else delegates."""

    def __init__(self, channel: Any, policy: CallPolicy) -> None:
        self._channel = channel
        self.policy = policy

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> _UnaryUnary:
        inner = self._channel.unary_unary(
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )
        return _UnaryUnary(inner, method, self.policy)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryStream(self._channel.unary_stream(method, *args, **kwargs), self.policy)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(*args, **kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(*args, **kwargs)

    def subscribe(self, callback: Callable[[Any], None], try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[Any], None]) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PolicyChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def intercept(
    channel: Any,
    credentials: TokenSource | None = None,
    *,
    default_timeout: float | None = DEFAULT_TIMEOUT,
    timeouts: Mapping[str, float] = DEFAULT_TIMEOUTS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> PolicyChannel:
    """Wraps any grpc.Channel (one of your own, a grpc_testing channel) with the policy;
    its own service config, if any, is what decides gRPC-level retries."""
    policy = CallPolicy(
        credentials=credentials,
        default_timeout=default_timeout,
        timeouts=dict(timeouts),
        sleep=sleep,
        clock=clock,
    )
    return PolicyChannel(channel, policy)


# Keepalive: a ping after 30 s without traffic on a connection with calls in flight
# (the servers accept pings every 10 s), dropped if unanswered within 10 s.
KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)


# A channel for WatchAgents streams: a fixed 16 KiB receive window per stream, without
# gRPC's BDP probing. With probing (the default) a stream's window grows to 4 MiB or more
# as soon as data flows, and a watcher that reads slower than changes come has seconds of
# small messages queued in its own transport, invisible to the server, each change older
# than the last. With a small window the server's next send waits until the watcher has
# read, and the changes committed meanwhile come in one message: a slow watcher gets
# fewer, bigger messages instead of a queue (docs/watch.md, "Flow control"). The price:
# data not yet asked for arrives 16 KiB per round trip (a message being waited for is let
# in whole), and the connection's window is as small, shared by the channel's streams.
WATCH_STREAM_WINDOW = 16 * 1024
WATCH_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", WATCH_STREAM_WINDOW),
)


def connect(
    target: str,
    credentials: TokenSource | None = None,
    *,
    tls: grpc.ChannelCredentials | None = None,
    tls_server_name: str | None = None,
    default_timeout: float = DEFAULT_TIMEOUT,
    timeouts: Mapping[str, float] = DEFAULT_TIMEOUTS,
    retries: bool = True,
    watch: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> PolicyChannel:
    """A channel to `target` ("host:port", "dns:///name:port"). Plaintext without `tls`
    (a mesh, a local test); with `tls` (grpc.ssl_channel_credentials(...), with a client
    certificate for mTLS) the server is verified, under `tls_server_name` if given.
    `credentials`: where tokens come from (None for public methods only). `watch`: a
    channel for WatchAgents (`AgentsClient(..., watch_channel=...)`): a small fixed stream
    window (WATCH_CHANNEL_OPTIONS). `options` are added to (and override) the defaults:
    keepalive and the service config."""
    config = service_config(default_timeout=default_timeout, timeouts=timeouts, retries=retries)
    merged: dict[str, Any] = dict(KEEPALIVE_OPTIONS)
    if watch:
        merged.update(WATCH_CHANNEL_OPTIONS)
    merged["grpc.service_config"] = json.dumps(config)
    merged["grpc.enable_retries"] = 1 if retries else 0
    if tls_server_name:
        merged["grpc.ssl_target_name_override"] = tls_server_name
    merged.update(dict(options))
    channel_options = list(merged.items())
    if tls is None:
        channel = grpc.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.secure_channel(target, tls, options=channel_options)
    return intercept(channel, credentials, default_timeout=default_timeout, timeouts=timeouts)
