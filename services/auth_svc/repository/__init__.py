"""repository layer of auth_svc."""
