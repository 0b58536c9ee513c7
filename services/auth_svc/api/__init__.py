"""api layer of auth_svc."""
