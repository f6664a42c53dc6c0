"""The Triton branch of ``matmul_4bit``: when the fused kernels apply, and how to call them.

``qflax.ops.fourbit_matmul`` asks :func:`kernel_supports` at trace time and, when dispatch
picks "triton", calls :func:`forward` and (in the backward pass) :func:`grad_input`.
``qflax_kernels.fourbit_jax`` (and through it triton/jax-triton) is imported only then, so
importing qflax never needs them.
"""

import jax
import jax.numpy as jnp
import numpy as np

from qflax.ops import dispatch
from qflax.quant.fourbit import Packed4bit


# Where the fused kernels beat the XLA path (dequantize once, then cuBLAS), measured on an
# H100. float16/bfloat16 (register-decode kernels, benchmarks/results/bench_4bit-H100-*.json):
# faster at every measured M <= 256 on every benchmark shape. float32 (code-table kernels,
# the first results file): at every measured M <= 32, and up to M = 256 for layers with
# >= 8192 output features. Auto dispatch only picks the kernels inside these bounds.
HALF_PRECISION_ROWS = 256
SMALL_BATCH_ROWS = 32
WIDE_LAYER_ROWS = 256
WIDE_LAYER_OUT_FEATURES = 8192


def max_kernel_rows(out_features: int, compute_dtype: str = "float32") -> int:
    """The largest number of rows of x for which the kernels are used on a layer this wide."""
    if np.dtype(compute_dtype).name in ("float16", "bfloat16"):
        return HALF_PRECISION_ROWS
    return WIDE_LAYER_ROWS if out_features >= WIDE_LAYER_OUT_FEATURES else SMALL_BATCH_ROWS


def kernel_supports(x: jax.Array, q: Packed4bit, compute_dtype: str) -> bool:
    """Whether the fused 4-bit kernels should compute ``x @ W.T`` (or ``G @ W``) here.

    True when JAX runs on a GPU with jax-triton, the weight is 2-D with ``in_features`` a
    multiple of its blocksize, the blocksize is 64 or 128, the compute dtype is float16,
    bfloat16 or float32, and x has at most :func:`max_kernel_rows` rows (256 for 16-bit
    activations). Anything else takes the XLA reference path.

    Args:
      x: the activations (or output gradient), ``(..., features)``.
      q: the quantized weight.
      compute_dtype: name of the dtype the product is computed in.

    Returns:
      bool.
    """
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if len(q.shape) != 2 or q.quant_map.shape != (16,) or rows > max_kernel_rows(q.shape[0], compute_dtype):
        return False
    if not dispatch.triton_available():
        return False
    from qflax_kernels import fourbit_plan

    n, k = q.shape
    return fourbit_plan.unsupported_reason(n, k, q.blocksize, np.dtype(compute_dtype).name) is None


def _weight_args(q: Packed4bit) -> dict:
    return dict(
        packed=q.packed,
        absmax=q.absmax,
        quant_map=q.quant_map,
        shape=tuple(q.shape),
        blocksize=q.blocksize,
        nested_absmax=q.nested_absmax,
        nested_quant_map=q.nested_quant_map,
        nested_offset=q.nested_offset,
    )


def forward(x: jax.Array, q: Packed4bit, bias: jax.Array | None, compute_dtype: str) -> jax.Array:
    """``x @ W.T + bias`` through the fused kernel, computed in ``compute_dtype``.

    Args:
      x: (..., in_features) activations.
      q: 2-D quantized weight (out, in) that :func:`kernel_supports` accepted.
      bias: optional (out_features,) bias.
      compute_dtype: dtype name of the product.

    Returns:
      (..., out_features) array of x's dtype.
    """
    from qflax_kernels import fourbit_jax

    xc = x.astype(compute_dtype)
    out = fourbit_jax.matmul_4bit(xc, bias=None if bias is None else bias.astype(compute_dtype), **_weight_args(q))
    return out.astype(x.dtype)


def grad_input(g: jax.Array, q: Packed4bit, compute_dtype: str) -> jax.Array:
    """``g @ W`` (the input gradient of ``x @ W.T``) through the fused kernel.

    Args:
      g: (..., out_features) output gradient.
      q: 2-D quantized weight (out, in) that :func:`kernel_supports` accepted.
      compute_dtype: dtype name of the product.

    Returns:
      (..., in_features) array of ``compute_dtype``.
    """
    from qflax_kernels import fourbit_jax

    return fourbit_jax.grad_input_4bit(g.astype(compute_dtype), **_weight_args(q)).astype(jnp.dtype(compute_dtype))
