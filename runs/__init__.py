"""wam.runs."""
