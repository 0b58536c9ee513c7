"""repository layer of agent_svc."""
