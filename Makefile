# Two commands do all the set-up on a fresh machine: `make demo` (metaif and the demo) and `make test`
# (adds the test extras, then runs the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench notebooks docs clean

# metaif and what it needs to run (`make demo`): no test tools.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The development environment: the above plus the test extras (`make test`, docs, notebooks).
$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/metaif demo --out demo-out
	@echo "The metaif command is $(VENV)/bin/metaif (or run 'source $(VENV)/bin/activate' first, then 'metaif')."

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
