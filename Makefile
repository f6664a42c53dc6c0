# The two set-up commands of a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
# torch 2.13.0 is the CPU build a CPU machine has on disk; pinning it in the same install keeps the
# `torch` requirements of the extras (and of bitsandbytes, and of the demo model's wheel through
# sentence-transformers) from pulling CUDA wheels. `pip install qflax` itself needs no torch.
TORCH_PIN ?= torch==2.13.0
# One resolution per stamp. --no-compile: Python byte-compiles, on first import, only the modules a run
# imports, instead of pip compiling every file of torch, transformers and the rest (half the install time).
PIP_INSTALL := $(PY) -m pip install -q --no-compile
# One pytest worker per core (pytest-xdist); tests sharing an expensive module fixture stay on one worker
# (xdist_group); the slow group (demo, notebooks) runs too.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: demo test clean

$(PY):
	python3 -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PIP_INSTALL) "$(TORCH_PIN)" -e ".[demo]"
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP_INSTALL) "$(TORCH_PIN)" -e ".[test,notebooks]"
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m qflax demo

# Byte-compiled modules are written (into .venv and the tree's __pycache__, both ignored) even where the
# machine sets PYTHONDONTWRITEBYTECODE: with --no-compile installs, every test process (xdist workers,
# notebook kernels, subprocess tests) would otherwise compile torch, transformers and jax from source
# again, several seconds each.
test: export PYTHONDONTWRITEBYTECODE =
test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
