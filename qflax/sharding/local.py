"""The quantized ops inside ``shard_map``: each device holds a shard, and these helpers do the rest.

Inside ``jax.shard_map`` every operand is the device's own shard. An :class:`Int8Rows` shard is
an ordinary (smaller) weight, but a :class:`Packed4bit` keeps the whole weight's static shape
and statistics: :func:`local_weight` turns its shard into a standalone weight. The
``*_local`` functions compute one device's part of a product or lookup, given the spec the
weight was split with (the spec of :func:`qflax.sharding.quantized_partition_specs`), and end
with the one collective the split needs: nothing for column-parallel (output features
split), one ``psum`` of the outputs for row-parallel (input features split). They are
differentiable like the ops they call, on every backend.

Example (Megatron MLP)::

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), up_specs, down_specs), out_specs=P())
    def mlp(x, up, down):
        h = jax.nn.silu(matmul_4bit_local(x, up, P("tp", None)))       # (M, F / tp), no communication
        return matmul_4bit_local(h, down, P(None, "tp"))                # one psum over "tp"
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qflax import ops
from qflax.ops.int8_partitioning import row_absmax_across
from qflax.ops.partitioning import shard_index
from qflax.quant import fourbit_rows
from qflax.quant import int8 as int8_quant
from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows
from qflax.sharding.specs import axes_of


def _weight_axes(spec: Any) -> tuple[tuple, tuple]:
    entries = tuple(spec or ()) + (None, None)
    return axes_of(entries[0]), axes_of(entries[1])


def local_weight(q: Packed4bit, spec: Any) -> Packed4bit:
    """This device's shard of a 4-bit weight as a standalone Packed4bit (inside ``shard_map``).

    Args:
      q: the shard as ``shard_map`` passes it: leaves split with ``spec`` (and the code tables
        and nested statistics replicated), ``q.shape`` the whole weight's.
      spec: the weight's spec ``P(out_axes, in_axes)`` it was split with.

    Returns:
      A flat-layout Packed4bit of the shard's shape ``(N / |out|, K / |in|)`` (its absmax decoded
      to float32 when its double-quantization blocks are not its own; see
      :func:`qflax.quant.fourbit_rows.local_block`).
    """
    out_axes, in_axes = _weight_axes(spec)
    rows, cols = fourbit_rows.local_dims(q)
    return fourbit_rows.local_block(q, shard_index(out_axes) * rows, shard_index(in_axes) * cols)


def _vary(x: jax.Array, axes: tuple) -> jax.Array:
    """``x`` marked as varying over mesh ``axes`` (inside ``shard_map``).

    A column-parallel product meets activations that are the same on every device of the
    weight's axes; marking them varying first makes their gradient the ``psum`` of the
    devices' partial gradients (the transpose of the mark), outside the ops' own vjps.
    """
    missing = tuple(a for a in axes if a not in _varying(x))
    if not missing:
        return x
    cast = getattr(jax.lax, "pcast", None)
    return cast(x, missing, to="varying") if cast is not None else jax.lax.pvary(x, missing)


def _varying(x: jax.Array) -> frozenset:
    """The manual mesh axes over which ``x`` varies (jax >= 0.10 types; ``vma`` before)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _vma(x: Optional[jax.Array]) -> tuple:
    return tuple(sorted(_varying(x))) if x is not None else ()


def _align(x: jax.Array, bias: Optional[jax.Array], out_axes: tuple) -> tuple:
    """x and bias varying over the same axes, so the ops' vjps see matching types (gradients psum-ed)."""
    x = _vary(x, out_axes + _vma(bias))
    return x, None if bias is None else _vary(bias, _vma(x))


