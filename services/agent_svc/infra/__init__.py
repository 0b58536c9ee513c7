"""infra layer of agent_svc."""
