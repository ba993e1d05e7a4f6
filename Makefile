# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/metaif demo --out demo-out

# Each test file runs in its own process, two at a time (the suite's budget is 15 minutes on 2 cores;
# a fresh process per file also keeps XLA's compiled-code caches from growing across files).
test: $(VENV)/.installed
	ls tests/test_*.py | xargs -P 2 -n 1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) *.egg-info
