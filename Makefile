# The two commands of the README:
#   make demo   - set up and run the local mesh demo (control plane on its embedded store)
#   make test   - set up and run the test suite (what CI runs)
.PHONY: setup test test-slow demo bench

setup:
	./scripts/setup.sh

test: setup
	.venv/bin/python -m pytest tests

test-slow: setup
	.venv/bin/python -m pytest tests -m slow

demo: setup
	.venv/bin/python -m controlplane.demo

bench: setup
	.venv/bin/python benchmarks/run.py
