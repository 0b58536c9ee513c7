"""TokenClient: agentplatform.auth.v1.TokenService/IssueToken, typed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from agentplatform.client.credentials import (
    ACCESS_TOKEN_TYPE,
    AccessToken,
    ClientAuth,
)
from agentplatform.client.errors import AgentPlatformError, decode

__all__ = ["TokenClient"]

# Not worth retrying with the same credentials: they are what failed.
_NOT_RETRIED_REASONS = frozenset({"CLIENT_THROTTLED"})


class TokenClient:
    """Issues access tokens (the OAuth token endpoint for machine callers).

    `channel` goes to auth_svc and needs no credentials (IssueToken is public); give it
    none: a channel whose token source used this client would wait for itself. A call
    that fails UNAVAILABLE, or RESOURCE_EXHAUSTED with a RetryInfo (not CLIENT_THROTTLED),
    is sent again after the delay with fresh client authentication (a new assertion: one
    may be used once), at most `attempts` times within `timeout`."""

    def __init__(
        self,
        channel: Any,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = auth_pb2_grpc.TokenServiceStub(channel)
        self._timeout = timeout
        self._attempts = attempts
        self._sleep = sleep
        self._clock = clock

    def issue(
        self,
        grant_type: str,
        client: ClientAuth,
        *,
        scope: str = "",
        subject_token: str = "",
        timeout: float | None = None,
    ) -> AccessToken:
        """One access token; errors are AgentPlatformError (decoded)."""
        deadline = self._clock() + (self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            request = auth_pb2.IssueTokenRequest(grant_type=grant_type, scope=scope)
            client.authenticate(request)
            if subject_token:
                request.subject_token = subject_token
                request.subject_token_type = ACCESS_TOKEN_TYPE
            started = self._clock()
            try:
                response = self._stub.IssueToken(request, timeout=max(0.0, deadline - started))
            except grpc.RpcError as rpc_error:
                error = decode(rpc_error)
                if not self._retry(error, attempt, deadline):
                    raise error from rpc_error
                continue
            return AccessToken(
                value=response.access_token,
                expires_at=started + response.expires_in,
                scope=response.scope,
            )

    def _retry(self, error: AgentPlatformError, attempt: int, deadline: float) -> bool:
        if attempt >= self._attempts or not error.retryable:
            return False
        if error.reason in _NOT_RETRIED_REASONS:
            return False
        delay = error.retry_delay if error.retry_delay is not None else 0.1 * 2 ** (attempt - 1)
        if self._clock() + delay >= deadline:
            return False
        self._sleep(delay)
        return True
