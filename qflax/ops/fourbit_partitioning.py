"""The partitioning rule of the 4-bit kernel calls: forward (``x @ W.T + bias``) and input gradient (``g @ W``).

See :mod:`qflax.ops.partitioning` for the splits. A shard of a 4-bit weight becomes a
standalone weight (:func:`qflax.quant.fourbit_rows.local_block`) that the kernel runs as it is.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning

from qflax.ops import fourbit_kernels, partitioning
from qflax.ops.partitioning import shard_index
from qflax.quant import fourbit_rows
from qflax.quant.fourbit import Packed4bit


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
    spec = partitioning.spec_axes(packed_sharding, 2)
    # The flat layout (n // 2, 1) can only be split along whole rows: its axis 0.
    return spec[0], spec[1] if s.row_view else ()


def _weight_shardings(mesh, s: _Static4bit, out_axes: tuple, in_axes: tuple) -> list:
    dims = (out_axes, in_axes) if s.row_view else (out_axes,)
    packed = partitioning.named(mesh, out_axes, in_axes) if s.row_view else partitioning.named(mesh, out_axes, ())
    rest = [partitioning.named(mesh, ())] * (_weight_count(s) - 2)
    return [packed, partitioning.named(mesh, *dims)] + rest


def _check_4bit(mesh, s: _Static4bit, out_axes: tuple, in_axes: tuple) -> tuple[int, int]:
    n, k = s.shape
    partitioning.check_divides(n, partitioning.mesh_size(mesh, out_axes), "out_features", out_axes)
    partitioning.check_divides(k, partitioning.mesh_size(mesh, in_axes), "in_features", in_axes, s.blocksize)
    rows, cols = n // partitioning.mesh_size(mesh, out_axes), k // partitioning.mesh_size(mesh, in_axes)
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


def _rule_4bit(s: _Static4bit, grad: bool) -> tuple:
    """The Shardy rule of one 4-bit call: shared factors tie x's features to the weight's blocks.

    K is ``kb`` blocks of ``kx`` elements (``kp`` bytes), so sharding the blocks of the weight's
    absmax propagates to x's features as a whole-block split, and no finer one exists.
    """
    n, k = s.shape
    sizes = dict(n=n, kb=k // s.blocksize, kx=s.blocksize, kp=s.blocksize // 2 if s.row_view else k // 2, o=1)

    def dim(*factors):
        # Shardy rejects size-1 factors inside a compound dimension: leave them out of it.
        return tuple(f for f in factors if sizes.get(f) != 1) or factors[:1]

    features = dim("kb", "kx")
    weight = [[("n",), dim("kb", "kp")], [("n",), ("kb",)]] if s.row_view else [[dim("n", "kp"), ("o",)],
                                                                                [dim("n", "kb")]]
    operands = [[("m",), ("n",) if grad else features]] + weight + [[("c",)]]
    replicated = ["kx", "kp", "c"] + ([] if s.row_view else ["kb", "o"])
    if s.nested:
        operands += [[("d",)], [("e",)], [("f",)]]
        replicated += ["d", "e", "f"]
    if s.has_bias:
        operands.append([("n",)])
    result = [("m",), features if grad else ("n",)]
    dims = [d for array in operands + [result] for d in array]
    render = lambda array: " ".join(d[0] if len(d) == 1 else f"({' '.join(d)})" for d in array)  # noqa: E731
    rule = f"{', '.join(render(a) for a in operands)} -> {render(result)}"
    named = list(dict.fromkeys(f for d in dims for f in d))
    standalone = {d[0] for d in dims if len(d) == 1}
    # Shardy wants the special factors in the order the rule first names them.
    ordered = lambda factors: tuple(sorted({f for f in factors if f in named}, key=named.index))  # noqa: E731
    reduction = ordered(f for f in (("n",) if grad else ("kb",)) if f not in replicated)
    return rule, dict(reduction_factors=reduction, need_replication_factors=ordered(replicated),
                      **{f: sizes[f] for f in named if f not in standalone})


def _forward_call(s: _Static4bit, x, *arrays):
    weight = arrays[:_weight_count(s)]
    bias = arrays[_weight_count(s)] if s.has_bias else None
    return fourbit_kernels.forward(x, fourbit_rows.to_flat(_rebuild(s, weight)), bias, s.compute_dtype)


def _forward_layout(s: _Static4bit, mesh, arg_shapes):
    x_spec = partitioning.spec_axes(arg_shapes[0].sharding, 2)
    out_axes, in_axes = _weight_axes(s, arg_shapes[1].sharding)
    batch = partitioning.free_axes(x_spec[0], out_axes, in_axes)
    return batch, out_axes, in_axes


def _forward_infer(s, mesh, arg_shapes, result_shape):
    batch, out_axes, _ = _forward_layout(s, mesh, arg_shapes)
    return partitioning.named(mesh, batch, out_axes)


def _forward_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _forward_layout(s, mesh, arg_shapes)
    _check_4bit(mesh, s, out_axes, in_axes)
    shardings = [partitioning.named(mesh, batch, in_axes)] + _weight_shardings(mesh, s, out_axes, in_axes)
    if s.has_bias:
        shardings.append(partitioning.named(mesh, out_axes))
    lower = functools.partial(forward_shard, s, out_axes, in_axes)
    return mesh, lower, partitioning.named(mesh, batch, out_axes), tuple(shardings)


_forward = custom_partitioning(_forward_call, static_argnums=(0,))
_forward.def_partition(
    partition=_forward_partition,
    infer_sharding_from_operands=_forward_infer,
    sharding_rule=lambda s, mesh, operands, results: _rule_4bit(s, grad=False),
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
    out = partitioning.batchable(_forward, _forward_call, s, True)(x.reshape(-1, k).astype(compute_dtype), *arrays)
    return out.reshape(*x.shape[:-1], n).astype(x.dtype)


def _grad_call(s: _Static4bit, g, *arrays):
    return fourbit_kernels.grad_input(g, fourbit_rows.to_flat(_rebuild(s, arrays)), s.compute_dtype)


def _grad_layout(s: _Static4bit, mesh, arg_shapes):
    g_spec = partitioning.spec_axes(arg_shapes[0].sharding, 2)
    out_axes, in_axes = _weight_axes(s, arg_shapes[1].sharding)
    return partitioning.free_axes(g_spec[0], out_axes, in_axes), out_axes, in_axes


def _grad_infer(s, mesh, arg_shapes, result_shape):
    batch, _, in_axes = _grad_layout(s, mesh, arg_shapes)
    return partitioning.named(mesh, batch, in_axes)


def _grad_partition(s, mesh, arg_shapes, result_shape):
    batch, out_axes, in_axes = _grad_layout(s, mesh, arg_shapes)
    _check_4bit(mesh, s, out_axes, in_axes)
    shardings = [partitioning.named(mesh, batch, out_axes)] + _weight_shardings(mesh, s, out_axes, in_axes)
    lower = functools.partial(grad_shard, s, out_axes, in_axes)
    return mesh, lower, partitioning.named(mesh, batch, in_axes), tuple(shardings)


_grad = custom_partitioning(_grad_call, static_argnums=(0,))
_grad.def_partition(
    partition=_grad_partition,
    infer_sharding_from_operands=_grad_infer,
    sharding_rule=lambda s, mesh, operands, results: _rule_4bit(s, grad=True),
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
    out = partitioning.batchable(_grad, _grad_call, s, True)(g.reshape(-1, n).astype(compute_dtype), *_weight_arrays(q))
    return out.reshape(*g.shape[:-1], k)
