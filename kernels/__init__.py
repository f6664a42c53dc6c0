"""qflax_kernels: Triton GPU kernels and their JAX launchers (jax-triton).

Knows nothing of Flax or torch. triton and jax_triton are imported lazily inside the
launchers, so importing this package works on machines without them.
"""
