"""infra layer of auth_svc."""
