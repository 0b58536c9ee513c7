"""api layer of agent_svc."""
