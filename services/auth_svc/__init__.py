"""auth_svc: accounts, login, access and refresh tokens, public keys."""

SERVICE_NAME = "agentplatform.auth.v1.AuthService"
# The methods anyone may call without a token (each limited per client address instead).
PUBLIC_METHOD_NAMES = frozenset({"Register", "Login", "RefreshToken", "Logout", "GetJwks"})
