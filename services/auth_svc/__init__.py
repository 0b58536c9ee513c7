"""auth_svc: accounts, login, access and refresh tokens, service accounts, public keys."""

SERVICE_NAME = "agentplatform.auth.v1.AuthService"
TOKEN_SERVICE_NAME = "agentplatform.auth.v1.TokenService"
SERVICE_ACCOUNT_SERVICE_NAME = "agentplatform.auth.v1.ServiceAccountService"
SERVICE_NAMES = (SERVICE_NAME, TOKEN_SERVICE_NAME, SERVICE_ACCOUNT_SERVICE_NAME)
# The methods anyone may call without a token (each limited per client address instead),
# by short name (the names AUTH_RATE_LIMITS uses) and by full name.
PUBLIC_METHOD_NAMES = frozenset(
    {"Register", "Login", "RefreshToken", "Logout", "GetJwks", "IssueToken"}
)
PUBLIC_METHODS = frozenset(
    {
        *(
            f"/{SERVICE_NAME}/{name}"
            for name in ("Register", "Login", "RefreshToken", "Logout", "GetJwks")
        ),
        f"/{TOKEN_SERVICE_NAME}/IssueToken",
    }
)
