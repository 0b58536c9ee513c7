"""service layer of agent_svc."""
