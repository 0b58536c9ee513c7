"""agent_svc: the registry of agent configurations, owned per user, served from a cache."""

SERVICE_NAME = "agentplatform.agent.v1.AgentService"
