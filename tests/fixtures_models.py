"""Shared pytest fixtures (fixtures_models)."""
