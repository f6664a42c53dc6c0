"""Kernel tests: without a GPU, run every @triton.jit kernel through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when it
decorates). On the GPU machine it is left alone, so the real compiled launch path runs.
"""

import os

import jax

if jax.default_backend() != "gpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