def _add_bias(y: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    if bias is None:
        return y
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def matmul_4bit_local(x: jax.Array, q: Packed4bit, spec: Any, bias: Optional[jax.Array] = None,
                      compute_dtype: Any = None, backend: Optional[str] = None) -> jax.Array:
    """One device's part of ``x @ W.T + bias`` with W split by ``spec`` (inside ``shard_map``).

    Args:
      x: this device's activations: all input features for a column-parallel weight, the
        device's slice of them for a row-parallel one.
      q: this device's shard of the 4-bit weight (see :func:`local_weight`).
      spec: ``P(out_axes, in_axes)`` the weight was split with.
      bias: this device's slice of the bias (split like the output features), or None.
      compute_dtype: as in :func:`qflax.ops.matmul_4bit`.
      backend: as in :func:`qflax.ops.matmul_4bit`.

    Returns:
      ``(..., N / |out_axes|)``: this device's output features, summed over ``in_axes``.
    """
    out_axes, in_axes = _weight_axes(spec)
    local = local_weight(q, spec)
    if not in_axes:
        x, bias = _align(x, bias, out_axes)
        return ops.matmul_4bit(x, local, bias, compute_dtype=compute_dtype, backend=backend)
    # Row-parallel: the bias joins once, after the sum (plain autodiff then sums its gradient).
    y = ops.matmul_4bit(_vary(x, out_axes), local, None, compute_dtype=compute_dtype, backend=backend)
    return _add_bias(jax.lax.psum(y, in_axes), bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _llm_int8_split(x2, codes, scale, threshold, batch_axes, in_axes):
    """float32 LLM.int8 product of a slice of x's features with the matching weight columns, summed (XLA)."""
    mask = int8_quant.outlier_mask(x2, threshold)
    if threshold > 0 and batch_axes:  # an outlier column anywhere is one everywhere (as on one device)
        mask = jax.lax.pmax(mask.astype(jnp.int32), batch_axes).astype(bool)
    x32 = x2.astype(jnp.float32)
    kept = jnp.where(jnp.abs(x32) >= threshold, jnp.float32(0), x32) if threshold > 0 else x32
    row_absmax = row_absmax_across(kept, in_axes)
    x_codes = int8_quant.llm_int8_codes(kept, row_absmax[:, None])
    if threshold > 0:
        x_codes = jnp.where(mask[None, :], jnp.int8(0), x_codes)
    acc = int8_quant.int8_linear_matmul(x_codes, codes)
    acc = jax.lax.psum(acc, in_axes) if in_axes else acc  # int32: exact, as one device's accumulation
    out = int8_quant.int8_mm_dequant(acc, row_absmax, scale)
    if threshold > 0:
        w = int8_quant.int8_vectorwise_dequant(codes, scale).astype(x2.dtype)
        outliers = jax.lax.dot_general(jnp.where(mask[None, :], x2, jnp.zeros((), x2.dtype)), w,
                                       (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        out = out + (jax.lax.psum(outliers, in_axes) if in_axes else outliers)
    return out


def _llm_int8_split_fwd(x2, codes, scale, threshold, batch_axes, in_axes):
    return _llm_int8_split(x2, codes, scale, threshold, batch_axes, in_axes), (codes, scale, jnp.zeros((), x2.dtype))


def _llm_int8_split_bwd(threshold, batch_axes, in_axes, residuals, g):
    codes, scale, marker = residuals
    # G @ dequant(W) restricted to this device's columns: its slice of the input gradient.
    w = int8_quant.int8_vectorwise_dequant(codes, scale).astype(marker.dtype)
    grad_x = jnp.matmul(g.astype(marker.dtype), w, preferred_element_type=jnp.float32).astype(marker.dtype)
    return grad_x, None, None  # the frozen weight gets no cotangent


_llm_int8_split.defvjp(_llm_int8_split_fwd, _llm_int8_split_bwd)


def matmul_8bit_local(x: jax.Array, w: Int8Rows, spec: Any, bias: Optional[jax.Array] = None,
                      threshold: float = 0.0, backend: Optional[str] = None, batch_axes: Any = None) -> jax.Array:
    """One device's part of the LLM.int8 ``x @ W.T + bias`` with W split by ``spec`` (inside ``shard_map``).

    A row-parallel split (input features over ``in_axes``) quantizes each activation row with
    the absmax of the whole row (a ``pmax``) and sums the int32 accumulators (one ``psum``), so
    the result equals one device's. With ``threshold > 0`` and the rows of x split over
    ``batch_axes``, the outlier columns are those of all rows (a ``pmax``), as on one device.

    Args:
      x: this device's activations ``(..., K / |in_axes|)``.
      w: this device's shard of the weight (codes ``(N / |out|, K / |in|)``, scale ``(N / |out|,)``).
      spec: ``P(out_axes, in_axes)`` the weight was split with.
      bias: this device's slice of the bias, or None.
      threshold: LLM.int8 outlier threshold.
      backend: as in :func:`qflax.ops.matmul_8bit` (the split path computes with XLA).
      batch_axes: mesh axes over which the rows of x are split (only matters with a threshold).

    Returns:
      ``(..., N / |out_axes|)`` in x's dtype.
    """
    out_axes, in_axes = _weight_axes(spec)
    batch = axes_of(batch_axes)
    if not in_axes and not (batch and threshold > 0):
        x, bias = _align(x, bias, out_axes)
        return ops.matmul_8bit(x, w, bias, threshold=threshold, backend=backend)
    x = _vary(x, out_axes)
    lead = x.shape[:-1]
    out = _llm_int8_split(x.reshape(-1, x.shape[-1]), w.codes, w.scale, float(threshold), batch, in_axes)
    if bias is not None:  # once, after the sum; in float32 before the one rounding to x's dtype
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype).reshape(*lead, w.codes.shape[0])


def _vocab_lookup(ids: jax.Array, rows: int, vocab_axes: tuple, lookup) -> jax.Array:
    """Rows of ``ids`` from a table split by rows: each device looks up its own, one psum joins them."""
    start = shard_index(vocab_axes) * rows
    local = ids - start
    mine = (local >= 0) & (local < rows)
    found = lookup(jnp.where(mine, local, 0))
    return jax.lax.psum(jnp.where(mine[..., None], found, jnp.zeros((), found.dtype)), vocab_axes)


def embed_4bit_local(ids: jax.Array, q: Packed4bit, spec: Any) -> jax.Array:
    """One device's part of a 4-bit embedding lookup with the table split by ``spec`` (inside ``shard_map``).

    Rows split (vocabulary-parallel): each device looks up the ids in its rows, one ``psum``
    joins them. Features split: each device returns its slice of the features. Out-of-range
    ids give NaN rows, as :func:`qflax.ops.embed_4bit`.

    Args:
      ids: integer ids (replicated over the table's axes).
      q: this device's shard of the table.
      spec: ``P(row_axes, feature_axes)`` the table was split with.

    Returns:
      ``(*ids.shape, features / |feature_axes|)`` in the table's dtype.
    """
    row_axes, _ = _weight_axes(spec)
    local = local_weight(q, spec)
    if not row_axes:
        return ops.embed_4bit(ids, local)
    out = _vocab_lookup(ids, local.shape[0], row_axes, lambda i: ops.embed_4bit(i, local))
    in_range = (ids >= 0) & (ids < q.shape[0])
    return jnp.where(in_range[..., None], out, jnp.asarray(jnp.nan, out.dtype))


def embed_8bit_local(ids: jax.Array, w: Int8Rows, spec: Any, dtype: Any = None) -> jax.Array:
    """One device's part of an int8 embedding lookup with the table split by ``spec`` (inside ``shard_map``).

    Args:
      ids: integer ids; under ``jit`` an out-of-range id gives a NaN row, as
        :func:`qflax.ops.embed_8bit`.
      w: this device's shard of the table.
      spec: ``P(row_axes, feature_axes)`` the table was split with.
      dtype: output dtype (default float32).

    Returns:
      ``(*ids.shape, features / |feature_axes|)``.
    """
    row_axes, _ = _weight_axes(spec)
    if not row_axes:
        return ops.embed_8bit(ids, w, dtype)
    rows = w.codes.shape[0]
    out = _vocab_lookup(ids, rows, row_axes, lambda i: ops.embed_8bit(i, w, dtype))
    total = rows * int(np.prod([jax.lax.axis_size(a) for a in row_axes]))
    in_range = (ids >= 0) & (ids < total)
    return jnp.where(in_range[..., None], out, jnp.asarray(jnp.nan, out.dtype))
