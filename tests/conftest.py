"""Shared test settings: nothing here starts a service (see tests/integration/conftest.py)."""
