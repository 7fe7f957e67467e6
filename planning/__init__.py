"""wam.planning."""
