# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+ and pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes of `make test`: the CPUs this process may run on (`make test TESTERS=1`: one).
TESTERS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/tutorial_part4.py
	$(VENV)/bin/fedsecure run examples/digits.toml --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks notebooks
	$(VENV)/bin/mypy
	# A test process per CPU, each test file in one of them (its module fixtures start once);
	# then the tests marked `alone` (Ray's), one after the other.
	$(PY) -m pytest -n $(TESTERS) --dist loadfile -m "not alone"
	$(PY) -m pytest -m alone

bench: $(STAMP)
	$(PY) benchmarks/pointer_overhead.py
	$(PY) benchmarks/model_transfer.py
	$(PY) benchmarks/process_floor.py
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/secure_aggregation.py
	$(PY) benchmarks/fl_scale.py

docs: $(STAMP)
	$(PY) -c "from fedsecure.worker.allowlist import markdown; print(markdown(), end='')" > docs/allowlist.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
