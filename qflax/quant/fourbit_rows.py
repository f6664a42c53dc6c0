"""The row view of a 4-bit weight: bitsandbytes' bytes seen as a matrix, for sharding and per-shard decoding.

A 2-D :class:`Packed4bit` of shape ``(N, K)`` whose rows are whole absmax blocks
(``K % blocksize == 0``) keeps every row of the weight in ``K // 2`` consecutive bytes and
``K // blocksize`` consecutive absmax entries of bitsandbytes' flat layout. Reshaping the
leaves to ``packed (N, K // 2)`` and ``absmax (N, K // blocksize)`` (the *row view*) moves no
byte, yet gives the input features an array axis of their own: that is what lets a
``PartitionSpec`` split a weight along its input features (row-parallel) at block
boundaries. Along output features (column-parallel) both layouts split the same way.

Double-quantized statistics (one float32 per 256 absmax blocks in flat order) keep their
flat shape. They are indexed here by the *global* flat block number ``row * K / blocksize +
column block`` (a gather from the small ``nested_absmax``), never by reshaping the absmax
codes, so decoding works on any rectangular shard of the weight without first gathering it.

Every function here is pure array math (no mesh, no collectives); :mod:`qflax.sharding` and
:mod:`qflax.ops.partitioning` supply the shard offsets.
"""

import functools
from typing import Union

import jax
import jax.numpy as jnp

from qflax.quant.fourbit import Packed4bit

Index = Union[int, jax.Array]


def has_whole_block_rows(q: Packed4bit) -> bool:
    """True when ``q`` is a 2-D weight whose rows are whole absmax blocks (``K % blocksize == 0``)."""
    return len(q.shape) == 2 and q.shape[1] % q.blocksize == 0


