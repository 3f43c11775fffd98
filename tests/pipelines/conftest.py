"""Pipeline-tier fixtures live in tests/conftest.py (shared with the serve tier)."""
