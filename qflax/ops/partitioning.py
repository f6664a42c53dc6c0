"""Partitioning rules for the Triton branches of ``matmul_4bit`` and the LLM.int8 matmuls.

A kernel call (the ``qflax_triton_call`` primitive) is opaque to XLA's SPMD partitioner: given
a sharded packed weight, it would gather the whole weight onto every device first. Each
kernel branch is therefore wrapped in ``jax.experimental.custom_partitioning``: the
partitioner asks :func:`_partition` how to split the call, and every device runs the same
kernel on its own block of the weight.

Weight shardings (``qflax.sharding`` derives them):

* column-parallel, output features split: each device computes its slice of the outputs; no
  communication (the activations' input features are replicated).
* row-parallel, input features split at absmax-block boundaries (4-bit weights in the row
  view of :mod:`qflax.quant.fourbit_rows`): each device computes a partial product from its
  slice of the activations' features, and one ``psum`` adds them; the bias is added once,
  after the sum.
* both at once, and a batch (rows of x) split over further mesh axes, compose.

Nested (double-quantized) statistics are replicated. A shard that is not a run of whole rows
ending on a 256-block boundary decodes its own absmax to float32 first (one small XLA op of
``1 / blocksize`` of its weight block); otherwise the kernel decodes the nested statistics
in place, exactly as on one device.

LLM.int8 row-parallel shards need the row absmax of the whole activation row: each device
quantizes its slice with the ``pmax`` of the slices' absmax (codes identical to one device's),
then runs the int8 GEMM kernel on its slice. With a threshold and rows of x split, the outlier
columns are the ``pmax`` of each device's (a column is an outlier if any row holds one).

Batching: ``custom_partitioning`` has no vmap rule, so each wrapper is a ``custom_vmap``
whose rule folds a batch of activations into the rows of one partitioned call (4-bit), or
falls back to the plain kernel launchers under ``vmap`` (their own rules), unpartitioned.

On one device, and inside ``shard_map`` (where every operand is already a shard), the wrapper
lowers to the bare kernel call: nothing is added to the single-device program. Both of JAX's
partitioners are served: Shardy (``sharding_rule``) and GSPMD (``infer_sharding_from_operands``).
The partitioner needs mesh axis names: call the jitted function with ``NamedSharding``
operands (``jax.device_put`` / ``in_shardings``), or under ``jax.sharding.use_mesh``.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from qflax.ops import fourbit_kernels, int8_kernels
from qflax.quant import fourbit_rows
from qflax.quant import int8 as int8_quant
from qflax.quant.fourbit import Packed4bit

# ----------------------------------------------------------------------------------------- helpers


def _axes(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec(sharding, ndim: int) -> tuple:
    """The spec of a sharding as ``ndim`` tuples of axis names."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            "qflax kernels: the SPMD partitioner passed a sharding without mesh axis names "
            f"({type(sharding).__name__}); give the jitted function NamedSharding operands or call it under "
            "jax.sharding.use_mesh(mesh)"
        )
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(_axes(e) for e in spec[:ndim])


def _size(mesh, axes: tuple) -> int:
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _entry(axes: tuple):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _named(mesh, *dims) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*(_entry(d) for d in dims)))


def shard_index(axes: tuple) -> jax.Array:
    """This device's position along mesh ``axes`` (major to minor, as in a PartitionSpec).

    Valid wherever the axes are bound: inside ``shard_map`` and in a partitioned lowering.
    """
    index = jnp.int32(0)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis).astype(jnp.int32)
    return index


def _free(batch: tuple, *used: tuple) -> tuple:
    """The batch axes that do not collide with the weight's axes (a colliding one is dropped)."""
    taken = {a for axes in used for a in axes}
    return tuple(a for a in batch if a not in taken)


def _divides(size: int, parts: int, what: str, axes: tuple, multiple: int = 1) -> None:
    if size % (parts * multiple):
        raise ValueError(
            f"qflax kernels: {what} ({size}) split over mesh axes {axes} ({parts} shards) must be a multiple of "
            f"{parts * multiple}" + (f" ({parts} shards x blocksize {multiple})" if multiple > 1 else "")
        )


@functools.lru_cache(maxsize=None)
def _batchable(partitioned, plain, static, fold_rows: bool):
    """``partitioned(static, ...)`` as a ``custom_vmap``: ``custom_partitioning`` has no batching rule.

    With ``fold_rows`` and only the first operand (the activations) batched, the batch joins
    its rows in one partitioned call; otherwise the plain launchers are vmapped.
    """
    fn = jax.custom_batching.custom_vmap(lambda *arrays: partitioned(static, *arrays))

    @fn.def_vmap
    def _rule(axis_size, in_batched, first, *rest):
        if fold_rows and in_batched[0] and not any(in_batched[1:]):
            out = fn(first.reshape(-1, first.shape[-1]), *rest)
            return out.reshape(axis_size, -1, out.shape[-1]), True
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(lambda *arrays: plain(static, *arrays), in_axes=axes)(first, *rest), True

    return fn


