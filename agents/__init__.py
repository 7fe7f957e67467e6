"""wam.agents."""
