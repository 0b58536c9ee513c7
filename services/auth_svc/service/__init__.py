"""service layer of auth_svc."""