# ---------------------------------------------------------------------------------- 4-bit weights


@dataclasses.dataclass(frozen=True)
class _Static4bit:
    """Everything static about one 4-bit kernel call (hashable: a custom_partitioning static argument)."""

    shape: tuple
    dtype: str
    blocksize: int
    quant_type: str
    nested_blocksize: int
    nested: bool
    row_view: bool
    has_bias: bool
    compute_dtype: str


def _static(q: Packed4bit, has_bias: bool, compute_dtype: str) -> _Static4bit:
    return _Static4bit(tuple(q.shape), q.dtype, q.blocksize, q.quant_type, q.nested_blocksize, q.nested,
                       fourbit_rows.is_row_view(q), has_bias, compute_dtype)


def _weight_arrays(q: Packed4bit) -> tuple:
    arrays = (q.packed, q.absmax, q.quant_map)
    if q.nested:
        # The offset travels as (1,): every operand then has a dimension a sharding rule can name.
        arrays += (q.nested_quant_map, q.nested_absmax, jnp.reshape(q.nested_offset, (1,)))
    return arrays


def _rebuild(s: _Static4bit, arrays) -> Packed4bit:
    packed, absmax, quant_map = arrays[:3]
    nested = {}
    if s.nested:
        nested = dict(nested_quant_map=arrays[3], nested_absmax=arrays[4], nested_offset=arrays[5].reshape(()))
    return Packed4bit(packed=packed, absmax=absmax, quant_map=quant_map, shape=s.shape, dtype=s.dtype,
                      blocksize=s.blocksize, quant_type=s.quant_type, nested_blocksize=s.nested_blocksize, **nested)


def _weight_count(s: _Static4bit) -> int:
    return 6 if s.nested else 3


def _weight_axes(s: _Static4bit, packed_sharding) -> tuple[tuple, tuple]:
    """(output-feature axes, input-feature axes) of a packed weight's sharding."""
    spec = _spec(packed_sharding, 2)
    # The flat layout (n // 2, 1) can only be split along whole rows: its axis 0.
    return spec[0], spec[1] if s.row_view else ()


def _weight_shardings(mesh, s: _Static4bit, out_axes: tuple, in_axes: tuple) -> list:
    dims = (out_axes, in_axes) if s.row_view else (out_axes,)
    packed = _named(mesh, out_axes, in_axes) if s.row_view else _named(mesh, out_axes, ())
    rest = [_named(mesh, ())] * (_weight_count(s) - 2)
    return [packed, _named(mesh, *dims)] + rest


def _check_4bit(mesh, s: _Static4bit, out_axes: tuple, in_axes: tuple) -> tuple[int, int]:
    n, k = s.shape
    _divides(n, _size(mesh, out_axes), "out_features", out_axes)
    _divides(k, _size(mesh, in_axes), "in_features", in_axes, s.blocksize)
    rows, cols = n // _size(mesh, out_axes), k // _size(mesh, in_axes)
    from qflax_kernels import fourbit_plan

    reason = fourbit_plan.unsupported_reason(rows, cols, s.blocksize, s.compute_dtype)
    if reason:
        raise ValueError(f"qflax kernels: a {rows}x{cols} shard of the {n}x{k} weight cannot run the kernel: {reason}")
    return rows, cols


def _local_weight(s: _Static4bit, arrays, out_axes: tuple, in_axes: tuple) -> Packed4bit:
    """The shard's block of the weight as a standalone Packed4bit (see ``fourbit_rows.local_block``)."""
    q = _rebuild(s, arrays)
    rows, cols = fourbit_rows.local_dims(q)
    return fourbit_rows.local_block(q, shard_index(out_axes) * rows, shard_index(in_axes) * cols)


