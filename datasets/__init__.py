"""wam.datasets."""
