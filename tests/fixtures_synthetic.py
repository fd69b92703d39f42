"""Shared pytest fixtures (fixtures_synthetic)."""
