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

test: .venv/installed
	$(PY) -m pytest -q

test-slow: .venv/installed
	$(PY) -m pytest -q -m slow

bench: .venv/installed
	$(PY) -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
