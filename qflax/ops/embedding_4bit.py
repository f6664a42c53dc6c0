"""Row lookup in a 4-bit table (bitsandbytes' ``Embedding4bit.forward``, docs/embeddings.md#embedding4bit).

When every row is made of whole absmax blocks (``features % blocksize == 0``) only the
gathered rows are decoded: their packed bytes and absmax entries are gathered first. Otherwise
blocks straddle rows and the whole table is decoded before the lookup.

Out-of-range ids (``id < 0`` or ``id >= num_embeddings``, of any integer dtype) give rows of
NaN, eagerly and under jit alike, so a bad id is visible instead of silently reading another
row (bitsandbytes raises an IndexError from torch; an exception is impossible under jit). See
:mod:`qflax.ops.embedding_ids`.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from qflax.ops import dispatch, embedding_ids
from qflax.quant import fourbit_rows
from qflax.quant.fourbit import Packed4bit, check_structure, dequantize_4bit

OP_NAME = "embed_4bit"


# KERNEL HOOK: no GPU kernel for 4-bit lookups exists, so dispatch always takes XLA.
NO_KERNEL = "there is no GPU kernel for 4-bit embedding lookups"


def _gathered_rows(ids: jax.Array, q: Packed4bit) -> jax.Array:
    """float32 rows of ``ids`` (in range), decoding only those rows' bytes and absmax."""
    num_embeddings, features = q.shape
    # features % blocksize == 0 makes features even, so a row is exactly features // 2 bytes.
    row_bytes = jnp.take(q.packed.reshape(num_embeddings, features // 2), ids, axis=0)
    codes = fourbit_rows.unpack_last_axis(row_bytes)  # along the features: a feature-sharded table stays so
    values = jnp.take(q.quant_map.astype(jnp.float32), codes.astype(jnp.int32))
    blocks_per_row = features // q.blocksize
    # The absmax is 1/blocksize of the table: decode it whole, along its rows and blocks (so a table
    # sharded along either axis decodes shard by shard), then gather.
    absmax = jnp.take(fourbit_rows.absmax_rows(q), ids, axis=0)
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
    check_structure(q, "q")
    if len(q.shape) != 2:
        raise ValueError(f"q must hold a 2-D (num_embeddings, features) table, got shape {q.shape}")
    num_embeddings, features = q.shape
    safe_ids, in_range = embedding_ids.checked_ids(ids, num_embeddings)
    path = dispatch.choose(OP_NAME, backend, unsupported=NO_KERNEL)
    if path == "triton":  # KERNEL HOOK: a GPU lookup kernel would launch here (none exists: unreachable).
        raise NotImplementedError(f"{OP_NAME}: the Triton kernel is not implemented yet")

    if features % q.blocksize == 0:
        rows = _gathered_rows(safe_ids, q)
    else:
        rows = jnp.take(dequantize_4bit(q.replace(dtype="float32")), safe_ids, axis=0)
    return embedding_ids.nan_where_out_of_range(rows, in_range).astype(q.dtype)
