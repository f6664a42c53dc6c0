"""JAX launchers for the int8 kernels (one ``triton_call`` per kernel), with ``custom_vmap`` rules.

The launches come from ``int8_specs``; pointers a launch does not read get an input already at
hand (on the weight's side, so batching rules are unaffected), never a placeholder built per
call. qflax imports this module lazily inside its kernel branches. ``triton_call`` has neither
autodiff nor batching rules: the ops in ``qflax.ops`` wrap these in ``jax.custom_vjp``, and
every launcher here is a
``jax.custom_batching.custom_vmap`` whose rule folds a batch of activations into M (one launch)
and falls back to one launch per batch element (``lax.map``) when a weight is batched.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from qflax_kernels import int8_quant, int8_specs
from qflax_kernels.batching import batched_launcher
from qflax_kernels.triton_call import triton_call

@functools.lru_cache(maxsize=None)
def _gemm_fn(out_dtype, has_bias: bool, b_scale_global: bool, has_outliers: bool, outlier_w_float: bool, config_key):
    config = dict(config_key) if config_key else None

    def launch(a, b, a_scale, b_scale, bias, x, outlier_idx, outlier_count, outlier_mask, w_float):
        M, K = a.shape
        N = b.shape[0]
        spec = int8_specs.gemm_launch(
            M, N, K, jnp.dtype(out_dtype).name, has_bias=has_bias, b_scale_global=b_scale_global,
            has_outliers=has_outliers, outlier_w_float=outlier_w_float, config=config,
            dot_ieee=has_outliers and (x.dtype == jnp.float32 or (outlier_w_float and w_float.dtype == jnp.float32)),
        )
        (out,) = triton_call(spec, a, b, a_scale, b_scale, bias, x, outlier_idx, outlier_count, outlier_mask, w_float)
        return out

    # a, a_scale (and x with outliers) hold activations; the rest belongs to the weight or the outlier set.
    return batched_launcher(launch, (0, 2, 5) if has_outliers else (0, 2))


def int8_matmul_dequant(
    a: jax.Array,
    b: jax.Array,
    a_scale: jax.Array,
    b_scale: jax.Array,
    bias: Optional[jax.Array] = None,
    out_dtype=jnp.float32,
    x: Optional[jax.Array] = None,
    outlier_idx: Optional[jax.Array] = None,
    outlier_count: Optional[jax.Array] = None,
    outlier_weight: Optional[jax.Array] = None,
    config: Optional[dict] = None,
    outlier_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """``(a @ b.T) * a_scale[:, None] * b_scale / 127² (+ outlier matmul) (+ bias)`` in ``out_dtype``.

    Args:
      a: int8 ``(M, K)`` activation codes.
      b: int8 ``(N, K)`` weight codes.
      a_scale: float32 ``(M,)`` row absmax of the activations.
      b_scale: float32 ``(N,)`` row absmax of the weight, or ``(1,)`` for one global absmax.
      bias: optional ``(N,)`` float, added in float32 before the cast.
      out_dtype: the output float dtype.
      x: float ``(M, K)`` activations, only with outliers.
      outlier_idx: int32 ``(>= count,)`` outlier column indices (the first ``outlier_count`` used).
      outlier_count: int32 ``(1,)`` number of outlier columns.
      outlier_weight: optional float ``(N, K)``: take the outlier columns' weights from here
        (unscaled) instead of dequantizing ``b``'s codes (SwitchBackBnb).
      config: optional tile override (see ``int8_gemm.gemm_config``), for benchmarks.
      outlier_mask: optional ``(K,)`` bool/int8, nonzero at the listed outlier columns (what
        :func:`quantize_rows_outliers` returns); by default built from the list (one scatter).

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    has_outliers = x is not None
    b_scale_global = b_scale.shape[0] == 1 and b.shape[0] != 1
    a_scale = a_scale if a_scale.dtype == jnp.float32 else a_scale.astype(jnp.float32)
    b_scale = b_scale if b_scale.dtype == jnp.float32 else b_scale.astype(jnp.float32)
    # Pointers the kernel does not read (no bias, no outliers) take b_scale.
    unread = b_scale
    if has_outliers:
        outlier_idx, outlier_count = outlier_idx.astype(jnp.int32), outlier_count.astype(jnp.int32)
        if outlier_mask is None:
            listed = jnp.arange(outlier_idx.shape[0]) < outlier_count[0]
            outlier_mask = jnp.zeros((a.shape[-1],), jnp.int8).at[outlier_idx].max(listed.astype(jnp.int8))
        outlier_mask = outlier_mask.astype(jnp.int8)
    else:
        x, outlier_idx, outlier_count, outlier_mask = unread, unread, unread, unread
    outlier_w_float = has_outliers and outlier_weight is not None
    config_key = tuple(sorted(config.items())) if config else None
    fn = _gemm_fn(jnp.dtype(out_dtype), bias is not None, b_scale_global, has_outliers, outlier_w_float, config_key)
    return fn(a, b, a_scale, b_scale, unread if bias is None else bias, x, outlier_idx, outlier_count, outlier_mask,
              outlier_weight if outlier_w_float else unread)


