"""agentplatform.client: typed errors, token sources, channels and clients for calling
auth_svc and agent_svc from another service (see clients/python/README.md).

    from agentplatform.client import AgentsClient, client_secret, connect

    auth = connect("auth:50051", tls=tls)
    tokens = client_secret(auth, "my-service-account-id", secret, scope="agents.read")
    agents = AgentsClient(connect("agent:50052", tokens, tls=tls))
    for agent in agents.list(filter='model = "gpt-4o"'):
        print(agent.name)
"""

from agentplatform.client.agents import AgentsClient, ModelDeprecatedWarning
from agentplatform.client.channel import (
    DEFAULT_TIMEOUTS,
    NEVER_RETRIED,
    RETRIED_ON_UNAVAILABLE,
    WATCH_CHANNEL_OPTIONS,
    PolicyChannel,
    connect,
    intercept,
    service_config,
)
from agentplatform.client.credentials import (
    AccessToken,
    CachedTokenSource,
    ClientSecret,
    PrivateKeyJwt,
    StaticToken,
    TokenSource,
    client_secret,
    delegated,
    private_key_jwt,
    static_token,
)
from agentplatform.client.errors import (
    Aborted,
    AgentPlatformError,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    decode,
)
from agentplatform.client.tokens import TokenClient

__all__ = [
    "DEFAULT_TIMEOUTS",
    "NEVER_RETRIED",
    "RETRIED_ON_UNAVAILABLE",
    "WATCH_CHANNEL_OPTIONS",
    "Aborted",
    "AccessToken",
    "AgentPlatformError",
    "AgentsClient",
    "AlreadyExists",
    "CachedTokenSource",
    "Cancelled",
    "ClientSecret",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "ModelDeprecatedWarning",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PolicyChannel",
    "PrivateKeyJwt",
    "QuotaViolation",
    "ResourceExhausted",
    "StaticToken",
    "TokenClient",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "client_secret",
    "connect",
    "decode",
    "delegated",
    "intercept",
    "private_key_jwt",
    "service_config",
    "static_token",
]
