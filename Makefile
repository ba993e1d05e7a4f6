# Two commands do all the set-up on a fresh machine: `make demo` (metaif and the demo) and `make test`
# (adds the development tools, then runs the tests).
# Developer loop: `make test` (fast lane), `make test-all` (both lanes), `make lint`, `make docs`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow test-all lint format bench notebooks docs docs-serve dist clean

# metaif and what it needs to run (`make demo`): no test tools.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cli]'
	touch $@

# The development environment: the above plus the test, lint and docs tools (`make test`, `make lint`, `make docs`).
$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/metaif demo --out demo-out
	@echo "The metaif command is $(VENV)/bin/metaif (or run 'source $(VENV)/bin/activate' first, then 'metaif')."

# Two lanes, each one pytest run over two worker processes (a file stays in one worker) with one
# summary line. JAX's persistent compilation cache: ~/.cache/metaif/jax-tests (tests/conftest.py).
# --max-worker-restart=0: a worker that crashes ends the run with an error (a restarted worker under
# --dist loadfile can leave the controller waiting forever).
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --max-worker-restart=0

# The fast lane: every test not marked slow.
test: $(VENV)/.installed
	$(PYTEST) -m "not slow"

# The slow lane: end-to-end tests (notebooks, experiments, kill-and-resume, fake devices, the wheel).
test-slow: $(VENV)/.installed
	$(PYTEST) -m slow

# Both lanes, one after the other (what CI runs).
test-all: test test-slow

# ruff (lint rules and the format check) and mypy, as configured in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Apply ruff's formatting to the whole tree.
format: $(VENV)/.installed
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(PY) benchmarks/core.py

# Re-execute every notebook in place at full size (refreshes the committed outputs; ~15 min on 2 cores).
notebooks: $(VENV)/.installed
	$(PY) notebooks/run_all.py --size full

# The documentation site into site/ (mkdocs.yml: material theme, API pages from the docstrings, the
# guides, the notebooks; docs/hooks.py generates the experiments and measured-results pages).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The same site, served at http://127.0.0.1:8000 and rebuilt on every change.
docs-serve: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# A wheel and an sdist in dist/.
dist: $(VENV)/.installed
	$(PY) -m build

clean:
	rm -rf $(VENV) *.egg-info site dist build
