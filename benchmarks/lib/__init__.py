"""Helpers for the side-by-side benchmark harness (benchmarks/run.py)."""
