# Two commands do all set-up on a fresh machine:
#   make demo   install, simulate the small apoferritin data set and run the tutorial workflow
#   make test   install and run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: install demo test test-all bench

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"

demo: install
	$(VENV)/bin/tomopipe demo --out demo_out --preset small --jobs $(JOBS)

test: install
	$(PY) -m pytest -n $(JOBS) -q

test-all: install
	$(PY) -m pytest -n $(JOBS) -q -m "slow or not slow"

bench: install
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done
