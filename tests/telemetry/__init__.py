"""Test helpers for meshproxy.telemetry (importable as ``telemetry.*`` since tests/ is on sys.path)."""
