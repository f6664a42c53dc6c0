# The two set-up commands of a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.base-installed
TEST_STAMP := $(VENV)/.test-installed
# torch 2.13.0 is the CPU build a CPU machine has on disk; installing it first keeps the
# `torch` requirements of the extras (and of bitsandbytes, and of the demo model's wheel through
# sentence-transformers) from pulling CUDA wheels.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

demo: $(BASE_STAMP)
	$(PY) -m qflax demo

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
