"""The partitioning rule of the LLM.int8 kernel call (``matmul_8bit`` and ``matmul_8bit_trainable``'s forward).

See :mod:`qflax.ops.partitioning` for the splits. A row-parallel shard quantizes its slice of
the activations with the absmax of whole rows (``pmax``), so its codes are one device's codes.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning

from qflax.ops import int8_kernels, partitioning
from qflax.quant import int8 as int8_quant
from qflax.quant import scaling


@dataclasses.dataclass(frozen=True)
class _StaticInt8:
    threshold: float
    has_bias: bool


def _int8_call(s: _StaticInt8, x, codes, scale, *bias):
    return int8_kernels.run_llm_int8(x, codes, scale, bias[0] if s.has_bias else None, s.threshold)


def _int8_layout(mesh, arg_shapes):
    x_spec = partitioning.spec_axes(arg_shapes[0].sharding, 2)
    out_axes, in_axes = partitioning.spec_axes(arg_shapes[1].sharding, 2)
    return partitioning.free_axes(x_spec[0], out_axes, in_axes), out_axes, in_axes


def _int8_infer(s, mesh, arg_shapes, result_shape):
    batch, out_axes, _ = _int8_layout(mesh, arg_shapes)
    return partitioning.named(mesh, batch, out_axes)


def row_absmax_across(x32: jax.Array, axes: tuple) -> jax.Array:
    """float32 absmax of each row of x when its features are split over mesh ``axes`` (NaN stays NaN).

    ``pmax`` of the slices' absmax; a slice's NaN (a non-finite value in the row) travels as
    +inf, which no finite absmax exceeds, so the whole row gets NaN as on one device.
    """
    local = scaling.absmax(x32, axis=1)
    if not axes:
        return local
    row = jax.lax.pmax(jnp.where(jnp.isnan(local), jnp.float32(jnp.inf), local), axes)
    return jnp.where(jnp.isinf(row), jnp.float32(jnp.nan), row)


def _quantize_rows_split(x, threshold: float, mask, in_axes: tuple):
    """LLM.int8 activation codes of a slice of x's features, with the absmax of whole rows (``pmax``)."""
    x32 = x.astype(jnp.float32)
    if threshold > 0:
        x32 = jnp.where(jnp.abs(x32) >= threshold, jnp.float32(0), x32)
    absmax = row_absmax_across(x32, in_axes)
    codes = int8_quant.llm_int8_codes(x32, absmax[:, None])
    if threshold > 0:
        codes = jnp.where(mask[None, :], jnp.int8(0), codes)
    return codes, absmax


def llm_int8_shard(s: "_StaticInt8", batch: tuple, in_axes: tuple, x, codes_w, scale_w, *bias):
    """One device's part of the LLM.int8 product (x's rows split over ``batch``, features over ``in_axes``)."""
    bias = bias[0] if s.has_bias else None
    threshold = s.threshold
    if not in_axes and not (batch and threshold > 0):
        return int8_kernels.run_llm_int8(x, codes_w, scale_w, bias, threshold)
    from qflax_kernels import int8_launch

    k = x.shape[1]
    mask = None
    if threshold > 0:
        mask = int8_quant.outlier_mask(x, threshold)
        if batch:  # a column is an outlier column if any row, on any device, holds an outlier
            mask = jax.lax.pmax(mask.astype(jnp.int32), batch).astype(bool)
    outliers = {}
    if in_axes:
        codes, absmax = _quantize_rows_split(x, threshold, mask, in_axes)
        if threshold > 0:
            outliers = dict(x=x, outlier_idx=jnp.nonzero(mask, size=k, fill_value=0)[0].astype(jnp.int32),
                            outlier_count=jnp.sum(mask, dtype=jnp.int32).reshape(1), outlier_mask=mask)
    elif threshold > 0:
        codes, absmax, columns, count, mask = int8_launch.quantize_rows_outliers(x, threshold, mask)
        outliers = dict(x=x, outlier_idx=columns, outlier_count=count, outlier_mask=mask)
    else:
        codes, absmax = int8_launch.quantize_rowwise(x, llm_int8_scale=True)
    local_bias = None if in_axes else bias
    out = int8_launch.int8_matmul_dequant(codes, codes_w, absmax, scale_w, local_bias, out_dtype=x.dtype, **outliers)
    if not in_axes:
        return out
    out = jax.lax.psum(out, in_axes)
    return out if bias is None else (out.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out.dtype)


def _int8_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _int8_layout(mesh, arg_shapes)
    n, k = arg_shapes[1].shape
    partitioning.check_divides(n, partitioning.mesh_size(mesh, out_axes), "out_features", out_axes)
    partitioning.check_divides(k, partitioning.mesh_size(mesh, in_axes), "in_features", in_axes)
    shardings = [partitioning.named(mesh, batch, in_axes), partitioning.named(mesh, out_axes, in_axes),
                 partitioning.named(mesh, out_axes)]
    if s.has_bias:
        shardings.append(partitioning.named(mesh, out_axes))

    lower = functools.partial(llm_int8_shard, s, batch, in_axes)
    return mesh, lower, partitioning.named(mesh, batch, out_axes), tuple(shardings)


_int8 = custom_partitioning(_int8_call, static_argnums=(0,))
_int8.def_partition(
    partition=_int8_partition,
    infer_sharding_from_operands=_int8_infer,
    sharding_rule=lambda s, mesh, operands, results: (
        "m k, n k, n" + (", n" if s.has_bias else "") + " -> m n", dict(reduction_factors=("k",))),
)


def llm_int8_forward(x: jax.Array, codes: jax.Array, scale: jax.Array, bias: Optional[jax.Array],
                     threshold: float) -> jax.Array:
    """:func:`qflax.ops.int8_kernels.run_llm_int8` of 2-D ``x (M, K)`` with a partitioning rule.

    Args:
      x: float ``(M, K)``.
      codes: int8 ``(N, K)``; scale: float32 ``(N,)`` (bitsandbytes' CB, SCB).
      bias: optional ``(N,)``.
      threshold: outlier threshold (0: none).

    Returns:
      ``(M, N)`` in x's dtype.
    """
    s = _StaticInt8(float(threshold), bias is not None)
    # Rows are never folded: with a threshold the outlier columns are those of each batch element.
    return partitioning.batchable(_int8, _int8_call, s, False)(x, codes, scale, *((bias,) if bias is not None else ()))
