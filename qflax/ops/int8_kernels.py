"""The int8 kernel branch of the LLM.int8 and SwitchBack ops: what the Triton kernels support, and how to run them.

The ops in ``qflax.ops`` (``matmul_8bit``, ``matmul_8bit_trainable``, ``switchback_matmul``,
``switchback_matmul_prepared``, ``switchback_bnb_matmul``) ask :func:`unsupported_reason` when they
call ``dispatch.choose`` and, on the "triton" path, compute their int8 products with the
``run_*`` functions below instead of the XLA reference. Each ``run_*`` computes exactly what the
XLA reference computes (same quantizers, same dequant order), up to float rounding. Nothing here
is differentiable by itself: the ops' ``custom_vjp`` rules call these in forward and backward.

``qflax_kernels.int8_launch`` (and with it triton) is imported only when a
``run_*`` function runs, so ``import qflax`` works without them.
"""

from typing import Optional

import jax
import jax.numpy as jnp


# Longest row the single-pass row quantizer handles (qflax_kernels.int8_quant.MAX_ROW_K).
MAX_K = 32768
KERNEL_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _launch():
    from qflax_kernels import int8_launch

    return int8_launch


def unsupported_reason(dtype, in_features: int, out_features: Optional[int] = None) -> Optional[str]:
    """Why the int8 Triton kernels cannot take activations of ``dtype`` against an ``(out, in)`` weight, or None.

    Args:
      dtype: activation (and output) dtype.
      in_features: K, the contracted dimension (also N of the backward input-gradient product).
      out_features: N, the weight's rows (the K of the backward product); None to skip that check.

    Returns:
      None for float16/bfloat16/float32 with both dimensions in ``[1, MAX_K]``, else a sentence.
    """
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"activations must be float16, bfloat16 or float32, got {jnp.dtype(dtype).name}"
    dims = [in_features] + ([] if out_features is None else [out_features])
    if not all(1 <= d <= MAX_K for d in dims):
        return f"in_features and out_features must be in [1, {MAX_K}], got {dims}"
    return None


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def quantize_rowwise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel twin of ``qflax.quant.switchback.quantize_rowwise`` (all leading dims flattened)."""
    return _launch().quantize_rowwise(_rows(x))


def quantize_rows(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel twin of ``qflax.quant.int8.quantize_rows`` (LLM.int8 weight codes and SCB)."""
    return _launch().quantize_rowwise(w, llm_int8_scale=True)


