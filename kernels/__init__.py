"""qflax_kernels: Triton GPU kernels, their launches, and the JAX primitive that runs them.

Knows nothing of Flax. triton (and torch, for ``torch_launch``) is imported lazily, so importing
this package works on machines without them.

One op, one place:
- ``launch``: what a kernel launch is (kernel, grid, constexprs, runtime scalars, outputs).
- ``triton_call``: the JAX primitive running a launch (GPU: a custom call XLA captures in its
  command buffers; CPU: Triton's interpreter). ``torch_launch``: the same launch on torch tensors.
- 4-bit: ``fourbit_triton`` (kernels), ``fourbit_decode`` (register decode), ``fourbit_plan``
  (tiles, split-K), ``fourbit_launch`` (arguments and outputs), ``fourbit_jax`` (JAX launchers).
- int8: ``int8_gemm`` / ``int8_quant`` (kernels and their meta), ``int8_specs`` (launches),
  ``int8_launch`` (JAX launchers with custom_vmap rules).
"""
