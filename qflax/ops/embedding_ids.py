"""Row ids of every embedding lookup: one rule for out-of-range ids, eager and jitted, any integer dtype.

An id outside ``[0, num_embeddings)`` -- negative, too large, or beyond 32 bits -- gives a row
of NaN, never another row and never an exception (an exception is impossible under
``jax.jit``, and the result must not depend on whether the call is traced). The range is
checked on the ids as given, before they are narrowed to int32: JAX without x64 would
otherwise wrap a numpy int64 id of 2**32 + 1 to the valid id 1. (jnp.take's "fill" mode is not
enough: it maps negative ids to rows from the end.) Used by ``embed_4bit``, ``embed_8bit``
and the float ``Embed``/``StableEmbed`` layers of qflax.linen and qflax.nnx.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def checked_ids(ids: Any, num_embeddings: int, name: str = "ids") -> tuple[jax.Array, jax.Array]:
    """Returns ``(safe_ids, in_range)``: int32 ids with every out-of-range one replaced by 0, and the mask.

    Args:
      ids: an integer array of any shape and integer dtype (jax, numpy or a Python int/list).
      num_embeddings: the number of rows.
      name: the argument name for messages.

    Returns:
      int32 ``safe_ids`` and bool ``in_range``, both of ``ids``' shape.

    Raises:
      TypeError: ``ids`` is not an integer array (floats and bools are refused).
    """
    dtype = np.dtype(ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of row indices, got dtype {dtype.name}")
    if not isinstance(ids, jax.Array):
        # numpy / Python ids may be 64-bit: decide the range before jnp.asarray narrows them.
        host = np.asarray(ids)
        in_range = (host >= 0) & (host < num_embeddings)
        return jnp.asarray(np.where(in_range, host, 0).astype(np.int32)), jnp.asarray(in_range)
    in_range = ids >= 0 if np.issubdtype(dtype, np.signedinteger) else jnp.ones(ids.shape, bool)
    if num_embeddings <= np.iinfo(dtype).max:  # else every id of this dtype is below it
        in_range = in_range & (ids < num_embeddings)
    return jnp.where(in_range, ids, 0).astype(jnp.int32), in_range


def nan_where_out_of_range(rows: jax.Array, in_range: jax.Array) -> jax.Array:
    """``rows`` (float, ``(*ids.shape, features)``) with the rows of out-of-range ids set to NaN."""
    return jnp.where(in_range[..., None], rows, jnp.asarray(jnp.nan, rows.dtype))


def take_rows(table: jax.Array, ids: Any, name: str = "ids") -> tuple[jax.Array, jax.Array]:
    """Rows of a float ``(num_embeddings, features)`` table; NaN rows for out-of-range ids.

    Returns:
      ``(safe_ids, rows)``: the int32 ids actually read (0 in place of an out-of-range id) and
      the rows ``(*ids.shape, features)`` in the table's dtype.
    """
    safe, in_range = checked_ids(ids, table.shape[0], name)
    return safe, nan_where_out_of_range(jnp.take(table, safe, axis=0), in_range)
