"""qflax_kernels: Triton GPU kernels and their JAX launchers (jax-triton).

Knows nothing of Flax or torch. triton and jax_triton are imported lazily inside the
launchers, so importing this package works on machines without them.

Modules: ``int8_gemm`` (int8 GEMM with the dequant/bias/outlier epilogue), ``int8_quant`` (fused
int8 quantizers), ``int8_launch`` (their jax-triton launchers with custom_vmap rules; imports
jax_triton, so only import it where a GPU is present).
"""