@functools.lru_cache(maxsize=None)
def _rows_fn(threshold: float, llm_int8_scale: bool):
    def launch(x, *col_mask):
        M, K = x.shape
        spec = int8_specs.rows_launch(M, K, threshold=threshold, llm_int8_scale=llm_int8_scale)
        # Without outliers the mask pointer is not read: x stands in for it.
        return triton_call(spec, x, col_mask[0] if col_mask else x)

    return batched_launcher(launch, (0,))


def quantize_rowwise(
    x: jax.Array, threshold: float = 0.0, col_mask: Optional[jax.Array] = None, llm_int8_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Row-wise int8 codes ``(M, K)`` and float32 row absmax ``(M,)`` of a 2-D float ``x``, one read.

    By default this is ``qflax.quant.switchback.quantize_rowwise`` (scale ``127 / absmax``). With
    ``llm_int8_scale`` the scale is ``127 * (1 / absmax)`` and, with ``threshold > 0`` and
    ``col_mask`` (bool ``(K,)``, the columns holding any ``|x| >= threshold``), outlier elements
    leave the row absmax and the masked columns' codes are zero: together
    ``qflax.quant.int8.int8_vectorwise_quant(x, threshold)``.
    """
    if threshold > 0:
        if col_mask is None:
            raise ValueError("col_mask is required when threshold > 0")
        return _rows_fn(float(threshold), bool(llm_int8_scale))(x, col_mask.astype(jnp.int8))
    return _rows_fn(0.0, bool(llm_int8_scale))(x)


@functools.lru_cache(maxsize=None)
def _rows_outliers_fn(threshold: float, find_mask: bool):
    def launch(x, mask):
        M, K = x.shape
        spec = int8_specs.rows_outliers_launch(M, K, threshold=threshold, find_mask=find_mask)
        return triton_call(spec, x, mask)

    # The outlier columns span all rows of one element: never fold a batch into M.
    return batched_launcher(launch, ())


def quantize_rows_outliers(
    x: jax.Array, threshold: float, col_mask: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """LLM.int8 row quantization with outliers, and the outlier columns, of a 2-D float ``x (M, K)``.

    Args:
      x: float ``(M, K)``, ``K <= MAX_ROW_K``.
      threshold: outlier threshold, > 0.
      col_mask: optional bool ``(K,)`` outlier columns (when they depend on more than ``x``, e.g.
        rows on other devices). By default they are ``any(|x| >= threshold)``, found by the
        kernel itself when one program holds every row, else by one XLA reduction first.

    Returns:
      ``(codes, absmax, columns, count, mask)``: codes and absmax as
      ``qflax.quant.int8.int8_vectorwise_quant(x, threshold)`` gives them; ``columns`` int32
      ``(K,)`` holds the outlier columns in increasing order in its first ``count`` entries
      (the rest is not written); ``count`` int32 ``(1,)`` is the number of outlier columns;
      ``mask`` int8 ``(K,)`` is 1 at them. ``columns``, ``count`` and ``mask`` are the GEMM's
      ``outlier_idx``, ``outlier_count`` and ``outlier_mask``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    M, K = x.shape
    find_mask = col_mask is None and int8_quant.outliers_fit_one_program(M, K)
    if find_mask:
        mask = x  # not read: the kernel finds the mask
    elif col_mask is None:
        mask = jnp.any(jnp.abs(x.astype(jnp.float32)) >= threshold, axis=0).astype(jnp.int8)
    else:
        mask = col_mask.astype(jnp.int8)
    return tuple(_rows_outliers_fn(float(threshold), find_mask)(x, mask))


@functools.lru_cache(maxsize=None)
def _scaled_fn(per_column: bool, transpose: bool):
    def launch(x):
        M, N = x.shape
        (absmax,) = triton_call(int8_specs.absmax_launch(M, N, per_column=per_column), x)
        (codes,) = triton_call(int8_specs.scaled_launch(M, N, per_column=per_column, transpose=transpose), x, absmax)
        return codes, absmax

    # A column or global absmax spans all rows of one element: never fold, launch per element.
    return batched_launcher(launch, ())


def quantize_columnwise_and_transpose(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column-wise int8 codes of ``x (M, N)`` written transposed ``(N, M)``, and column absmax ``(N,)``."""
    return _scaled_fn(True, True)(x)


def quantize_global(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 codes of a 2-D ``x`` with one tensor absmax, and that absmax as float32 ``(1,)``."""
    return _scaled_fn(False, False)(x)


def quantize_global_transpose(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global int8 codes of ``x (M, N)`` written transposed ``(N, M)``, and the absmax ``(1,)``."""
    return _scaled_fn(False, True)(x)
