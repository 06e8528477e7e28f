"""Labeling work: projects, tasks, leases, the review loop, quality and people."""
