"""Settings from the environment, clocks, text rules."""
