"""Shared pytest fixtures (fixtures_lidc)."""
