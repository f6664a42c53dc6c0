# The two set-up commands of a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
# torch 2.13.0 is the CPU build a CPU machine has on disk; installing it first keeps the
# `torch` requirements of the extras (and of bitsandbytes, and of the demo model's wheel through
# sentence-transformers) from pulling CUDA wheels. `pip install qflax` itself needs no torch.
TORCH_PIN ?= torch==2.13.0
# One pytest worker per core (pytest-xdist); tests sharing an expensive module fixture stay on one worker
# (xdist_group); the slow group (demo, notebooks) runs too.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: demo test clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[demo]"
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m qflax demo

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
