"""Row lookup in a 4-bit table (bitsandbytes' ``Embedding4bit.forward``, docs/embeddings.md#embedding4bit).

When every row is made of whole absmax blocks (``features % blocksize == 0``) only the
gathered rows are decoded: their packed bytes and absmax entries are gathered first. Otherwise
blocks straddle rows and the whole table is decoded before the lookup.

Out-of-range ids (``id < 0`` or ``id >= num_embeddings``) give rows of NaN, eagerly and under
jit alike, so a bad id is visible instead of silently reading another row (bitsandbytes raises
an IndexError from torch; an exception is impossible under jit).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qflax.ops import dispatch
from qflax.quant import packing
from qflax.quant.fourbit import Packed4bit, dequantize_4bit, dequantize_absmax

OP_NAME = "embed_4bit"


def _kernel_supports(ids: jax.Array, q: Packed4bit) -> bool:
    """KERNEL HOOK: no GPU kernel for 4-bit lookups exists, so dispatch always takes XLA."""
    del ids, q
    return False


def _gathered_rows(ids: jax.Array, q: Packed4bit) -> jax.Array:
    """float32 rows of ``ids`` (in range), decoding only those rows' bytes and absmax."""
    num_embeddings, features = q.shape
    # features % blocksize == 0 makes features even, so a row is exactly features // 2 bytes.
    row_bytes = jnp.take(q.packed.reshape(num_embeddings, features // 2), ids, axis=0)
    codes = packing.unpack_nibbles(row_bytes).reshape(*ids.shape, features)
    values = jnp.take(q.quant_map.astype(jnp.float32), codes.astype(jnp.int32))
    blocks_per_row = features // q.blocksize
    # The absmax vector is 1/blocksize of the table; decoding it whole keeps double-quant math in one place.
    absmax = jnp.take(dequantize_absmax(q).reshape(num_embeddings, blocks_per_row), ids, axis=0)
    blocks = values.reshape(*ids.shape, blocks_per_row, q.blocksize) * absmax[..., None]
    return blocks.reshape(*ids.shape, features)


def embed_4bit(ids: jax.Array, q: Packed4bit, backend: Optional[str] = None) -> jax.Array:
    """Looks up rows of a 4-bit ``(num_embeddings, features)`` table.

    Args:
      ids: integer array of any shape.
      q: the quantized table, ``q.shape == (num_embeddings, features)``.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Returns:
      Array ``(*ids.shape, features)`` in the table's dtype (``q.dtype``); rows of
      out-of-range ids are NaN.

    Raises:
      TypeError: ``ids`` is not an integer array or ``q`` is not a Packed4bit.
      ValueError: ``q`` is not 2-D.
    """
    if not isinstance(q, Packed4bit):
        raise TypeError(f"q must be a qflax.quant.Packed4bit, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must hold a 2-D (num_embeddings, features) table, got shape {q.shape}")
    ids_dtype = np.dtype(ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype)
    if not np.issubdtype(ids_dtype, np.integer):
        raise TypeError(f"ids must be an integer array, got dtype {ids_dtype.name}")
    ids = jnp.asarray(ids)
    path = dispatch.choose(OP_NAME, backend, kernel_supports=_kernel_supports(ids, q))
    if path == "triton":  # KERNEL HOOK: a GPU lookup kernel would launch here (none exists: unreachable).
        raise NotImplementedError(f"{OP_NAME}: the Triton kernel is not implemented yet")

    num_embeddings, features = q.shape
    in_range = (ids >= 0) & (ids < num_embeddings)
    safe_ids = jnp.where(in_range, ids, 0).astype(jnp.int32)
    if features % q.blocksize == 0:
        rows = _gathered_rows(safe_ids, q)
    else:
        rows = jnp.take(dequantize_4bit(q.replace(dtype="float32")), safe_ids, axis=0)
    rows = jnp.where(in_range[..., None], rows, jnp.float32(jnp.nan))
    return rows.astype(q.dtype)
