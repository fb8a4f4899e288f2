# Two commands do all the set-up on a fresh machine:
#   make demo   runs memopt's demo (creates .venv and installs everything first)
#   make test   runs the test suite (same set-up)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU machines carry a PyTorch 2.13.0 CPU wheel on disk; naming the exact version
# keeps pip from downloading a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/memopt demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
