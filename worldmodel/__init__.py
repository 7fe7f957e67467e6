"""wam.worldmodel."""
