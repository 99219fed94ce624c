"""Benchmarks: scripts that print figures (`uv run python -m tests.bench.<name>`), never collected by pytest."""
