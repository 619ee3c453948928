# Two commands do all set-up: `make demo` (the main job) and `make test`. Both create or reuse a
# virtual environment in $(VENV), install torch and build this package, with every extra, into it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: demo test test-fast lint

$(PY):
	$(PYTHON) -m venv $(VENV)

# The build is redone when a C++/CUDA source or the build files change.
$(VENV)/.built: $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)" numpy ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[all,test]"
	touch $@

demo: $(VENV)/.built
	rm -rf runs/demo  # polyprune refuses to write into a folder that holds a run
	$(VENV)/bin/polyprune demo --out runs/demo

lint: $(VENV)/.built
	$(VENV)/bin/ruff check polyprune_ext
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -n auto tests

test-fast: $(VENV)/.built
	$(PY) -m pytest -q -n auto -m "not slow" tests
