"""The Triton branch of ``matmul_4bit``: when the fused kernels can run, when they are faster, how to call them.

``qflax.ops.fourbit_matmul`` asks :func:`unsupported_reason` and :func:`is_faster` at trace
time and, when dispatch picks "triton", calls :func:`forward` and (in the backward pass)
:func:`grad_input`. ``qflax_kernels.fourbit_jax`` (and through it triton) is imported only then,
so importing qflax never needs it.
"""

from typing import Optional

import jax
import numpy as np

from qflax.quant.fourbit import Packed4bit


# Where the fused kernels beat the XLA path (dequantize once, then cuBLAS). float16/bfloat16
# (register-decode kernels): faster at every measured M <= 256 on every benchmark shape (H100,
# benchmarks/results/bench_4bit-H100-*.json), and at M = 512 in the Llama-3-8B-shaped stack on
# the H200 (26.6 ms against 40.3 ms, benchmarks/results/e2e_qlora_m512-NVIDIA-H200-2026-12-01.json).
# float32 (code-table kernels, H100): at every measured M <= 32, and up to M = 256 for layers
# with >= 8192 output features. Auto dispatch only picks the kernels inside these bounds.
HALF_PRECISION_ROWS = 512
SMALL_BATCH_ROWS = 32
WIDE_LAYER_ROWS = 256
WIDE_LAYER_OUT_FEATURES = 8192


def max_kernel_rows(out_features: int, compute_dtype: str = "float32") -> int:
    """The largest number of rows of x for which auto dispatch uses the kernels on a layer this wide."""
    if np.dtype(compute_dtype).name in ("float16", "bfloat16"):
        return HALF_PRECISION_ROWS
    return WIDE_LAYER_ROWS if out_features >= WIDE_LAYER_OUT_FEATURES else SMALL_BATCH_ROWS


def _rows(x: jax.Array) -> int:
    return int(np.prod(x.shape[:-1], dtype=np.int64))


def unsupported_reason(x: jax.Array, q: Packed4bit, compute_dtype: str) -> Optional[str]:
    """Why the fused 4-bit kernels cannot compute ``x @ W.T`` (or ``G @ W``) here, or None.

    They run 2-D weights with a 16-entry table, blocksize 64 or 128 dividing ``in_features``,
    float16/bfloat16/float32 compute dtypes, fewer than 2**31 weight elements, and at least one
    row of x.

    Args:
      x: the activations (or output gradient), ``(..., features)``.
      q: the quantized weight.
      compute_dtype: name of the dtype the product is computed in.

    Returns:
      A sentence, or None when the kernels can run.
    """
    if len(q.shape) != 2:
        return f"the weight must be 2-D, got shape {q.shape}"
    if _rows(x) == 0:
        return "x has no rows"
    from qflax_kernels import fourbit_plan

    n, k = q.shape
    return fourbit_plan.unsupported_reason(n, k, q.blocksize, np.dtype(compute_dtype).name,
                                           quant_map_size=int(q.quant_map.shape[0]))


def is_faster(x: jax.Array, q: Packed4bit, compute_dtype: str) -> bool:
    """Whether the kernels were measured faster than the XLA path for this many rows (auto's policy)."""
    return _rows(x) <= max_kernel_rows(q.shape[0], compute_dtype)


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

    The bias is added in float32 inside the kernel before the one rounding to the output dtype.

    Args:
      x: (..., in_features) activations.
      q: 2-D quantized weight (out, in) the kernels can run.
      bias: optional (out_features,) bias.
      compute_dtype: dtype name of the product.

    Returns:
      (..., out_features) array of x's dtype.
    """
    from qflax_kernels import fourbit_jax

    out = fourbit_jax.matmul_4bit(x.astype(compute_dtype), bias=bias, **_weight_args(q))
    return out.astype(x.dtype)


def grad_input(g: jax.Array, q: Packed4bit, compute_dtype: str) -> jax.Array:
    """``g @ W`` (the input gradient of ``x @ W.T``) through the fused kernel.

    Args:
      g: (..., out_features) output gradient.
      q: 2-D quantized weight (out, in) the kernels can run.
      compute_dtype: dtype name of the product.

    Returns:
      (..., in_features) array of ``compute_dtype``.
    """
    from qflax_kernels import fourbit_jax

    return fourbit_jax.grad_input_4bit(g.astype(compute_dtype), **_weight_args(q))
