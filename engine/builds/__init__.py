"""Builds of environments: container images (Docker) and virtualenvs (the local runner)."""
