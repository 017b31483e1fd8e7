"""Data plumbing shared by the packages: splits, samplers, the image store, the demo cache."""
