# Two commands do all set-up: `make demo` (the main job) and `make test`. Both create or reuse a
# virtual environment in $(VENV), install torch and build this package into it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu)

.PHONY: demo test

$(PY):
	$(PYTHON) -m venv $(VENV)

# The build is redone when a C++/CUDA source or the build files change.
$(VENV)/.built: $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)" numpy pytest ninja
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: $(VENV)/.built
	$(VENV)/bin/polyprune demo --out runs/demo

test: $(VENV)/.built
	$(PY) -m pytest -q tests