def quantize_global(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel twin of ``qflax.quant.switchback.quantize_global`` for a 2-D weight."""
    return _launch().quantize_global(w)


def quantize_global_transpose(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel twin of ``qflax.quant.switchback.quantize_global_transpose``."""
    return _launch().quantize_global_transpose(w)


def quantize_columnwise_and_transpose(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel twin of ``qflax.quant.switchback.quantize_columnwise_and_transpose``."""
    return _launch().quantize_columnwise_and_transpose(w)


def run_int8_gemm(
    a_codes: jax.Array, a_scale: jax.Array, b_codes: jax.Array, b_scale: jax.Array,
    bias: Optional[jax.Array] = None, out_dtype=jnp.float32,
) -> jax.Array:
    """``(a @ b.T) * a_scale * b_scale / 127² (+ bias)`` in ``out_dtype`` from already quantized operands.

    Args:
      a_codes: int8 ``(M, K)``; a_scale: float32 ``(M,)`` row absmax.
      b_codes: int8 ``(N, K)``; b_scale: float32 ``(N,)`` row absmax or ``(1,)`` global absmax.
      bias: optional ``(N,)``, added in float32 before the cast.
      out_dtype: output dtype.
    """
    return _launch().int8_matmul_dequant(a_codes, b_codes, a_scale, b_scale, bias, out_dtype=out_dtype)


def run_int8_matmul(
    x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, bias: Optional[jax.Array] = None
) -> jax.Array:
    """``rowquant(x) @ w_codes.T`` dequantized (+ bias), in x's dtype, shape ``(*x.shape[:-1], N)``.

    Args:
      x: float ``(..., K)`` activations, quantized row-wise by the kernel.
      w_codes: int8 ``(N, K)``.
      w_scale: float32 ``(N,)`` row absmax (vector-wise / LLM.int8) or ``(1,)`` (SwitchBack global).
      bias: optional ``(N,)``.
    """
    x2 = _rows(x)
    codes, absmax = _launch().quantize_rowwise(x2)
    out = _launch().int8_matmul_dequant(codes, w_codes, absmax, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(x.shape[:-1] + (w_codes.shape[0],))


def run_llm_int8(
    x: jax.Array,
    w_codes: jax.Array,
    w_scale: jax.Array,
    bias: Optional[jax.Array] = None,
    threshold: float = 0.0,
    outlier_weight: Optional[jax.Array] = None,
) -> jax.Array:
    """LLM.int8 forward: int8 product of the regular columns plus the float product of the outlier columns.

    Activations are quantized as ``qflax.quant.int8.int8_vectorwise_quant`` does (scale
    ``127 * (1 / absmax)``, outlier elements out of the row absmax, outlier columns' codes 0).

    The outlier columns (any ``|x| >= threshold``, as ``qflax.quant.int8.outlier_mask``, listed by the quantizer kernel) are
    zeroed in the int8 codes and multiplied in x's precision against the int8 weight columns
    dequantized inside the GEMM kernel; the weight is never dequantized in memory.

    Args:
      x: float ``(..., K)``.
      w_codes: int8 ``(N, K)``; w_scale: float32 ``(N,)`` (bitsandbytes' CB, SCB).
      bias: optional ``(N,)``.
      threshold: outlier threshold (0: no outlier handling).
      outlier_weight: optional float ``(N, K)`` weight whose columns the outlier columns meet
        (SwitchBackBnb multiplies them with the float weight); default: the int8 weight.

    Returns:
      ``(*x.shape[:-1], N)`` in x's dtype.
    """
    x2 = _rows(x)
    if threshold == 0:
        codes, absmax = _launch().quantize_rowwise(x2, llm_int8_scale=True)
        out = _launch().int8_matmul_dequant(codes, w_codes, absmax, w_scale, bias, out_dtype=x.dtype)
        return out.reshape(x.shape[:-1] + (w_codes.shape[0],))
    # One quantizer launch gives the codes and the outlier columns (no nonzero: its scatter and
    # prefix sums cost more than the int8 GEMM at decode sizes).
    codes, absmax, columns, count, mask = _launch().quantize_rows_outliers(x2, threshold)
    out = _launch().int8_matmul_dequant(codes, w_codes, absmax, w_scale, bias, out_dtype=x.dtype, x=x2,
                                        outlier_idx=columns, outlier_count=count, outlier_weight=outlier_weight,
                                        outlier_mask=mask)
    return out.reshape(x.shape[:-1] + (w_codes.shape[0],))


def run_llm_int8_trainable(
    x: jax.Array, weight: jax.Array, bias: Optional[jax.Array] = None, threshold: float = 0.0
) -> jax.Array:
    """LLM.int8 forward with a float weight ``(N, K)`` quantized row-wise by the kernel on every call."""
    w_codes, w_scale = quantize_rows(weight)
    return run_llm_int8(x, w_codes, w_scale, bias, threshold)


def run_switchback_input_grad(g: jax.Array, wt_codes: jax.Array, wt_scale: jax.Array) -> jax.Array:
    """SwitchBack input gradient ``rowquant(G) @ Wt_codes.T`` dequantized, in g's dtype.

    Args:
      g: float ``(..., N)`` output gradient.
      wt_codes: int8 ``(K, N)``: the weight quantized for the backward pass and transposed
        (``quantize_global_transpose`` or ``quantize_columnwise_and_transpose`` of W ``(N, K)``).
      wt_scale: float32 ``(1,)`` (global) or ``(K,)`` (column-wise).

    Returns:
      ``(*g.shape[:-1], K)`` in g's dtype.
    """
    return run_int8_matmul(g, wt_codes, wt_scale)
