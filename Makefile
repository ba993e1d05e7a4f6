# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench notebooks docs clean

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

# Re-execute every notebook in place at full size (refreshes the committed outputs; ~15 min on 2 cores).
notebooks: $(VENV)/.installed
	$(PY) notebooks/run_all.py --size full

# Regenerate docs/api.md from the docstrings (tests/test_docs.py fails when it is stale).
docs: $(VENV)/.installed
	$(PY) docs/build_api.py

clean:
	rm -rf $(VENV) *.egg-info
