"""LLM.int8 primitives (docs/int8.md#quantization): row/column int8 quantization with outliers, int8 matmul, dequant.

Rounding is round-half-to-even of ``x * (127 * (1 / absmax))`` computed in float32, as
bitsandbytes' CUDA and CPU kernels do (see :func:`llm_int8_codes`). An all-zero row (or
column) has scale 0 and codes 0, never NaN. Outliers are reported as a boolean column mask,
because a data-dependent list of indices has no static shape under ``jax.jit``;
``outlier_columns`` turns a concrete mask into bitsandbytes' sorted index list.

Non-finite and extreme values (:mod:`qflax.quant.scaling`), the same eagerly and under jit:
a row (column) holding NaN or +-Inf gets scale NaN and codes 0, so its products are NaN; with
``threshold > 0`` an +-Inf is an outlier (``|x| >= threshold``) and takes the float path
instead. Codes and scales are exact up to float32's maximum, and the dequant epilogue
(:func:`int8_mm_dequant`) does not overflow or underflow in between when one scale is huge
and the other tiny.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qflax.quant import scaling, validation

# 1 / (127 * 127) in float32: the exact dequant factor (bitsandbytes' CPU literal
# 6.200124e-05 is 1.8e-5 relatively too large, docs/int8.md#dequantization).
INV_127_SQUARED = np.float32(1.0 / (127 * 127))
INV_127 = np.float32(1.0 / 127)
# Rows above this scale are dequantized as codes * (stats / 127): 127 * stats would overflow.
_HUGE = np.float32(2.0**120)


@struct.dataclass
class Int8Rows:
    """A 2-D tensor quantized to int8 per row (bitsandbytes' ``CB``/``SCB`` pair).

    Attributes:
      codes: int8 ``(rows, cols)``.
      scale: float32 ``(rows,)``: the absolute maximum of each row (bitsandbytes' SCB).
    """

    codes: jax.Array
    scale: jax.Array


def _check_rows(x) -> jax.Array:
    """A float array of at least one dimension; zero rows are fine (their results are empty)."""
    x = validation.check_float_array(x, allow_empty=True)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (rows, cols), got a scalar")
    return x


def _check_threshold(threshold: float) -> None:
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")


def _outside_safe_range(stat: jax.Array) -> jax.Array:
    return (stat > np.float32(2.0**60)) | ((stat < np.float32(2.0**-60)) & (stat > 0))


def round_to_int8(scaled: jax.Array) -> jax.Array:
    """Round half to even and cast to int8 (inputs are within [-127, 127])."""
    return jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)


def llm_int8_codes(x: jax.Array, absmax: jax.Array) -> jax.Array:
    """int8 ``rne(x * (127 * (1 / absmax)))`` in float32: bitsandbytes' LLM.int8 quantizer.

    Rounding the reciprocal first matters for exact codes: torch evaluates bitsandbytes' CPU
    expression ``127.0 / row_stats`` as ``127 * reciprocal(row_stats)`` (CUDA's
    ``__fdividef(127, absmax)`` is the same product), which differs from the correctly
    rounded ``127 / absmax`` in the last bit for about a quarter of the values and flips
    codes at exact halves. Units with absmax 0 or NaN get codes 0.

    Args:
      x: float32 values.
      absmax: their statistics, broadcastable against ``x``.
    """
    codes = round_to_int8(scaling.scale_by_reciprocal(x, absmax, 127))
    return jnp.where(scaling.usable(absmax), codes, jnp.int8(0))


def outlier_mask(x: jax.Array, threshold: float) -> jax.Array:
    """Boolean ``(cols,)`` mask of the columns of a 2-D ``x`` holding any ``|x| >= threshold``.

    A threshold of 0 means "no outlier handling" and gives an all-False mask.
    """
    _check_threshold(threshold)
    if threshold == 0:
        return jnp.zeros(x.shape[-1], bool)
    return jnp.any(jnp.abs(x.astype(jnp.float32)) >= threshold, axis=0)


def outlier_columns(mask: jax.Array) -> np.ndarray:
    """Sorted int64 indices of the True entries of a concrete outlier mask (bitsandbytes' outlier_cols)."""
    return np.nonzero(np.asarray(mask))[0].astype(np.int64)


def int8_vectorwise_quant(x: jax.Array, threshold: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row-wise int8 quantization with optional outlier columns (bitsandbytes' int8_vectorwise_quant).

    With ``threshold > 0``, elements with ``|x| >= threshold`` are left out of their row's
    absmax and quantized to 0; when there is more than one row, the codes of every column
    holding such an element are zeroed entirely (those columns go through the float path
    instead). The column's other values still count towards their rows' absmax.

    Args:
      x: float array; all leading dimensions are flattened into rows.
      threshold: outlier threshold, >= 0 (0 disables outlier handling).

    Returns:
      ``(codes, row_stats, outlier_mask)``: int8 ``(rows, cols)``, float32 ``(rows,)`` and
      bool ``(cols,)``.
    """
    x = _check_rows(x)
    _check_threshold(threshold)
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    mask = outlier_mask(x2, threshold)
    if threshold > 0:
        x2 = jnp.where(jnp.abs(x2) >= threshold, jnp.float32(0), x2)
    # The row absmax leaves out only the outlier elements themselves: the other values of an
    # outlier column still count, as in bitsandbytes, and the column is zeroed after rounding.
    row_stats = scaling.absmax(x2, axis=1)
    codes = llm_int8_codes(x2, row_stats[:, None])
    if threshold > 0 and x2.shape[0] > 1:
        codes = jnp.where(mask[None, :], jnp.int8(0), codes)
    return codes, row_stats, mask


def quantize_rows(w: jax.Array) -> Int8Rows:
    """Row-wise int8 quantization of a 2-D weight ``(out, in)`` (bitsandbytes' CB, SCB).

    Args:
      w: float array of shape ``(out, in)``.

    Returns:
      An :class:`Int8Rows`.
    """
    w = validation.check_float_array(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    codes, scale, _ = int8_vectorwise_quant(w)
    return Int8Rows(codes=codes, scale=scale)


def int8_columnwise_quant(x: jax.Array, threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Column-wise int8 quantization of a 2-D ``x`` (the column half of int8_double_quant).

    Returns:
      ``(codes, col_stats)``: int8 ``(rows, cols)`` and float32 ``(cols,)``.
    """
    x = _check_rows(x)
    _check_threshold(threshold)
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if threshold > 0:
        x2 = jnp.where(jnp.abs(x2) >= threshold, jnp.float32(0), x2)
    col_stats = scaling.absmax(x2, axis=0)
    return llm_int8_codes(x2, col_stats[None, :]), col_stats


def int8_vectorwise_dequant(codes: jax.Array, stats: jax.Array) -> jax.Array:
    """float32 ``codes * stats[:, None] / 127``: bitsandbytes' order, but huge rows scale first (no overflow)."""
    codes, stats = codes.astype(jnp.float32), stats.astype(jnp.float32)[:, None]
    return jnp.where(stats > _HUGE, codes * (stats * INV_127), codes * stats * INV_127)


def int8_linear_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact int32 ``a @ b.T`` of int8 ``a (M, K)`` and int8 ``b (N, K)``."""
    for name, arr in (("a", a), ("b", b)):
        if arr.dtype != jnp.int8:
            raise TypeError(f"{name} must be int8, got {arr.dtype}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must share their last dimension, got {a.shape} and {b.shape}")
    return jax.lax.dot_general(
        a, b, (((a.ndim - 1,), (b.ndim - 1,)), ((), ())), preferred_element_type=jnp.int32
    )


def int8_mm_dequant(
    acc: jax.Array, row_stats: jax.Array, col_stats: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """float32 ``acc * row_stats[:, None] * col_stats[None, :] / 127² (+ bias)``.

    Args:
      acc: int32 ``(M, N)`` accumulator of an int8 matmul.
      row_stats: float32 ``(M,)`` absmax of the rows of the left operand.
      col_stats: float32 ``(N,)`` absmax of the rows of the right (weight) operand.
      bias: optional ``(N,)``, added in float32.

    Returns:
      float32 ``(M, N)``.
    """
    if acc.dtype != jnp.int32:
        raise TypeError(f"acc must be int32, got {acc.dtype}")
    row, col = row_stats.astype(jnp.float32)[:, None], col_stats.astype(jnp.float32)[None, :]
    out = acc.astype(jnp.float32) * (row * INV_127_SQUARED) * col
    # With a scale outside [2**-60, 2**60] the product above may over- or underflow in between although
    # the result is representable: multiply the mantissas, then apply the exponents once.
    extreme = _outside_safe_range(row) | _outside_safe_range(col)
    row_m, row_e = jnp.frexp(row)
    col_m, col_e = jnp.frexp(col)
    robust = jnp.ldexp(acc.astype(jnp.float32) * (row_m * INV_127_SQUARED) * col_m, row_e + col_e)
    out = jnp.where(extreme, robust, out)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out
