"""How the Triton kernel calls are partitioned across devices: the shared part of the rules.

A kernel call (the ``qflax_triton_call`` primitive) is opaque to XLA's SPMD partitioner: given
a sharded packed weight, it would gather the whole weight onto every device first. Each
kernel branch is therefore wrapped in ``jax.experimental.custom_partitioning``
(:mod:`qflax.ops.fourbit_partitioning`, :mod:`qflax.ops.int8_partitioning`): the partitioner
asks the rule how to split the call, and every device runs the same kernel on its own block
of the weight.

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
operands (``jax.device_put`` / ``in_shardings``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def axes_of(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def spec_axes(sharding, ndim: int) -> tuple:
    """The spec of a sharding as ``ndim`` tuples of axis names."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            "qflax kernels: the SPMD partitioner passed a sharding without mesh axis names "
            f"({type(sharding).__name__}); give the jitted function NamedSharding operands (jax.device_put, "
            "in_shardings)"
        )
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(axes_of(e) for e in spec[:ndim])


def mesh_size(mesh, axes: tuple) -> int:
    """Number of devices along mesh ``axes``."""
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _entry(axes: tuple):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def named(mesh, *dims) -> NamedSharding:
    """A NamedSharding from one tuple of axis names per dimension."""
    return NamedSharding(mesh, PartitionSpec(*(_entry(d) for d in dims)))


def shard_index(axes: tuple) -> jax.Array:
    """This device's position along mesh ``axes`` (major to minor, as in a PartitionSpec).

    Valid wherever the axes are bound: inside ``shard_map`` and in a partitioned lowering.
    """
    index = jnp.int32(0)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis).astype(jnp.int32)
    return index


def free_axes(batch: tuple, *used: tuple) -> tuple:
    """The batch axes that do not collide with the weight's axes (a colliding one is dropped)."""
    taken = {a for axes in used for a in axes}
    return tuple(a for a in batch if a not in taken)


def check_divides(size: int, parts: int, what: str, axes: tuple, multiple: int = 1) -> None:
    """Raises ValueError unless ``size`` splits into ``parts`` shards of whole ``multiple``-element blocks."""
    if size % (parts * multiple):
        raise ValueError(
            f"qflax kernels: {what} ({size}) split over mesh axes {axes} ({parts} shards) must be a multiple of "
            f"{parts * multiple}" + (f" ({parts} shards x blocksize {multiple})" if multiple > 1 else "")
        )


@functools.lru_cache(maxsize=None)
def batchable(partitioned, plain, static, fold_rows: bool):
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
