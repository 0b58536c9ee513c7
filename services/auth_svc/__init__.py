"""auth_svc: accounts, login, access and refresh tokens, service accounts, public keys."""

SERVICE_NAME = "agentplatform.auth.v1.AuthService"
TOKEN_SERVICE_NAME = "agentplatform.auth.v1.TokenService"
SERVICE_ACCOUNT_SERVICE_NAME = "agentplatform.auth.v1.ServiceAccountService"
USER_SERVICE_NAME = "agentplatform.auth.v1.UserService"
SESSION_SERVICE_NAME = "agentplatform.auth.v1.SessionService"
AUDIT_SERVICE_NAME = "agentplatform.auth.v1.AuditService"
SIGNING_KEY_SERVICE_NAME = "agentplatform.auth.v1.SigningKeyService"
SERVICE_NAMES = (
    SERVICE_NAME,
    TOKEN_SERVICE_NAME,
    SERVICE_ACCOUNT_SERVICE_NAME,
    USER_SERVICE_NAME,
    SESSION_SERVICE_NAME,
    AUDIT_SERVICE_NAME,
    SIGNING_KEY_SERVICE_NAME,
)
# The methods anyone may call without a token (each limited per client address instead),
# by short name (the names AUTH_RATE_LIMITS uses) and by full name.
_PUBLIC_AUTH = ("Register", "Login", "RefreshToken", "Logout", "GetJwks", "GetRevocations")
PUBLIC_METHOD_NAMES = frozenset({*_PUBLIC_AUTH, "IssueToken"})
PUBLIC_METHODS = frozenset(
    {
        *(f"/{SERVICE_NAME}/{name}" for name in _PUBLIC_AUTH),
        f"/{TOKEN_SERVICE_NAME}/IssueToken",
    }
)
