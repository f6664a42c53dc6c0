"""Kernel tests: without a GPU, run every @triton.jit kernel through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when it
decorates). On the GPU machine it is left alone, so the real compiled launch path runs.
"""

import os

import jax

if jax.default_backend() != "gpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import triton.language as tl
    from triton.runtime import interpreter

    _interpreter_dot = interpreter.InterpreterBuilder.create_dot

    def _dot_with_bfloat16(self, a, b, d, *args, **kwargs):
        """Triton 3.6's interpreter multiplies bfloat16 operands as their raw uint16 bits;
        widen them to float32 first (exact), as the GPU's bf16 MMA does."""
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return _interpreter_dot(self, a, b, d, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = _dot_with_bfloat16