def forward_shard(s: _Static4bit, out_axes: tuple, in_axes: tuple, x, *arrays):
    """One device's part of the 4-bit forward: the kernel on its block, then ``psum`` if K is split."""
    weight = arrays[:_weight_count(s)]
    bias = arrays[_weight_count(s)] if s.has_bias else None
    q = _local_weight(s, weight, out_axes, in_axes)
    if not in_axes:
        return fourbit_kernels.forward(x, q, bias, s.compute_dtype)
    y = jax.lax.psum(fourbit_kernels.forward(x, q, None, s.compute_dtype), in_axes)
    return y if bias is None else (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def grad_shard(s: _Static4bit, out_axes: tuple, in_axes: tuple, g, *arrays):
    """One device's part of ``g @ W``: the kernel on its block, then ``psum`` if N is split."""
    out = fourbit_kernels.grad_input(g, _local_weight(s, arrays, out_axes, in_axes), s.compute_dtype)
    return jax.lax.psum(out, out_axes) if out_axes else out


def _rule_4bit(s: _Static4bit, x_factors: str, out_factors: str, reduction: tuple) -> tuple:
    """The Shardy rule of one 4-bit call: shared factors tie x's features to the weight's blocks."""
    n, k = s.shape
    kb = k // s.blocksize
    if s.row_view:
        weight = "n (kb kp), n kb"
        sizes = dict(kx=s.blocksize, kp=s.blocksize // 2)
        replicated = ("kx", "kp")
    else:
        weight = "(n kp) o, (n kb)"
        sizes = dict(kx=s.blocksize, kp=k // 2, kb=kb)
        replicated = ("kx", "kp", "kb", "o")
    operands = [x_factors, weight, "c"]
    if s.nested:
        operands += ["d", "e", "f"]
        replicated += ("d", "e", "f")
    if s.has_bias:
        operands.append("n")
    rule = f"{', '.join(operands)} -> {out_factors}"
    # Shardy wants the special factors listed in the order the rule first names them.
    order = [f for f in rule.replace("(", " ").replace(")", " ").replace(",", " ").split() if f != "->"]
    ordered = lambda factors: tuple(sorted(set(factors), key=order.index))  # noqa: E731
    reduction = ordered(f for f in reduction if f not in replicated)
    return rule, dict(reduction_factors=reduction, need_replication_factors=ordered(replicated + ("c",)), **sizes)


def _forward_call(s: _Static4bit, x, *arrays):
    weight = arrays[:_weight_count(s)]
    bias = arrays[_weight_count(s)] if s.has_bias else None
    return fourbit_kernels.forward(x, fourbit_rows.to_flat(_rebuild(s, weight)), bias, s.compute_dtype)


def _forward_layout(s: _Static4bit, mesh, arg_shapes):
    x_spec = _spec(arg_shapes[0].sharding, 2)
    out_axes, in_axes = _weight_axes(s, arg_shapes[1].sharding)
    batch = _free(x_spec[0], out_axes, in_axes)
    return batch, out_axes, in_axes


def _forward_infer(s, mesh, arg_shapes, result_shape):
    batch, out_axes, _ = _forward_layout(s, mesh, arg_shapes)
    return _named(mesh, batch, out_axes)


def _forward_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _forward_layout(s, mesh, arg_shapes)
    _check_4bit(mesh, s, out_axes, in_axes)
    shardings = [_named(mesh, batch, in_axes)] + _weight_shardings(mesh, s, out_axes, in_axes)
    if s.has_bias:
        shardings.append(_named(mesh, out_axes))
    lower = functools.partial(forward_shard, s, out_axes, in_axes)
    return mesh, lower, _named(mesh, batch, out_axes), tuple(shardings)


_forward = custom_partitioning(_forward_call, static_argnums=(0,))
_forward.def_partition(
    partition=_forward_partition,
    infer_sharding_from_operands=_forward_infer,
    sharding_rule=lambda s, mesh, operands, results: _rule_4bit(s, "m (kb kx)", "m n", ("kb",)),
)


def fourbit_forward(x: jax.Array, q: Packed4bit, bias: Optional[jax.Array], compute_dtype: str) -> jax.Array:
    """:func:`qflax.ops.fourbit_kernels.forward` with a partitioning rule (see the module docstring).

    Args:
      x: ``(..., in_features)`` activations.
      q: the 2-D weight, flat or in the row view.
      bias: optional ``(out_features,)``.
      compute_dtype: dtype name of the product.

    Returns:
      ``(..., out_features)`` in x's dtype.
    """
    n, k = q.shape
    s = _static(q, bias is not None, compute_dtype)
    arrays = _weight_arrays(q) + ((bias,) if bias is not None else ())
    out = _batchable(_forward, _forward_call, s, True)(x.reshape(-1, k).astype(compute_dtype), *arrays)
    return out.reshape(*x.shape[:-1], n).astype(x.dtype)


def _grad_call(s: _Static4bit, g, *arrays):
    return fourbit_kernels.grad_input(g, fourbit_rows.to_flat(_rebuild(s, arrays)), s.compute_dtype)


def _grad_layout(s: _Static4bit, mesh, arg_shapes):
    g_spec = _spec(arg_shapes[0].sharding, 2)
    out_axes, in_axes = _weight_axes(s, arg_shapes[1].sharding)
    return _free(g_spec[0], out_axes, in_axes), out_axes, in_axes


def _grad_infer(s, mesh, arg_shapes, result_shape):
    batch, _, in_axes = _grad_layout(s, mesh, arg_shapes)
    return _named(mesh, batch, in_axes)


def _grad_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _grad_layout(s, mesh, arg_shapes)
    _check_4bit(mesh, s, out_axes, in_axes)
    shardings = [_named(mesh, batch, out_axes)] + _weight_shardings(mesh, s, out_axes, in_axes)
    lower = functools.partial(grad_shard, s, out_axes, in_axes)
    return mesh, lower, _named(mesh, batch, in_axes), tuple(shardings)


_grad = custom_partitioning(_grad_call, static_argnums=(0,))
_grad.def_partition(
    partition=_grad_partition,
    infer_sharding_from_operands=_grad_infer,
    sharding_rule=lambda s, mesh, operands, results: _rule_4bit(s, "m n", "m (kb kx)", ("n",)),
)


def fourbit_grad_input(g: jax.Array, q: Packed4bit, compute_dtype: str) -> jax.Array:
    """:func:`qflax.ops.fourbit_kernels.grad_input` (``g @ W``) with a partitioning rule.

    Column-parallel weights end in one ``psum`` here (each device holds a slice of the
    output features, so of the contraction), row-parallel ones need none.

    Args:
      g: ``(..., out_features)`` output gradient.
      q: the 2-D weight, flat or in the row view.
      compute_dtype: dtype name of the product.

    Returns:
      ``(..., in_features)`` of ``compute_dtype``.
    """
    n, k = q.shape
    s = _static(q, False, compute_dtype)
    out = _batchable(_grad, _grad_call, s, True)(g.reshape(-1, n).astype(compute_dtype), *_weight_arrays(q))
    return out.reshape(*g.shape[:-1], k)


# ------------------------------------------------------------------------------------------ LLM.int8


@dataclasses.dataclass(frozen=True)
class _StaticInt8:
    threshold: float
    has_bias: bool


def _int8_call(s: _StaticInt8, x, codes, scale, *bias):
    return int8_kernels.run_llm_int8(x, codes, scale, bias[0] if s.has_bias else None, s.threshold)


def _int8_layout(mesh, arg_shapes):
    x_spec = _spec(arg_shapes[0].sharding, 2)
    out_axes, in_axes = _spec(arg_shapes[1].sharding, 2)
    return _free(x_spec[0], out_axes, in_axes), out_axes, in_axes


def _int8_infer(s, mesh, arg_shapes, result_shape):
    batch, out_axes, _ = _int8_layout(mesh, arg_shapes)
    return _named(mesh, batch, out_axes)


def _quantize_rows_split(x, threshold: float, mask, in_axes: tuple):
    """LLM.int8 activation codes of a slice of x's features, with the absmax of whole rows (``pmax``)."""
    x32 = x.astype(jnp.float32)
    if threshold > 0:
        x32 = jnp.where(jnp.abs(x32) >= threshold, jnp.float32(0), x32)
    absmax = jax.lax.pmax(jnp.max(jnp.abs(x32), axis=1), in_axes)
    codes = int8_quant.round_to_int8(x32 * int8_quant.llm_int8_scale_factor(absmax)[:, None])
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
    if in_axes:
        codes, absmax = _quantize_rows_split(x, threshold, mask, in_axes)
    elif threshold > 0:
        codes, absmax = int8_launch.quantize_rowwise(x, threshold, mask, llm_int8_scale=True)
    else:
        codes, absmax = int8_launch.quantize_rowwise(x, llm_int8_scale=True)
    outliers = {}
    if threshold > 0:
        outliers = dict(x=x, outlier_idx=jnp.nonzero(mask, size=k, fill_value=0)[0].astype(jnp.int32),
                        outlier_count=jnp.sum(mask, dtype=jnp.int32).reshape(1))
    local_bias = None if in_axes else bias
    out = int8_launch.int8_matmul_dequant(codes, codes_w, absmax, scale_w, local_bias, out_dtype=x.dtype, **outliers)
    if not in_axes:
        return out
    out = jax.lax.psum(out, in_axes)
    return out if bias is None else (out.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out.dtype)


def _int8_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _int8_layout(mesh, arg_shapes)
    n, k = arg_shapes[1].shape
    _divides(n, _size(mesh, out_axes), "out_features", out_axes)
    _divides(k, _size(mesh, in_axes), "in_features", in_axes)
    shardings = [_named(mesh, batch, in_axes), _named(mesh, out_axes, in_axes), _named(mesh, out_axes)]
    if s.has_bias:
        shardings.append(_named(mesh, out_axes))

    lower = functools.partial(llm_int8_shard, s, batch, in_axes)
    return mesh, lower, _named(mesh, batch, out_axes), tuple(shardings)


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
    return _batchable(_int8, _int8_call, s, False)(x, codes, scale, *((bias,) if bias is not None else ()))
