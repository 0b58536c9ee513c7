"""auth_svc: accounts, login, access and refresh tokens, public keys."""

SERVICE_NAME = "agentplatform.auth.v1.AuthService"