def _check_rows(q: Packed4bit, name: str) -> tuple[int, int]:
    if not isinstance(q, Packed4bit):
        raise TypeError(f"{name} must be a qflax.quant.Packed4bit, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"{name} must hold a 2-D (out_features, in_features) weight, got shape {q.shape}")
    n, k = q.shape
    if k % q.blocksize:
        raise ValueError(
            f"{name}: in_features ({k}) must be a multiple of blocksize ({q.blocksize}) for a row view "
            f"(each row made of whole absmax blocks); got {k} % {q.blocksize} = {k % q.blocksize}"
        )
    return n, k


def is_row_view(q: Packed4bit) -> bool:
    """True when ``q.packed`` has the row-view shape ``(N, K // 2)`` rather than bitsandbytes' ``(n // 2, 1)``."""
    # Unambiguous: a row view has K // 2 >= blocksize // 2 >= 16 columns, the flat layout one.
    return len(q.shape) == 2 and q.packed.ndim == 2 and q.packed.shape[1] != 1


def to_row_view(q: Packed4bit) -> Packed4bit:
    """The same weight with ``packed (N, K // 2)`` and ``absmax (N, K // blocksize)``; no byte moves.

    Args:
      q: a 2-D Packed4bit with ``K % blocksize == 0`` (flat or already a row view).

    Returns:
      A Packed4bit with the same static fields and bytes, leaves reshaped.

    Raises:
      TypeError: ``q`` is not a Packed4bit.
      ValueError: ``q`` is not 2-D or its rows are not whole absmax blocks.
    """
    n, k = _check_rows(q, "q")
    return q.replace(packed=q.packed.reshape(n, k // 2), absmax=q.absmax.reshape(n, k // q.blocksize))


def to_flat(q: Packed4bit) -> Packed4bit:
    """bitsandbytes' layout again: ``packed ((n + 1) // 2, 1)``, ``absmax (nblocks,)``.

    Args:
      q: a Packed4bit in either layout.

    Returns:
      The same weight in bitsandbytes' flat layout (what ``bnb_format`` and checkpoints expect).
    """
    if not isinstance(q, Packed4bit):
        raise TypeError(f"q must be a qflax.quant.Packed4bit, got {type(q).__name__}")
    return q.replace(packed=q.packed.reshape(-1, 1), absmax=q.absmax.reshape(-1))


def flat_shapes(q: Packed4bit, name: str = "q") -> Packed4bit:
    """``q`` itself, or for a row view a stand-in with bitsandbytes' flat shapes (for shape checks).

    Raises:
      ValueError: ``q`` looks like a row view whose packed or absmax shape does not fit ``q.shape``.
    """
    if not is_row_view(q):
        return q
    n, k = _check_rows(q, name)
    want = ((n, k // 2), (n, k // q.blocksize))
    got = (tuple(q.packed.shape), tuple(q.absmax.shape))
    if got != want:
        raise ValueError(f"{name}: a row view of a {q.shape} weight (blocksize {q.blocksize}) has packed {want[0]} "
                         f"and absmax {want[1]}, got packed {got[0]} and absmax {got[1]}")
    return q.replace(packed=jax.ShapeDtypeStruct(((n * k + 1) // 2, 1), q.packed.dtype),
                     absmax=jax.ShapeDtypeStruct((n * k // q.blocksize,), q.absmax.dtype))


def local_dims(q: Packed4bit) -> tuple[int, int]:
    """``(rows, columns)`` of the weight block that ``q``'s leaves hold.

    ``q.shape`` is the whole weight's; inside a shard the leaves may hold only a block of it
    (a row view block, or a run of whole rows in the flat layout).
    """
    if is_row_view(q):
        return q.packed.shape[0], 2 * q.packed.shape[1]
    return (2 * q.packed.size) // q.shape[1], q.shape[1]


def unpack_last_axis(packed: jax.Array) -> jax.Array:
    """4-bit codes of packed bytes ``(..., m)`` as ``(..., 2 * m)``, high nibble first.

    The same order as :func:`qflax.quant.packing.unpack_nibbles`, but along the last axis only,
    so that an array sharded along its leading axes or its last one unpacks in place.
    """
    packed = packed.astype(jnp.uint8)
    return jnp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# Jitted, like dequantize_4bit, so eager calls round as jitted ones do (XLA fuses the
# multiply-add of the nested decode when it compiles).
@jax.jit
def absmax_rows(q: Packed4bit, row_start: Index = 0, col_start: Index = 0) -> jax.Array:
    """float32 absmax of the weight block held by ``q``'s leaves, shape ``(rows, cols // blocksize)``.

    Args:
      q: a Packed4bit whose rows are whole blocks; its leaves may be a block of the weight
        (see :func:`local_dims`) while ``q.shape`` is the whole weight's.
      row_start: first weight row of the block (a traced int inside a shard).
      col_start: first weight column of the block (a multiple of ``blocksize``).

    Returns:
      float32 ``(rows, cols // blocksize)``; equals ``dequantize_absmax`` of the whole weight
      on that block, bit for bit.
    """
    _, k = _check_rows(q, "q")
    rows, cols = local_dims(q)
    row_blocks = k // q.blocksize
    codes = q.absmax.reshape(rows, cols // q.blocksize)
    if not q.nested:
        return codes.astype(jnp.float32)
    shape = codes.shape
    block = (jax.lax.broadcasted_iota(jnp.int32, shape, 0) + row_start) * row_blocks
    block = block + jax.lax.broadcasted_iota(jnp.int32, shape, 1) + col_start // q.blocksize
    scale = jnp.take(q.nested_absmax.astype(jnp.float32), block // q.nested_blocksize)
    values = jnp.take(q.nested_quant_map.astype(jnp.float32), codes.astype(jnp.int32))
    # Same two float32 operations, in the same order, as blockwise.dequantize_flat + offset.
    return values * scale + q.nested_offset.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_rows(q: Packed4bit, dtype: str, row_start: Index = 0, col_start: Index = 0) -> jax.Array:
    """The weight block held by ``q``'s leaves, decoded in float32 and rounded once to ``dtype``.

    Equal bit for bit to the corresponding block of ``dequantize_4bit(q.replace(dtype=dtype))``;
    every operation runs along the block's own two axes, so a sharded weight decodes shard by
    shard (no gather).

    Args:
      q: a Packed4bit whose rows are whole blocks (flat layout, row view, or a block of either).
      dtype: output dtype name.
      row_start: first weight row of the block.
      col_start: first weight column of the block.

    Returns:
      ``(rows, cols)`` array of ``dtype``.
    """
    rows, cols = local_dims(q)
    codes = unpack_last_axis(q.packed.reshape(rows, cols // 2)).reshape(rows, cols // q.blocksize, q.blocksize)
    values = jnp.take(q.quant_map.astype(jnp.float32), codes.astype(jnp.int32))
    absmax = absmax_rows(q, row_start, col_start)
    return (values * absmax[..., None]).reshape(rows, cols).astype(dtype)


def local_block(q: Packed4bit, row_start: Index, col_start: Index) -> Packed4bit:
    """A standalone Packed4bit of the weight block held by ``q``'s leaves (what one shard computes with).

    The block's bytes and absmax codes are used as they are. Double-quantized statistics stay
    double-quantized when the block is a run of whole rows starting and ending on a boundary of
    256 absmax blocks (its slice of ``nested_absmax`` then describes it alone); otherwise the
    block's absmax is decoded to float32 (``1 / blocksize`` of the block's size), so that any
    block, e.g. a row-parallel shard, is a valid weight of its own.

    Args:
      q: a Packed4bit whose leaves hold a block of the weight ``q.shape`` (whole rows in the
        flat layout, or any block of whole absmax blocks in the row view). ``nested_absmax``
        is either the whole weight's or already the block's own slice.
      row_start: first weight row of the block (int or traced int32).
      col_start: first weight column of the block.

    Returns:
      A flat-layout Packed4bit of shape ``(rows, cols)``.
    """
    n, k = _check_rows(q, "q")
    rows, cols = local_dims(q)
    if (rows, cols) == (n, k):
        return to_flat(q)
    packed = q.packed.reshape(-1, 1)
    common = dict(packed=packed, quant_map=q.quant_map, shape=(rows, cols), dtype=q.dtype,
                  blocksize=q.blocksize, quant_type=q.quant_type, nested_blocksize=q.nested_blocksize)
    if not q.nested:
        return Packed4bit(absmax=q.absmax.reshape(-1), **common)
    blocks = rows * cols // q.blocksize
    whole = -(-(n * k // q.blocksize) // q.nested_blocksize)
    if cols == k and blocks % q.nested_blocksize == 0:
        count = blocks // q.nested_blocksize
        nested = q.nested_absmax
        if nested.shape[0] == whole:  # the whole weight's statistics: take the block's slice
            start = (row_start * (k // q.blocksize)) // q.nested_blocksize
            nested = jax.lax.dynamic_slice(nested, (start,), (count,))
        elif nested.shape[0] != count:
            raise ValueError(f"nested_absmax has {nested.shape[0]} entries; a {rows}x{cols} block of the {n}x{k} "
                             f"weight needs {count} (its own) or {whole} (the whole weight's)")
        return Packed4bit(absmax=q.absmax.reshape(-1), nested_absmax=nested, nested_quant_map=q.nested_quant_map,
                          nested_offset=q.nested_offset, **common)
    if q.nested_absmax.shape[0] != whole:
        raise ValueError(
            f"a {rows}x{cols} block of the {n}x{k} weight needs the whole nested_absmax ({whole} entries), "
            f"got {q.nested_absmax.shape[0]}: replicate the nested statistics (qflax.sharding does)"
        )
    return Packed4bit(absmax=absmax_rows(q, row_start, col_start).reshape(-1), **common)
