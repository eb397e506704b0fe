PY := .venv/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-slow bench clean

.venv/installed: pyproject.toml setup.py constraints.txt
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[all,test]'
	touch .venv/installed

demo: .venv/installed
	$(PY) train.py --config configs/ring.yaml --overwrite   # the demo starts afresh each time
	$(PY) sample.py --run runs/ring

# The suite on every core (at most 4 workers: each imports torch and JAX), one test file per worker at a time so a
# file's module fixtures are built once. PYTEST_ARGS adds options, e.g. make test PYTEST_ARGS=--durations=30.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_ARGS ?=

test: .venv/installed
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: .venv/installed
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m slow $(PYTEST_ARGS)

bench: .venv/installed
	$(PY) -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
