# Conveniences; the README's two commands are ./scripts/demo and ./scripts/test.
.PHONY: setup test test-slow demo bench

setup:
	./scripts/setup.sh

test:
	./scripts/test

test-slow:
	./scripts/test -m slow

demo:
	./scripts/demo

bench: setup
	.venv/bin/python benchmarks/run.py
